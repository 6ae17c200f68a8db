"""MID vs DP-SGD against model inversion: one table and one plot from one sweep.

    python benchmarks/mid_vs_dp.py [scenarios/sweeps/mid_vs_dp.yaml]
        [--attack ked_mi --set iterations=600 ...]

Runs every cell of the sweep (every defense setting at every seed in its `seeds`; resuming:
a finished cell is not recomputed) one after the other in this process, then writes into the
sweep directory

    mid_vs_dp.csv   one row per cell: defense, target test accuracy, epsilon_example, per attack
                    top-1 / top-5 attack accuracy and KNN distance
    mid_vs_dp.md    the same, averaged over seeds (mean and standard deviation)
    mid_vs_dp.png   target test accuracy against attack accuracy (top) and KNN distance
                    (bottom), one column per attack
    images_<attack>_<defense>.png   each private class's reconstructions (first seed)

`--attack NAME` (with `--set` parameters, as `fedsim attack`) also runs that attack on every
finished cell, without retraining, before the table is made.

The evaluation classifier and the GAN depend only on the data, their params and the seed
(their cache keys say so), so every cell of a seed reuses the first cell's copies (hard links
into each run's cache) instead of training them again.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.image import imread, imsave
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console

from fedsim.core.config import PluginSpec, Scenario, build_scenario
from fedsim.data.datasets import federated_data
from fedsim.pipeline.model_leakage import CACHE
from fedsim.core.privacy import by_kind
from fedsim.core.results import RunDirectory, atomic_write_bytes, read_json
from fedsim.pipeline.runner import attack_run, run_scenario, write_summary
from fedsim.experiments.sweep_spec import Cell, load_sweep

SWEEP = Path(__file__).resolve().parent.parent / "scenarios" / "sweeps" / "mid_vs_dp.yaml"
FAMILIES = {"none": ("black", "o"), "mid": ("tab:blue", "s"), "dp_sgd": ("tab:red", "^")}


def defense_label(defenses: list[PluginSpec]) -> tuple[str, str, float]:
    """(family, label, strength): 'none', 'mid' (beta) or 'dp_sgd' (noise multiplier)."""
    if not defenses:
        return "none", "no defense", 0.0
    spec = defenses[0]
    if spec.name == "mid":
        return "mid", f"MID beta={spec.params.beta:g}", spec.params.beta
    if spec.name == "dp_sgd":
        sigma = spec.params.noise_multiplier
        return "dp_sgd", f"DP-SGD sigma={sigma:g}", sigma
    return spec.name, spec.name, 0.0


def share_caches(source: Path, run_dir: Path) -> None:
    """Hard-link the evaluator and GAN files of an earlier cell (same keys, same content)."""
    target = run_dir / CACHE
    target.mkdir(parents=True, exist_ok=True)
    for path in source.glob("*.safetensors"):
        if not (target / path.name).exists():
            os.link(path, target / path.name)


def run_cells(cells: list[Cell], directory: Path, console: Console) -> list[Path]:
    first_of_seed: dict[int, Path] = {}
    run_dirs = []
    for cell in cells:
        run_dir = directory / cell.name
        if cell.seed in first_of_seed:
            share_caches(first_of_seed[cell.seed], run_dir)
        console.rule(f"{cell.name}: {defense_label(cell.scenario.defenses)[1]}")
        run_scenario(cell.scenario, run_dir, console)
        first_of_seed.setdefault(cell.seed, run_dir / CACHE)
        run_dirs.append(run_dir)
    return run_dirs


def attack_existing_run(
    scenario: Scenario, run: RunDirectory, name: str, overrides: list[str], console: Console
) -> None:
    """What `fedsim attack RUN --attack NAME --set ...` does, for one cell."""
    raw = scenario.model_dump(mode="json") | {"attacks": [{"name": name}]}
    specs = build_scenario(raw, [f"attacks.0.{o}" for o in overrides]).attacks
    console.rule(f"{run.root.name}: {name}")
    attack_run(run, scenario, specs, console)
    write_summary(run, scenario)


def row(cell: Cell, run_dir: Path) -> dict[str, Any]:
    summary = read_json(RunDirectory(run_dir).summary_path)
    family, label, strength = defense_label(cell.scenario.defenses)
    record: dict[str, Any] = {
        "index": cell.index,
        "seed": cell.seed,
        "family": family,
        "defense": label,
        "strength": strength,
        "target_test_accuracy": summary["training"]["final_test_accuracy"],
        # DP-SGD's example-level epsilon (its unit is in summary.json's privacy entry)
        "epsilon_example": by_kind(summary["privacy"]).get("example", (None, ""))[0],
    }
    attacks = dict(sorted(summary["attacks"].items()))
    for attack, scores in attacks.items():
        for key in ("top1_accuracy", "top5_accuracy", "knn_distance"):
            record[f"{attack}_{key}"] = scores.get(key)
    # the zero-effort baseline depends on the target and the public data only (a MID target
    # samples, so each attack's copy differs a little): their mean
    for key in ("public_baseline_top1", "public_baseline_knn"):
        record[key] = sum(scores[key] for scores in attacks.values()) / len(attacks)
    record["evaluator_test_accuracy"] = next(iter(attacks.values()))["evaluator_test_accuracy"]
    record["run_dir"] = str(run_dir)
    return record


def seed_means(table: pd.DataFrame) -> pd.DataFrame:
    """Mean (and std where there are several seeds) of every number, per defense setting."""
    labels = ("index", "seed", "family", "defense", "run_dir")
    numbers = [c for c in table.columns if c not in labels]
    grouped = table.groupby(["index", "family", "defense"], sort=True)[numbers]
    means = grouped.mean()
    if table["seed"].nunique() > 1:
        means = means.join(grouped.std().add_suffix("_std"))
    means.insert(0, "seeds", grouped.size())
    order = {family: rank for rank, family in enumerate(FAMILIES)}
    means = means.reset_index().drop(columns="index")
    return means.sort_values(
        ["family", "strength"], key=lambda c: c.map(order) if c.name == "family" else c
    )


def markdown(table: pd.DataFrame, chance: float) -> str:
    """The table as Markdown, numbers as 'mean +- std' when there are several seeds."""
    columns = [c for c in table.columns if not c.endswith("_std")]
    lines = [
        f"Attack accuracy = top-1 of the evaluation classifier (chance {chance:.2f}); "
        "KNN = feature distance to the nearest private example of the class (lower = closer); "
        "public_baseline = the same scores for the public images the target is surest belong "
        "to the class (an attack that optimises nothing).",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for _, values in table.iterrows():
        cells = []
        for column in columns:
            value, spread = values[column], values.get(f"{column}_std")
            if not isinstance(value, float):
                text = str(value)
            elif pd.isna(value):
                text = "-"
            else:
                with_spread = spread is not None and column != "strength"
                text = f"{value:.3f}" + (f" ± {spread:.3f}" if with_spread else "")
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def stack_class_grids(run_dir: Path, attack: str, path: Path) -> None:
    """One picture of an attack's per-class image grids (class_CC.png), top to bottom."""
    grids = [imread(p) for p in sorted((run_dir / "attacks" / attack).glob("class_*.png"))]
    width = max(grid.shape[1] for grid in grids)
    padded = [
        np.pad(grid, ((0, 0), (0, width - grid.shape[1]), (0, 0)), constant_values=1.0)
        for grid in grids
    ]
    imsave(path, np.concatenate(padded))


PANELS = {
    "top1_accuracy": "attack accuracy (evaluator top-1); better defenses sit top-left",
    "knn_distance": "KNN distance to private data; better defenses sit top-right",
}


def plot(table: pd.DataFrame, attacks: list[str], chance: float, path: Path) -> None:
    """Target test accuracy (y) against each attack's accuracy (top row) and KNN distance."""
    figure = Figure(figsize=(5.2 * len(attacks), 8.4))
    FigureCanvasAgg(figure)
    for row_index, (metric, title) in enumerate(PANELS.items()):
        for panel, attack in enumerate(attacks):
            axis = figure.add_subplot(2, len(attacks), row_index * len(attacks) + panel + 1)
            x = f"{attack}_{metric}"
            for family, (color, marker) in FAMILIES.items():
                part = table[table["family"] == family].sort_values("strength")
                if part.empty:
                    continue
                axis.plot(
                    part[x],
                    part["target_test_accuracy"],
                    marker=marker,
                    color=color,
                    linestyle="-" if len(part) > 1 else "",
                    label={"none": "no defense", "mid": "MID", "dp_sgd": "DP-SGD"}[family],
                )
                for _, point in part.iterrows():
                    axis.annotate(
                        point["defense"].split(" ", 1)[-1] if family != "none" else "",
                        (point[x], point["target_test_accuracy"]),
                        fontsize=7,
                        xytext=(4, -3),
                        textcoords="offset points",
                    )
            if metric == "top1_accuracy":
                axis.axvline(chance, color="grey", linestyle=":", label="chance")
                axis.set_xlim(0, 1.05)
            column = f"public_baseline_{metric.split('_')[0]}"  # no defense's
            if column in table and (table["family"] == "none").any():
                baseline = table.loc[table["family"] == "none", column].mean()
                axis.axvline(baseline, color="grey", linestyle="--", label="public baseline")
            axis.set_xlabel(f"{attack}: {title.split(';')[0]}")
            axis.set_ylabel("target test accuracy")
            axis.set_title(f"{attack}:{title.split(';')[1]}", fontsize=9)
            axis.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    figure.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", nargs="?", type=Path, default=SWEEP)
    parser.add_argument("--attack", help="also run this attack on every cell (no retraining)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="its params")
    args = parser.parse_args()
    torch.set_num_threads(1)
    console = Console()
    plan = load_sweep(args.sweep)
    cells = plan.cells
    run_dirs = run_cells(cells, plan.directory, console)
    if args.attack:
        for cell, run_dir in zip(cells, run_dirs, strict=True):
            attack_existing_run(
                cell.scenario, RunDirectory(run_dir), args.attack, args.overrides, console
            )
    table = pd.DataFrame(
        [row(cell, run_dir) for cell, run_dir in zip(cells, run_dirs, strict=True)]
    )
    table = table.dropna(axis=1, how="all")  # top-5 with 5 or fewer private classes, epsilon
    suffix = "_top1_accuracy"
    attacks = sorted(c.removesuffix(suffix) for c in table.columns if c.endswith(suffix))
    first = cells[0].scenario
    chance = 1 / len(federated_data(first.data, first.seed).private_classes)
    atomic_write_bytes(plan.directory / "mid_vs_dp.csv", table.to_csv(index=False).encode())
    means = seed_means(table)
    atomic_write_bytes(plan.directory / "mid_vs_dp.md", markdown(means, chance).encode())
    plot(means, attacks, chance, plan.directory / "mid_vs_dp.png")
    for cell, run_dir in zip(cells, run_dirs, strict=True):
        if cell.seed == cells[0].seed:
            name = defense_label(cell.scenario.defenses)[1].replace(" ", "_").replace("=", "")
            for attack in attacks:
                stack_class_grids(run_dir, attack, plan.directory / f"images_{attack}_{name}.png")
    console.print(markdown(means, chance), markup=False)
    console.print(
        f"table: {plan.directory / 'mid_vs_dp.md'}  plot: {plan.directory / 'mid_vs_dp.png'}"
    )


if __name__ == "__main__":
    main()
