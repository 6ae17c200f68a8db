"""The multi-run audit: one audit over the canaries of several runs of the same scenario.

Each run's audit stage writes its canaries' scores and inclusion (`attacks/<attack>/
trials.json`). Runs that differ only in their seed draw their own canary coin flips and
noise, so their trials are independent draws of the same mechanism and can be pooled:
Jagielski et al.'s Clopper-Pearson bound (`auditing.multi_run_audit`) and, for audits whose
trials are independent within a run as well (gradient and client canaries), the
Gaussian-trade-off bound (`auditing.gdp_audit`) get more trials than one run holds.

    fedsim sweep scenarios/sweeps/dp_audit_runs.yaml                 # 10 seeds of one scenario
    fedsim audit runs/sweeps/dp_audit_runs/cell-* --attack canary_gradient_audit
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.core.errors import UserError
from fedsim.core.registry import ATTACKS
from fedsim.core.results import RunDirectory, read_record
from fedsim.evaluation.auditing import DEFAULT_BETA, gdp_audit, multi_run_audit
from fedsim.pipeline.runner import load_run_scenario


def pooled_audit(runs: list[str | Path], attack: str, beta: float = DEFAULT_BETA) -> dict[str, Any]:
    """Pool the trials of `attack` over `runs` (run directories of one scenario, seeds apart)
    and return both bounds with the reported epsilon they are compared with."""
    if not getattr(ATTACKS.get(attack), "independent_trials", False):
        raise UserError(
            f"attack '{attack}': its canaries share one training run's randomness, so they are not "
            "independent trials to pool; pool canary_gradient_audit or canary_client_audit runs"
        )
    if len(runs) < 2:
        raise UserError("a multi-run audit pools two or more run directories; give every run of the sweep")
    directories = [RunDirectory(Path(r)) for r in runs]
    scenarios = [load_run_scenario(d).model_copy(update={"seed": 0}).to_yaml() for d in directories]
    if any(s != scenarios[0] for s in scenarios[1:]):
        raise UserError("the runs differ in more than their seed; pool only the seeds of one scenario (one sweep cell per seed)")
    scores, included, reported = [], [], []
    for directory in directories:
        results = directory.root / "attacks" / attack
        if not (results / "trials.json").is_file():
            raise UserError(f"'{directory.root}' has no {attack} audit trials (attacks/{attack}/trials.json); run the audit first")
        trials = json.loads((results / "trials.json").read_text())
        scores.append(np.asarray(trials["scores"], dtype=np.float64))
        included.append(np.asarray(trials["included"], dtype=bool))
        reported.append(read_record(results / "audit.json", "reported")["reported"])
    claim = reported[0]
    delta = claim["delta"] if claim else 1e-5
    pooled_scores, pooled_included = np.concatenate(scores), np.concatenate(included)
    multi = multi_run_audit(pooled_scores, pooled_included, delta, beta)
    gaussian = gdp_audit(pooled_scores, pooled_included, delta, beta)
    epsilon = claim["epsilon"] if claim else None
    return {
        "attack": attack,
        "runs": [str(d.root) for d in directories],
        "trials": len(pooled_scores),
        "reported": claim,
        "multi_run": multi.as_dict(),
        "gaussian": gaussian.as_dict(),
        "violation": epsilon is not None and multi.epsilon_lower_bound > epsilon,
        "gaussian_violation": epsilon is not None and gaussian.epsilon_lower_bound > epsilon,
    }
