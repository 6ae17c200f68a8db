"""The empirical-privacy figures: audits' epsilon lower bounds, membership ROC curves.

`empirical_vs_reported`: each audit's lower bound against the reported epsilon of the level
it audits (example-level, or client-level for `canary_client_audit`: the attack's
`audited_level`). A sound accountant keeps every point on or below the y = x line; a point
above it is a privacy bug (the audit's 95 % lower bound exceeds the epsilon the run reports).
Runs without such an epsilon (no DP) are drawn at the right edge, labelled "no DP".

`roc_figures`: per membership attack, one ROC curve per run, on log-log axes as Carlini et al.
(2022) plot them (the low-FPR corner is what an attacker can act on), with the chance diagonal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fedsim.core.registry import ATTACKS
from fedsim.core.results import RunDirectory, read_record
from fedsim.evaluation.membership import RocCurve, load_roc

BOUND = "_epsilon_lower_bound"


def reported_column(audit: str) -> str:
    """The summary column of the reported epsilon `audit` is compared with (`epsilon_<level>`)."""
    return f"epsilon_{getattr(ATTACKS.get(audit), 'audited_level', 'example')}"


def audits_of(summary: pd.DataFrame) -> list[str]:
    """Attacks with an epsilon lower bound in `summary` (columns `<attack>_epsilon_lower_bound`)."""
    return sorted(
        c.removesuffix(BOUND) for c in summary.columns if c.endswith(BOUND) and summary[c].notna().any()
    )


def empirical_vs_reported(summary: pd.DataFrame) -> tuple[Figure, str] | None:
    """Lower bound (y) against the reported epsilon of its level (x) per audit, with y = x."""
    audits = audits_of(summary)
    if not audits:
        return None
    missing = pd.Series(np.nan, index=summary.index)
    reported = {a: pd.to_numeric(summary.get(reported_column(a), missing), errors="coerce") for a in audits}
    finite = [v for r in reported.values() for v in r[np.isfinite(r)].tolist()]
    bounds = np.concatenate([summary[f"{a}{BOUND}"].dropna().to_numpy() for a in audits])
    edge = max([*finite, *bounds.tolist(), 1.0]) * 1.25  # where "no DP" runs go
    figure = Figure(figsize=(5, 4.5))
    axes = figure.subplots()
    axes.plot([0, edge], [0, edge], "k--", linewidth=0.8, label="y = x (reported)")
    for audit in audits:
        x = reported[audit].where(np.isfinite(reported[audit]), edge)
        axes.plot(x, summary[f"{audit}{BOUND}"], "o", label=f"{audit} ({reported_column(audit).removeprefix('epsilon_')}-level)")
    axes.axvline(edge, color="0.8", linewidth=0.8)
    axes.text(edge, 0, " no DP", rotation=90, va="bottom", ha="right", fontsize=8, color="0.4")
    axes.set(xlim=(0, edge * 1.05), ylim=(0, edge * 1.05), xlabel="reported epsilon (of the audited level)",
             ylabel="audited epsilon lower bound (95 %)")  # fmt: skip
    axes.legend(loc="upper left", fontsize=8)
    above = [
        f"{a}: {int((summary[f'{a}{BOUND}'] > reported[a]).sum())}" for a in audits
    ]  # points above the line: each a privacy bug
    caption = (
        "Each audit's one-run epsilon lower bound against the reported epsilon of the level it "
        "audits (example or client); "
        f"points above y = x contradict the accountant ({', '.join(above)}). "
        f"No-DP runs at the right edge (x = {edge:.3g} stands for infinity)."
    )
    return figure, caption


ROC_SUFFIX = ".roc.json"
ROC_GRID_POINTS = 400


@dataclass(frozen=True)
class RunRoc:
    """One run's ROC curve for one attack: the TPR on `fpr` (mean over the attack's targets,
    e.g. its observed rounds) and the attack's mean AUC as summary.json reports it."""

    fpr: np.ndarray
    tpr: np.ndarray
    auc: float
    targets: int


def tpr_on(curve: RocCurve, fpr: np.ndarray) -> np.ndarray:
    """The curve's TPR at each FPR in `fpr`: the largest TPR of a point with FPR <= it (the
    empirical step curve, read as `RocCurve.tpr_at_fpr` reads it; no interpolation)."""
    order = np.searchsorted(curve.fpr, fpr, side="right") - 1
    return np.maximum.accumulate(curve.tpr)[order]


def run_roc(directory: Path) -> RunRoc | None:
    """The ROC of the membership attack whose results are in `directory`
    (`attacks/<name>/*.roc.json`), vertically averaged over its targets (Fawcett 2006) on a
    log-spaced FPR grid down to half of one false positive; None if it saved none."""
    paths = sorted(directory.glob(f"*{ROC_SUFFIX}"))
    if not paths:
        return None
    curves = [load_roc(p) for p in paths]
    floor = 1.0 / (2 * max(c.non_members for c in curves))
    fpr = np.concatenate([[0.0], np.geomspace(floor, 1.0, ROC_GRID_POINTS)])
    tpr = np.mean([tpr_on(c, fpr) for c in curves], axis=0)
    records = [read_record(p.with_name(p.name.removesuffix(ROC_SUFFIX) + ".json")) for p in paths]
    return RunRoc(fpr, tpr, float(np.mean([r["auc"] for r in records])), len(paths))


def roc_attacks(run_dirs: Sequence[Path | str]) -> list[str]:
    """The result folders (`attacks/<name>`, one per attack and settings) with a saved ROC
    curve in any of `run_dirs`."""
    return sorted(
        {p.parent.name for d in run_dirs for p in RunDirectory(d).attacks_dir.glob(f"*/*{ROC_SUFFIX}")}
    )


def roc_figures(run_dirs: Sequence[Path | str], labels: Sequence[str]) -> list[tuple[str, Figure, str]]:
    """(attack, figure, caption) per membership attack: one curve per run, labelled with
    `labels` (the runs' short setting labels) and the run's AUC, and the chance diagonal."""
    out = []
    for attack in roc_attacks(run_dirs):
        curves = [(label, run_roc(RunDirectory(d).attacks_dir / attack)) for d, label in zip(run_dirs, labels)]
        drawn = [(label, c) for label, c in curves if c is not None]
        floor = min(c.fpr[1] for _, c in drawn)
        figure = Figure(figsize=(5.0, 4.6))  # the legend goes right of it (png's tight box)
        axes = figure.subplots()
        styles = ("-", "--", "-.", ":")
        for rank, (label, curve) in enumerate(drawn):
            axes.plot(
                np.maximum(curve.fpr, floor), np.maximum(curve.tpr, floor),
                linestyle=styles[rank // 10 % len(styles)], linewidth=1.4, label=f"{label} (AUC {curve.auc:.3f})",
            )  # fmt: skip
        axes.plot([floor, 1], [floor, 1], "k:", linewidth=0.9, label="chance (TPR = FPR)")
        axes.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1.05))
        axes.set_xlabel("false-positive rate (log)", fontsize=10)
        axes.set_ylabel("true-positive rate (log)", fontsize=10)
        axes.set_title(f"ROC: {attack}", fontsize=11)
        axes.grid(alpha=0.3, which="both")
        axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
        figure.subplots_adjust(left=0.15, right=0.97, bottom=0.12, top=0.92)
        averaged = any(c.targets > 1 for _, c in drawn)
        caption = (
            f"{attack}: one curve per run ({len(drawn)}), log-log; the dotted diagonal is chance. "
            + ("Runs with several targets (observed rounds) show their mean TPR at each FPR. " if averaged else "")
            + "Rates of 0 are drawn at the axes' floor (half of one false positive)."
        )
        out.append((attack, figure, caption))
    return out
