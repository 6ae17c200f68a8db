"""White-box DP audit with Dirac gradient canaries: empirical against reported epsilon.

Runs scenarios/dp_audit_gradient.yaml (8 clients, one full-batch DP-SGD step per round, 2,000
gradient canaries, every update observed) at each noise multiplier, with the correct
mechanism and with a buggy one (Opacus's noise divided by 10, the accountant unchanged), and
prints the one-run lower bound next to the reported epsilon. For reference it also prints what
the same estimator reaches on ideal scores of the same Gaussian mechanism (mu = sqrt(rounds) /
sigma per canary; the median over 12 draws of 2,000 canaries): what a perfect attack gets.

    python benchmarks/gradient_audit.py                  # 4 rounds; sigma 1, 2, 4, 8, clipping only
    python benchmarks/gradient_audit.py --rounds 1 --noise 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import opacus.optimizers.optimizer as hooks_optimizer
import opacus.optimizers.optimizer_fast_gradient_clipping as ghost_optimizer

import fedsim
from fedsim.evaluation.auditing import one_run_audit

SCENARIO = "scenarios/dp_audit_gradient.yaml"


def audit(noise: float, rounds: int, clip: float, buggy: bool, out: Path) -> dict[str, Any]:
    """The audit record of one run (`buggy`: the noise Opacus draws is divided by 10)."""
    generate = hooks_optimizer._generate_noise
    if buggy:  # both modes' optimizers (an MLP trains in ghost mode)
        hooks_optimizer._generate_noise = ghost_optimizer._generate_noise = (
            lambda std, *a, **k: generate(std / 10, *a, **k)
        )
    try:
        started = time.perf_counter()
        scenario = fedsim.scenario(
            SCENARIO, f"defenses.0.noise_multiplier={noise}", f"defenses.0.max_grad_norm={clip}",
            f"federation.rounds={rounds}",
        )
        run = fedsim.run(scenario, run_dir=out)
        record = json.loads((run.path / "attacks" / "canary_gradient_audit" / "audit.json").read_text())
        return {**record, "seconds": time.perf_counter() - started}
    finally:
        hooks_optimizer._generate_noise = ghost_optimizer._generate_noise = generate


def ideal_bound(mu: float, canaries: int = 2000, draws: int = 12) -> float:
    """The one-run bound on exact Gaussian scores (in ~ N(mu, 1), out ~ N(0, 1)): median of draws."""
    bounds = []
    for seed in range(draws):
        rng = np.random.default_rng(seed)
        included = rng.random(canaries) < 0.5
        bounds.append(one_run_audit(rng.normal(size=canaries) + mu * included, included, 1e-5).epsilon_lower_bound)
    return float(np.median(bounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0, 0.0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clip", type=float, default=10.0, help="max_grad_norm C (the canaries' norm)")
    args = parser.parse_args()
    print("| sigma | mechanism | reported epsilon | lower bound | ratio | ideal Gaussian bound | canary AUC | correct / guesses | violation | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for noise in args.noise:
            for buggy in (False, True) if noise else (False,):
                r = audit(noise, args.rounds, args.clip, buggy, Path(tmp) / f"{noise}-{buggy}")
                reported = r["reported"]["epsilon"] or math.inf  # null: clipping only
                bound = r["epsilon_lower_bound"]
                ideal = f"{ideal_bound(math.sqrt(args.rounds) / noise):.2f}" if noise and not buggy else "-"
                ratio = f"{bound / reported:.2f}" if math.isfinite(reported) else "-"
                print(
                    f"| {noise:g} | {'noise / 10' if buggy else 'correct'} | {reported:.2f} | {bound:.2f} | "
                    f"{ratio} | {ideal} | {r['auc']:.3f} | {r['audit']['correct']} / {r['audit']['guesses']} | "
                    f"{r['violation']} | {r['seconds']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
