"""Membership attacks' ROC curves in `fedsim report`, and re-attacking a run with other settings.

The figure: one per attack, one curve per run on log-log axes with the chance diagonal, each
curve the run's empirical step curve (mean TPR over its targets); tests/test_report.py checks
them in a sweep's report files. `fedsim attack --set` on a run with shadows writes its own
result set and reuses shadows cached by an older fedsim.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import yaml
from cli_helpers import run_cli
from rich.console import Console

from fedsim.core.config import build_scenario
from fedsim.core.results import RunDirectory, atomic_write_json
from fedsim.data.datasets import federated_data
from fedsim.evaluation.membership import membership_scores, roc, save_roc
from fedsim.pipeline.shadows import pool_members, shadow_population, train_shadows
from fedsim.reporting.audit_figures import roc_figures, run_roc, tpr_on


def write_target(run: Path, attack: str, stem: str, scores: np.ndarray, truth: np.ndarray) -> float:
    """What the membership stage writes for one target: its record and its ROC curve."""
    result = membership_scores(scores, truth)
    out = run / "attacks" / attack
    save_roc(result.curve, out / f"{stem}.roc", stem)
    atomic_write_json(out / f"{stem}.json", {"attack": {"name": attack}, **result.as_dict()})
    return result.auc


def test_roc_figure_has_one_curve_per_run_on_log_axes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    truth = np.arange(300) < 100  # 100 members, 200 non-members
    runs = [tmp_path / "strong", tmp_path / "chance", tmp_path / "updates"]
    strong = write_target(runs[0], "lira", "final_model", truth + rng.normal(0, 0.5, 300), truth)
    chance = write_target(runs[1], "lira", "final_model", rng.normal(0, 1, 300), truth)
    first = rng.normal(0, 1, 300) + truth
    aucs = [write_target(runs[2], "update_membership", f"round_000{r}_client_0000", first * r, truth)
            for r in (1, 2)]  # fmt: skip
    assert strong > 0.9 and abs(chance - 0.5) < 0.1

    plots = {attack: plot for attack, plot, _ in roc_figures(runs, ["a", "b", "c"])}
    assert sorted(plots) == ["lira", "update_membership"]
    lira = plots["lira"].axes[0]
    assert lira.get_xscale() == "log" and lira.get_yscale() == "log"
    lines = {line.get_label(): line for line in lira.get_lines()}
    assert list(lines) == [f"a (AUC {strong:.3f})", f"b (AUC {chance:.3f})", "chance (TPR = FPR)"]
    diagonal = lines["chance (TPR = FPR)"].get_xydata()
    assert np.allclose(diagonal[:, 0], diagonal[:, 1]) and diagonal[-1, 0] == 1.0
    assert lira.get_xlim()[0] == 1 / 400  # half of one false positive among 200
    assert len(plots["update_membership"].axes[0].get_lines()) == 1 + 1  # run c only

    # each curve is the empirical step curve: at every FPR the best TPR reached at or below it
    curve = roc(truth + rng.normal(0, 0.5, 300), truth)
    for fpr in (0.0, 0.001, 0.005, 0.01, 0.1, 0.5, 1.0):
        assert tpr_on(curve, np.array([fpr]))[0] == curve.tpr_at_fpr(fpr)
    # two targets (rounds): the mean TPR at each FPR, the mean AUC
    both = run_roc(runs[2] / "attacks" / "update_membership")
    assert both is not None and both.targets == 2 and both.auc == np.mean(aucs)
    assert both.fpr[0] == 0 and both.tpr[-1] == 1.0 and np.all(np.diff(both.tpr) >= 0)


TINY = {
    "name": "tiny-lira",
    "data": {"dataset": "digits", "num_clients": 2, "test_fraction": 0.9, "val_fraction": 0.0},
    "model": {"name": "mlp", "hidden": [16]},
    "federation": {"rounds": 1},
    "observer": {"rounds": "none"},
    "attacks": [{"name": "lira", "shadows": 2}],
}


def test_reattack_with_other_settings_writes_beside_and_reuses_old_shadow_caches(tmp_path: Path) -> None:
    """`fedsim attack RUN --attack lira --set global_variance=false` on a run whose shadows an
    older fedsim cached (its scenario.yaml lacks a section added since) reuses them, and writes
    `attacks/lira-<hash>` without touching the scenario's own `attacks/lira`."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    code, out, err = run_cli("run", path, "--run-dir", tmp_path / "run")
    assert code == 0, (out, err)
    run = RunDirectory(tmp_path / "run")
    own = (run.attacks_dir / "lira" / "final_model.json").read_bytes()
    shadow = run.root / "cache" / "shadows" / "shadow_00"
    text = (shadow / "scenario.yaml").read_text()
    older = re.sub(r"^faults:\n(  .*\n)+", "", text, flags=re.MULTILINE)
    assert older != text  # as written before `faults` existed
    (shadow / "scenario.yaml").write_text(older)
    stamp = (shadow / "model.safetensors").stat().st_mtime_ns

    code, out, err = run_cli("attack", run.root, "--attack", "lira", "--set", "global_variance=false")
    assert code == 0, (out, err)
    assert (shadow / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained
    assert (shadow / "scenario.yaml").read_text() == text  # brought up to date
    assert (run.attacks_dir / "lira" / "final_model.json").read_bytes() == own
    (other,) = run.attacks_dir.glob("lira-*")
    record = json.loads((other / "final_model.json").read_text())
    assert record["attack"]["global_variance"] is False and f"results: {other}" in out
    summary = json.loads(run.summary_path.read_text())["attacks"]
    assert summary[other.name]["auc"] == record["auc"] and "lira" in summary


def test_a_shadow_cached_for_other_examples_is_trained_again(tmp_path: Path) -> None:
    scenario = build_scenario(TINY)
    data = federated_data(scenario.data, scenario.public().seed)
    candidates = np.flatnonzero(pool_members(data))
    population = shadow_population(data, candidates, np.random.default_rng(0))
    run = RunDirectory(tmp_path)
    first = train_shadows(run, scenario, 2, population, Console(quiet=True))
    other = shadow_population(data, candidates, np.random.default_rng(1))  # another recipe's split
    again = train_shadows(run, scenario, 2, other, Console(quiet=True))
    assert not np.array_equal(first[0].members, again[0].members)
    cached = yaml.safe_load((tmp_path / "cache" / "shadows" / "shadow_00" / "scenario.yaml").read_text())
    assert np.array_equal(np.flatnonzero(again[0].members), cached["data"]["train_pool"])


def test_each_audit_is_drawn_against_the_epsilon_of_the_level_it_audits() -> None:
    import pandas as pd

    from fedsim.reporting.audit_figures import empirical_vs_reported, reported_column

    assert reported_column("canary_gradient_audit") == "epsilon_example"
    assert reported_column("canary_client_audit") == "epsilon_client"
    summary = pd.DataFrame({
        "epsilon_example": [2.0, np.nan], "epsilon_client": [np.nan, 7.0],
        "canary_gradient_audit_epsilon_lower_bound": [1.1, np.nan],
        "canary_client_audit_epsilon_lower_bound": [np.nan, 5.3],
    })  # fmt: skip
    figure, caption = empirical_vs_reported(summary)
    points = {line.get_label(): (line.get_xdata(), line.get_ydata()) for line in figure.axes[0].lines}
    x, y = points["canary_client_audit (client-level)"]
    assert float(np.nanmax(np.asarray(y, dtype=float))) == 5.3 and 7.0 in np.asarray(x, dtype=float)
    assert "canary_client_audit: 0" in caption and "canary_gradient_audit: 0" in caption
