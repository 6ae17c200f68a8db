"""The report's plots (matplotlib, Agg canvas, no pyplot state), from a seed summary table.

Every plot takes `fedsim.experiments.sweep_table.seed_summary` output: one row per combination of axis
values, metric means in column M and the spread over seeds in M_std (drawn as error bars).
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedsim.experiments.sweep_spec import short_names
from fedsim.experiments.sweep_table import LEAKAGE, MODEL_LEAKAGE, PRIVACY

LEAKAGE_LABELS = {
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "label_accuracy": "label accuracy",
    "top1_accuracy": "attack top-1 accuracy",
    "top5_accuracy": "attack top-5 accuracy",
    "knn_distance": "KNN distance to private data",
}
HEADLINE = ("psnr", "top1_accuracy")
"""The leakage score the Pareto frontier uses (lower = less leakage): gradient attacks' PSNR,
else model-inversion attacks' top-1 accuracy under the evaluation classifier."""
ACCURACY = "final_test_accuracy"


def png(figure: Figure) -> bytes:
    """The figure as PNG bytes (100 dpi)."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def combination_labels(summary: pd.DataFrame, axes: Sequence[str]) -> list[str]:
    """'noise_multiplier=0.1, keep_fraction=0.5' for every row."""
    short = short_names(axes)
    return [
        ", ".join(
            f"{short[a]}={row[a]:g}" if isinstance(row[a], float) else f"{short[a]}={row[a]}"
            for a in axes
        )
        for _, row in summary.iterrows()
    ]


def attacks_of(summary: pd.DataFrame, metric: str | None = None) -> list[str]:
    """Attacks with a score in `summary` (for `metric`, or for any leakage metric)."""
    metrics = [metric] if metric else [*LEAKAGE, *MODEL_LEAKAGE]
    return sorted(
        {
            column.removesuffix(f"_{m}")
            for column in summary.columns
            for m in metrics
            if column.endswith(f"_{m}") and summary[column].notna().any()
        }
    )


def leakage_metrics(summary: pd.DataFrame) -> list[str]:
    """The leakage metrics some attack in `summary` has a value for, in a fixed order."""
    return [m for m in (*LEAKAGE, *MODEL_LEAKAGE) if attacks_of(summary, m)]


def headline(summary: pd.DataFrame, attack: str) -> str:
    """The column of `attack`'s headline leakage score (see HEADLINE)."""
    return next(f"{attack}_{m}" for m in HEADLINE if f"{attack}_{m}" in summary)


def errorbar(
    axis: Axes,
    x: pd.Series,
    y: str,
    summary: pd.DataFrame,
    xerr: pd.Series | None = None,
    **style: object,
) -> None:
    axis.errorbar(
        x, summary[y], yerr=summary[f"{y}_std"], xerr=xerr, capsize=3, marker="o", **style
    )


def accuracy_vs_epsilon(summary: pd.DataFrame, axes: Sequence[str]) -> tuple[Figure, str] | None:
    """Final test accuracy against epsilon (log scale), one panel per kind of guarantee.

    Example-level and client-level epsilons measure different things, so they never share
    an axis; each x label names its unit (level, relation, delta, accountant, defense).
    None without any finite epsilon.
    """
    kinds = [
        c for c in PRIVACY if c in summary and np.isfinite(summary[c].astype(float)).any()
    ]
    if not kinds:
        return None
    figure = Figure(figsize=(6.5 * len(kinds), 4.4))
    plots = np.atleast_1d(figure.subplots(1, len(kinds)))
    left_out = []
    for axis, column in zip(plots, kinds):
        finite = summary[np.isfinite(summary[column].astype(float))]
        errorbar(
            axis, finite[column], ACCURACY, finite, xerr=finite[f"{column}_std"], linestyle="none"
        )
        for label, (_, row) in zip(combination_labels(finite, axes), finite.iterrows()):
            axis.annotate(
                label, (row[column], row[ACCURACY]), textcoords="offset points", xytext=(5, 5), fontsize=7
            )
        axis.set_xscale("log")
        axis.set_xlabel(epsilon_label(finite, column), fontsize=8)
        axis.set_ylabel("final test accuracy")
        axis.set_title(f"accuracy vs {column.removeprefix('epsilon_')}-kind epsilon")
        axis.grid(alpha=0.3)
        if infinite := int(np.isinf(summary[column].astype(float)).sum()):
            left_out.append(f"{infinite} with infinite {column}")
    figure.tight_layout()
    caption = "Mean ± std over seeds; one panel per kind of guarantee." + (
        f" Not shown (no noise): {', '.join(left_out)}." if left_out else ""
    )
    return figure, caption


def epsilon_label(summary: pd.DataFrame, column: str) -> str:
    """'epsilon (example-level, add/remove, delta=1e-05 (prv), dp_sgd)', wrapped to fit."""
    units = sorted({u for u in summary.get(f"{column}_unit", []) if isinstance(u, str) and u})
    text = f"epsilon ({'; '.join(units) or 'unit not recorded'})"
    return "\n".join(textwrap.wrap(text, 70))


def strength_positions(values: pd.Series) -> tuple[pd.Series, list[str] | None]:
    """x positions of an axis's values: the numbers, or 0..n-1 for text (with tick labels)."""
    if pd.api.types.is_numeric_dtype(values):
        return values.astype(float), None
    order = list(dict.fromkeys(values))
    return values.map(order.index).astype(float), order


def leakage_vs_strength(summary: pd.DataFrame, axes: Sequence[str], axis_name: str) -> Figure:
    """Utility and every leakage metric against one axis (the defense strength).

    One line per attack and per combination of the other axes' values.
    """
    others = [a for a in axes if a != axis_name]
    groups = summary.groupby(others, sort=False) if others else [((), summary)]
    metrics = leakage_metrics(summary)
    panels = [ACCURACY, *metrics]
    figure = Figure(figsize=(4.0 * len(panels), 3.6))
    plots = np.atleast_1d(figure.subplots(1, len(panels)))
    for _, group in groups:
        group = group.sort_values(axis_name)
        x, ticks = strength_positions(group[axis_name])
        suffix = f" ({', '.join(combination_labels(group.head(1), others))})" if others else ""
        errorbar(plots[0], x, ACCURACY, group, label=f"accuracy{suffix}")
        for panel, metric in zip(plots[1:], metrics):
            for attack in attacks_of(group, metric):
                errorbar(panel, x, f"{attack}_{metric}", group, label=f"{attack}{suffix}")
    short = short_names(axes)[axis_name]
    for panel, metric in zip(plots, panels):
        panel.set_title("final test accuracy" if metric == ACCURACY else LEAKAGE_LABELS[metric])
        panel.set_xlabel(short)
        panel.grid(alpha=0.3)
        if ticks is not None:
            panel.set_xticks(range(len(ticks)), ticks, rotation=30, ha="right", fontsize=7)
        elif (x > 0).sum() >= 2 and x.max() / x[x > 0].min() >= 20:
            panel.set_xscale("symlog", linthresh=x[x > 0].min())
        panel.legend(fontsize=7)
    figure.tight_layout()
    return figure


def pareto_front(leakage: Sequence[float], utility: Sequence[float]) -> list[bool]:
    """True for each point no other point beats: none has less-or-equal leakage and
    greater-or-equal utility with one of them strictly better. NaNs are never on the front."""
    points = list(zip(leakage, utility))
    front = []
    for i, (leak, util) in enumerate(points):
        if math.isnan(leak) or math.isnan(util):
            front.append(False)
            continue
        front.append(
            not any(
                j != i and lj <= leak and uj >= util and (lj < leak or uj > util)
                for j, (lj, uj) in enumerate(points)
            )
        )
    return front


def pareto(summary: pd.DataFrame, axes: Sequence[str]) -> Figure | None:
    """Final accuracy against each attack's headline leakage, with the Pareto frontier drawn."""
    attacks = attacks_of(summary)
    if not attacks:
        return None
    figure = Figure(figsize=(5.5 * len(attacks), 4.2))
    plots = np.atleast_1d(figure.subplots(1, len(attacks)))
    labels = combination_labels(summary, axes)
    for plot, attack in zip(plots, attacks):
        leak = headline(summary, attack)
        plot.errorbar(
            summary[leak],
            summary[ACCURACY],
            xerr=summary[f"{leak}_std"],
            yerr=summary[f"{ACCURACY}_std"],
            capsize=3,
            marker="o",
            linestyle="none",
            color="tab:gray",
            label="settings",
        )
        front = summary[
            pareto_front(summary[leak].tolist(), summary[ACCURACY].tolist())
        ].sort_values(leak)
        plot.step(
            front[leak],
            front[ACCURACY],
            where="post",
            color="tab:red",
            marker="o",
            label="Pareto frontier",
        )
        for label, (_, row) in zip(labels, summary.iterrows()):
            plot.annotate(
                label,
                (row[leak], row[ACCURACY]),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=7,
            )
        metric = LEAKAGE_LABELS[leak.removeprefix(f"{attack}_")]
        plot.set_xlabel(f"{attack} {metric} (lower = less leakage)")
        plot.set_ylabel("final test accuracy")
        plot.set_title(f"utility vs leakage: {attack}")
        plot.grid(alpha=0.3)
        plot.legend(fontsize=7)
    figure.tight_layout()
    return figure


def rounds_figure(metrics: pd.DataFrame) -> Figure:
    """A single run: test accuracy per round, and one panel of epsilon per round for each
    kind of guarantee (from the records' `privacy` entries), labelled with its unit."""
    entries = metrics["privacy"].iloc[-1] if "privacy" in metrics else []
    kinds: dict[str, list[dict]] = {}
    for entry in entries:
        kinds.setdefault(entry["kind"], []).append(entry)
    figure = Figure(figsize=(5.0 * (1 + len(kinds)), 3.8))
    plots = np.atleast_1d(figure.subplots(1, 1 + len(kinds)))
    plots[0].plot(metrics["round"], metrics["test_accuracy"], marker=".")
    plots[0].set(xlabel="round", ylabel="test accuracy", title="test accuracy")
    for plot, (kind, same_kind) in zip(plots[1:], kinds.items()):
        for entry in same_kind:
            plot.plot(metrics["round"], metrics[entry["key"]], marker=".", label=entry["key"])
        units = "; ".join(entry["unit"] for entry in same_kind)
        plot.set_ylabel("\n".join(textwrap.wrap(f"epsilon ({units})", 45)), fontsize=8)
        plot.set(xlabel="round", title=f"privacy spent: {kind}")
        plot.legend(fontsize=7)
    for plot in plots:
        plot.grid(alpha=0.3)
    figure.tight_layout()
    return figure
