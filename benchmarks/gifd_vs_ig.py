"""The table and image grids of the GIFD comparison, from a finished sweep directory.

    fedsim sweep scenarios/sweeps/gifd_vs_ig.yaml
    python benchmarks/gifd_vs_ig.py runs/sweeps/gifd_vs_ig [--figures DIR] [--client 0]

Prints one markdown table: per defense and batch size, each attack's PSNR (mean ± standard
deviation over seeds of the mean over the attacked clients) / SSIM / label accuracy (means),
from the sweep's results table (`fedsim.experiments.sweep_table`). Writes, per setting, one image grid
stacking every attack's truth-over-reconstruction grid of one client of the first seed (the
PNGs the runner wrote), named `<defense>_b<batch>.png`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread

from fedsim.core.results import RunDirectory
from fedsim.pipeline.runner import load_run_scenario
from fedsim.experiments.sweep_table import load_results, seed_summary

ATTACKS = ("ig", "gan_latent", "gifd")


def defense_name(value: object) -> str:
    """'none', or each defense as name(param=value, ...), from the axis column's JSON text."""
    defenses = json.loads(value) if isinstance(value, str) else value or []
    if not defenses:
        return "none"
    return " + ".join(
        f"{d['name']}({', '.join(f'{k}={v}' for k, v in d.items() if k != 'name')})" for d in defenses
    )


def markdown(table: pd.DataFrame, attacks: list[str]) -> str:
    """One row per (defense, batch size, prior): 'PSNR ± spread / SSIM / labels' per attack."""
    axes = [c for c in ("defense", "training.batch_size", "prior") if c in table]
    summary = seed_summary(table, axes)
    header = [*axes, "seeds", *attacks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in summary.iterrows():
        cells = [
            f"{row[f'{a}_psnr']:.1f} ± {row[f'{a}_psnr_std']:.1f} / {row[f'{a}_ssim']:.3f} / "
            f"{row[f'{a}_label_accuracy']:.2f}"
            for a in attacks
        ]
        values = [*(str(row[c]) for c in axes), str(row["seeds"])]
        lines.append("| " + " | ".join([*values, *cells]) + " |")
    return "\n".join(lines)


def target_psnr(run_dir: Path, attack: str) -> dict[str, float]:
    """PSNR of each target (round and client) an attack reconstructed in one run."""
    files = sorted((run_dir / "attacks" / attack).glob("round_*_client_*.json"))
    return {f.stem: json.loads(f.read_text())["psnr"] for f in files}


def head_to_head(table: pd.DataFrame, attack: str, others: list[str]) -> str:
    """Per setting, on how many targets (all seeds and clients) `attack` scored a higher PSNR
    than each of `others`: a paired count, free of the spread between targets."""
    axes = [c for c in ("defense", "training.batch_size", "prior") if c in table]
    header = [*axes, "targets", *(f"{attack} > {other}" for other in others)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for values, cells in table.groupby(axes, sort=False):
        wins, targets = dict.fromkeys(others, 0), 0
        for run_dir in map(Path, cells["run_dir"]):
            ours = target_psnr(run_dir, attack)
            targets += len(ours)
            for other in others:
                theirs = target_psnr(run_dir, other)
                wins[other] += sum(psnr > theirs[name] for name, psnr in ours.items())
        row = [*map(str, values), str(targets), *(str(wins[o]) for o in others)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def grid(run_dir: Path, attacks: list[str], client: int, title: str, path: Path) -> None:
    """Every attack's truth-over-reconstruction PNG of one client, stacked."""
    pngs = [
        (attack, imread(found[0]))
        for attack in attacks
        if (found := sorted((run_dir / "attacks" / attack).glob(f"round_*_client_{client:04d}.png")))
    ]
    if not pngs:
        return
    height = sum(image.shape[0] for _, image in pngs) / 100
    plot = Figure(figsize=(pngs[0][1].shape[1] / 100, height + 0.4))
    FigureCanvasAgg(plot)
    axes = plot.subplots(len(pngs), 1, squeeze=False)
    for axis, (attack, image) in zip(axes[:, 0], pngs, strict=True):
        axis.imshow(image)
        axis.set_axis_off()
    plot.suptitle(title, fontsize=9)
    plot.tight_layout()
    plot.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--figures", type=Path, default=None, help="default: SWEEP_DIR/figures")
    parser.add_argument("--client", type=int, default=0, help="whose reconstructions the grids show")
    args = parser.parse_args()

    table = load_results(args.sweep_dir)
    table = table[table["status"] == "done"].copy()
    table["defense"] = [defense_name(v) for v in table.get("defenses", pd.Series([None] * len(table)))]
    if "attacks.0.prior_data" in table:
        table["prior"] = table["attacks.0.prior_data"]
    attacks = [a for a in ATTACKS if f"{a}_psnr" in table]
    print(f"{len(table)} finished cells of {args.sweep_dir}; each entry: PSNR dB / SSIM / label accuracy")
    print(markdown(table, attacks))
    if "gifd" in attacks:
        print(head_to_head(table, "gifd", [a for a in attacks if a != "gifd"]))

    out = args.figures or args.sweep_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    for _, row in table.drop_duplicates("index").iterrows():  # the first seed of each setting
        run_dir = Path(row["run_dir"])
        batch = load_run_scenario(RunDirectory(run_dir)).training.batch_size
        prior = f"_{row['prior']}" if "prior" in row else ""
        title = f"{row['defense']}, batch {batch}" + (f", prior {row['prior']}" if prior else "")
        grid(run_dir, attacks, args.client, title, out / f"{row['defense'].split('(')[0]}_b{batch}{prior}.png")
    print(f"image grids: {out}")


if __name__ == "__main__":
    main()
