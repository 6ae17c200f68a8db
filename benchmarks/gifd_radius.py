"""GIFD's stages and l1 radii on a recorded run: what each feature domain adds, what the ball does.

On every observation of RUN_DIR (a finished run of scenarios/gifd_vs_ig.yaml, say) this runs,
with the run's own cached GAN and one budget of 1,000 Adam steps per target:
latent-only inversion; GIFD stopped after its latent stage (400 steps) and after its first
feature stage (700); full GIFD (400/300/300) for each pair of radii; and GIFD with a radius
so large that the ball never binds. Prints one markdown table (mean PSNR/SSIM/label accuracy,
which stage won) and writes a figure: truth, latent-only, and GIFD after each stage.

    python benchmarks/gifd_radius.py RUN_DIR [--radii 0.05,0.1 0.1,0.2 0.2,0.4 0.5,1] [--figure PATH]

The script scores against the ground truth as the runner does (after the attack returns).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from torch import Tensor

from fedsim.attacks.generative_inversion import GenerativeInversion, LatentInversion, LatentParams
from fedsim.attacks.gifd import Gifd, GifdParams
from fedsim.evaluation.metrics import pair_by_best_match, score_images
from fedsim.core.attack import GradientTarget, Reconstruction
from fedsim.data.datasets import federated_data
from fedsim.pipeline.model_leakage import CACHE
from fedsim.federation.observer import load_observations
from fedsim.core.results import RunDirectory
from fedsim.pipeline.runner import auxiliary_data, gradient_target, ground_truth, load_run_scenario
from fedsim.core.seeding import derive_seed

UNBOUNDED = 1e6
"""A per-entry radius no feature deviation reaches: the ball never binds."""


def variants(radii: list[tuple[float, float]], base: GifdParams) -> dict[str, GenerativeInversion]:
    """Every attack compared, with the scenario's GIFD settings (prior, restarts, ...) kept."""
    shared = base.model_dump(exclude={"steps", "radii"})
    seed = derive_seed(0, "gifd-radius")
    gifd = {
        f"gifd radii {a:g}/{b:g}": Gifd(GifdParams(**shared, steps=[400, 300, 300], radii=[a, b]), seed)
        for a, b in radii
    }
    return {
        "latent-only (1000)": LatentInversion(LatentParams(**shared, iterations=1000), seed),
        "gifd stage 0 (400)": Gifd(GifdParams(**shared, steps=[400], radii=[]), seed),
        f"gifd stage 1 (700, r {radii[0][0]:g})": Gifd(GifdParams(**shared, steps=[400, 300], radii=[radii[0][0]]), seed),
        **gifd,
        "gifd unbounded": Gifd(GifdParams(**shared, steps=[400, 300, 300], radii=[UNBOUNDED, UNBOUNDED]), seed),
    }


def row(name: str, results: list[Reconstruction], truths: list[tuple[Tensor, Tensor]], seconds: float) -> str:
    scores = [score_images(r.images, x, r.labels, y) for r, (x, y) in zip(results, truths, strict=True)]
    mean = {k: sum(s[k] for s in scores) / len(scores) for k in ("psnr", "ssim", "label_accuracy")}
    stages = Counter(r.details["stage"] for r in results)
    won = ", ".join(f"{stage}: {count}" for stage, count in sorted(stages.items()))
    return (
        f"| {name} | {mean['psnr']:.1f} | {mean['ssim']:.3f} | {mean['label_accuracy']:.2f} | {won} | "
        f"{seconds / len(results):.1f} |"
    )


def figure(truth: Tensor, rows: dict[str, Tensor], path: Path) -> None:
    """Truth on top, then each variant's reconstruction paired to it (one target)."""
    count = len(truth)
    plot = Figure(figsize=(1.1 * count + 1.6, 1.15 * (len(rows) + 1)))
    FigureCanvasAgg(plot)
    axes = plot.subplots(len(rows) + 1, count, squeeze=False)
    for r, (name, images) in enumerate({"truth": truth, **rows}.items()):
        if name != "truth":
            truth_idx, recon_idx = pair_by_best_match(images, truth)
            images = images[recon_idx[truth_idx.argsort()]]
        for c in range(count):
            axes[r][c].imshow(images[c, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    plot.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    plot.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--radii", nargs="+", default=["0.05,0.1", "0.1,0.2", "0.2,0.4", "0.5,1"])
    parser.add_argument("--figure", type=Path, default=None, help="default: RUN_DIR/gifd_stages.png")
    args = parser.parse_args()
    torch.set_num_threads(1)

    run = RunDirectory(args.run_dir).require()
    scenario = load_run_scenario(run)
    data = federated_data(scenario.data, scenario.public().seed)  # the clients' partitions
    observations = load_observations(run.root)
    targets: list[GradientTarget] = [gradient_target(o, scenario, data) for o in observations]
    truths = [ground_truth(run, o, data) for o in observations]
    configured = next((a.params for a in scenario.attacks if a.name == "gifd"), GifdParams())
    radii = [tuple(float(v) for v in pair.split(",")) for pair in args.radii]

    print(f"{len(targets)} targets of {run.root} ({scenario.name}); budget 1,000 steps each")
    print("| attack | PSNR dB | SSIM | labels | best stage (targets) | s / target |")
    print("|---|---|---|---|---|---|")
    shown: dict[str, Tensor] = {}
    for name, attack in variants(radii, configured).items():  # type: ignore[arg-type]
        attack.prepare(auxiliary_data(data, scenario), run.root / CACHE, Console(quiet=True))
        started = time.perf_counter()
        results = attack.reconstruct_many(targets)
        print(row(name, results, truths, time.perf_counter() - started), flush=True)
        if "radii" not in name or name.endswith(f"{radii[0][0]:g}/{radii[0][1]:g}"):
            shown[name] = results[0].images
    figure(truths[0][0], shown, args.figure or run.root / "gifd_stages.png")


if __name__ == "__main__":
    main()
