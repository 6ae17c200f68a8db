"""The report's plots (matplotlib, Agg canvas, no pyplot state), from a seed summary table.

Every plot takes `fedsim.experiments.sweep_table.seed_summary` output: one row per combination of axis
values, metric means in column M and the spread over seeds in M_std (drawn as error bars).
"""

from __future__ import annotations

import io
import json
import math
import textwrap
from collections.abc import Sequence
from typing import Any

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


def parse_value(value: Any) -> Any:
    """An axis value as swept: the results table keeps lists and mappings as JSON text."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def is_plugin_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) and "name" in v for v in value)


def compact(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def axis_labels(values: Sequence[Any]) -> list[str]:
    """Short text for each value of one axis: numbers as %g; a list of plugins (a `defenses`
    axis) as 'none' or each plugin's name with the parameters that tell its values on this
    axis apart, e.g. 'dp_sgd noise_multiplier=0.5' (all its parameters if it appears once)."""
    parsed = [parse_value(v) for v in values]
    variants: dict[str, dict[str, dict]] = {}
    for value in parsed:
        for spec in value if is_plugin_list(value) else []:
            variants.setdefault(spec["name"], {})[json.dumps(spec, sort_keys=True)] = spec

    def telling(name: str) -> list[str]:
        specs = list(variants[name].values())
        keys = list(dict.fromkeys(k for spec in specs for k in spec if k != "name"))
        if len(specs) == 1:
            return keys
        return [k for k in keys if len({json.dumps(spec.get(k)) for spec in specs}) > 1]

    def label(value: Any) -> str:
        if not is_plugin_list(value):
            return compact(value)
        if not value:
            return "none"
        return " + ".join(
            " ".join([spec["name"], *(f"{k}={compact(spec[k])}" for k in telling(spec["name"]) if k in spec)])
            for spec in value
        )

    return [label(value) for value in parsed]


def combination_labels(summary: pd.DataFrame, axes: Sequence[str]) -> list[str]:
    """'noise_multiplier=0.1, keep_fraction=0.5' for every row; a list-valued axis by its
    short labels ('dp_sgd noise_multiplier=0.5'), without the axis name."""
    short = short_names(axes)
    columns = {a: axis_labels(summary[a].tolist()) for a in axes}
    return [
        ", ".join(
            columns[a][i] if is_plugin_list(parse_value(summary[a].iloc[i])) else f"{short[a]}={columns[a][i]}"
            for a in axes
        )
        for i in range(len(summary))
    ]


def point_numbers(summary: pd.DataFrame) -> list[str]:
    """'1', '2', ...: how plots name the settings, matching the report tables' '#' column."""
    return [str(i + 1) for i in range(len(summary))]


def annotate_points(plot: Axes, xs: Sequence[float], ys: Sequence[float], names: Sequence[str]) -> None:
    """Write each point's number beside it; points at one spot share one label ('2, 5'), and
    neighbours alternate sides so their labels do not sit on each other."""
    spots: dict[tuple[float, float], list[str]] = {}
    for x, y, name in zip(xs, ys, names):
        if np.isfinite(x) and np.isfinite(y):
            spots.setdefault((round(float(x), 3), round(float(y), 4)), []).append(name)
    offsets = ((5, 4), (5, -11), (-8, 4), (-8, -11))
    for rank, ((x, y), shared) in enumerate(sorted(spots.items())):
        dx, dy = offsets[rank % len(offsets)]
        plot.annotate(
            ", ".join(shared), (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
            ha="left" if dx > 0 else "right",
        )


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
        numbers = [n for n, keep in zip(point_numbers(summary), np.isfinite(summary[column].astype(float))) if keep]
        annotate_points(axis, finite[column].tolist(), finite[ACCURACY].tolist(), numbers)
        axis.set_xscale("log")
        axis.set_xlabel(epsilon_label(finite, column), fontsize=8)
        axis.set_ylabel("final test accuracy")
        axis.set_title(f"accuracy vs {column.removeprefix('epsilon_')}-kind epsilon")
        axis.grid(alpha=0.3)
        if infinite := int(np.isinf(summary[column].astype(float)).sum()):
            left_out.append(f"{infinite} with infinite {column}")
    figure.tight_layout()
    caption = "Mean ± std over seeds; one panel per kind of guarantee; numbers are the settings' #." + (
        f" Not shown (no noise): {', '.join(left_out)}." if left_out else ""
    )
    return figure, caption


def epsilon_label(summary: pd.DataFrame, column: str) -> str:
    """'epsilon (example-level, add/remove, delta=1e-05 (prv), dp_sgd)', wrapped to fit."""
    units = sorted({u for u in summary.get(f"{column}_unit", []) if isinstance(u, str) and u})
    text = f"epsilon ({'; '.join(units) or 'unit not recorded'})"
    return "\n".join(textwrap.wrap(text, 70))


def strength_positions(values: pd.Series) -> tuple[pd.Series, list[str] | None]:
    """x positions of an axis's values: the numbers, or 0..n-1 for text and lists (with their
    short labels as ticks, in sweep order)."""
    if pd.api.types.is_numeric_dtype(values):
        return values.astype(float), None
    order = list(dict.fromkeys(values))
    return values.map(order.index).astype(float), axis_labels(order)


def leakage_vs_strength(summary: pd.DataFrame, axes: Sequence[str], axis_name: str) -> Figure:
    """Utility and every leakage metric against one axis (the defense strength).

    One line per attack and per combination of the other axes' values. A numeric axis gets
    its panels side by side; a categorical one (text, a list of defenses) one panel per row,
    wide enough for its labels, which are written once under the last panel.
    """
    others = [a for a in axes if a != axis_name]
    categorical = not pd.api.types.is_numeric_dtype(summary[axis_name])
    order = "index" if categorical else axis_name
    other_labels = pd.Series(combination_labels(summary, others), index=summary.index) if others else None
    groups = summary.groupby(others, sort=False) if others else [((), summary)]
    metrics = leakage_metrics(summary)
    panels = [ACCURACY, *metrics]
    _, ticks = strength_positions(summary[axis_name])
    if ticks is not None:
        width = max(6.0, 0.55 * len(ticks) + 2.5)
        figure = Figure(figsize=(width, 2.6 * len(panels) + 1.2))
        plots = np.atleast_1d(figure.subplots(len(panels), 1, sharex=True))
    else:
        figure = Figure(figsize=(4.0 * len(panels), 3.6))
        plots = np.atleast_1d(figure.subplots(1, len(panels)))
    for _, group in groups:
        group = group.sort_values(order)
        x = strength_positions(summary[axis_name])[0].loc[group.index]
        suffix = f" ({other_labels[group.index[0]]})" if other_labels is not None else ""
        errorbar(plots[0], x, ACCURACY, group, label=f"accuracy{suffix}")
        for panel, metric in zip(plots[1:], metrics):
            for attack in attacks_of(group, metric):
                errorbar(panel, x, f"{attack}_{metric}", group, label=f"{attack}{suffix}")
    short = short_names(axes)[axis_name]
    values = strength_positions(summary[axis_name])[0]
    for panel, metric in zip(plots, panels):
        panel.set_title("final test accuracy" if metric == ACCURACY else LEAKAGE_LABELS[metric], fontsize=10)
        panel.grid(alpha=0.3)
        panel.legend(fontsize=7)
        if ticks is None:
            panel.set_xlabel(short)
            if (values > 0).sum() >= 2 and values.max() / values[values > 0].min() >= 20:
                panel.set_xscale("symlog", linthresh=values[values > 0].min())
    if ticks is not None:
        plots[-1].set_xticks(range(len(ticks)), ticks, rotation=35, ha="right", fontsize=8)
        plots[-1].set_xlabel(short)
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
    """Final accuracy against each attack's headline leakage, with the Pareto frontier drawn;
    each point is numbered by its setting's # in the report's tables."""
    attacks = attacks_of(summary)
    if not attacks:
        return None
    figure = Figure(figsize=(5.5 * len(attacks), 4.2))
    plots = np.atleast_1d(figure.subplots(1, len(attacks)))
    numbers = point_numbers(summary)
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
        if len(front) > 1:
            plot.step(front[leak], front[ACCURACY], where="post", color="tab:red")
        plot.scatter(  # markers too, so a frontier of one setting shows
            front[leak], front[ACCURACY], color="tab:red", s=40, zorder=3, label="Pareto frontier"
        )
        annotate_points(plot, summary[leak].tolist(), summary[ACCURACY].tolist(), numbers)
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
