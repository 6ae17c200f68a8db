"""The audit figure: each audit's empirical epsilon lower bound against the reported epsilon.

A sound accountant keeps every point on or below the y = x line; a point above it is a privacy
bug (the audit's 95 % lower bound exceeds the epsilon the run reports). Runs without an
example-level epsilon (no DP) are drawn at the right edge, labelled "no DP".
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

BOUND = "_epsilon_lower_bound"
REPORTED = "epsilon_example"


def audits_of(summary: pd.DataFrame) -> list[str]:
    """Attacks with an epsilon lower bound in `summary` (columns `<attack>_epsilon_lower_bound`)."""
    return sorted(
        c.removesuffix(BOUND) for c in summary.columns if c.endswith(BOUND) and summary[c].notna().any()
    )


def empirical_vs_reported(summary: pd.DataFrame) -> tuple[Figure, str] | None:
    """Lower bound (y) against reported example-level epsilon (x) per audit, with y = x."""
    audits = audits_of(summary)
    if not audits:
        return None
    reported = pd.to_numeric(summary.get(REPORTED, pd.Series(np.nan, index=summary.index)), errors="coerce")
    finite = reported[np.isfinite(reported)]
    bounds = np.concatenate([summary[f"{a}{BOUND}"].dropna().to_numpy() for a in audits])
    edge = max([*finite.tolist(), *bounds.tolist(), 1.0]) * 1.25  # where "no DP" runs go
    x = reported.where(np.isfinite(reported), edge)
    figure = Figure(figsize=(5, 4.5))
    axes = figure.subplots()
    axes.plot([0, edge], [0, edge], "k--", linewidth=0.8, label="y = x (reported)")
    for audit in audits:
        axes.plot(x, summary[f"{audit}{BOUND}"], "o", label=audit)
    axes.axvline(edge, color="0.8", linewidth=0.8)
    axes.text(edge, 0, " no DP", rotation=90, va="bottom", ha="right", fontsize=8, color="0.4")
    axes.set(xlim=(0, edge * 1.05), ylim=(0, edge * 1.05), xlabel="reported epsilon (example-level)",
             ylabel="audited epsilon lower bound (95 %)")  # fmt: skip
    axes.legend(loc="upper left", fontsize=8)
    above = [
        f"{a}: {int((summary[f'{a}{BOUND}'] > reported).sum())}" for a in audits
    ]  # points above the line: each a privacy bug
    caption = (
        "Each audit's one-run epsilon lower bound against the reported example-level epsilon; "
        f"points above y = x contradict the accountant ({', '.join(above)}). "
        f"No-DP runs at the right edge (x = {edge:.3g} stands for infinity)."
    )
    return figure, caption
