"""DP kernel-density classification (after Backurs et al. 2024) against DP-SGD federations at the
same example-level epsilon, on digits, with wall times.

Every method sees the same federation: digits (8x8 pixels in [0, 1]), classes 8 and 9 public
(kept out of the federation; used only to fit a feature map), the other 8 classes split iid over
10 clients, 20% held out as the test set. For each epsilon (delta 1e-5, example-level):

- `dp_kde` raw pixels: fedsim run (inline engine), Gaussian kernel bandwidth 2, D = 1000
  random Fourier features, each client's one release per class, summed by the server;
- `dp_kde` + JL-32: the same after a public random projection to 32 dimensions;
- `dp_kde` + public PCA-16 (`model.pca: 16`): the same on the first 16 principal components
  of the public classes' images, fitted by the server (same bandwidth);
- the same with `aggregation: secure`: each client adds 1/10 of the noise, so only the sum of
  the 10 sketches carries it (epsilon against a server that sees only the sum);
- `dp_kde` over the `distance` model (DP distance queries, `defenses/dp_distance.py`): the
  class of smallest DP average l1 distance (tree of depth 3 per pixel), l2 distance (l1 tree
  on 64 public Gaussian projections) or squared l2 distance, same release and sum;
- DP-SGD: fedsim FedAvg run, MLP (64-32-8), Opacus DP-SGD with `target_epsilon` after all
  rounds (PRV accountant), 5 rounds of one local epoch, batch 16, lr 0.5, clip 1 (one seed:
  each run takes ~0.5 min on 2 shared CPUs; the sketches are averaged over `--seeds`).

Accuracy is on the global test set; time is the wall time of the federation. Non-private
rows are the sketch at epsilon 1e6 and FedAvg without DP-SGD. Prints a markdown table; not a test.

    python benchmarks/dp_kde.py                       # the table in docs/baselines.md
    python benchmarks/dp_kde.py --only raw jl pca secure  # the dp_kde rows (seconds)
    python benchmarks/dp_kde.py --only l1 l2 l2sq      # the distance rows
    python benchmarks/dp_kde.py --only l1 --epsilons 8 --levels 1   # another tree depth
    python benchmarks/dp_kde.py --epsilons 1 --seeds 1
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fedsim.core.config import build_scenario
from fedsim.core.device import set_threads
from fedsim.core.results import RunDirectory
from fedsim.federation.simulation import run_federation

DATA = {"dataset": "digits", "num_clients": 10, "val_fraction": 0.0, "public_classes": [8, 9]}
KDE_MODEL = {"name": "kde", "features": 1000, "bandwidth": 2.0}


def fedsim_run(spec: dict[str, Any], out: Path) -> tuple[float, float]:
    """(final test accuracy, wall seconds) of one federation."""
    scenario = build_scenario({"observer": {"rounds": "none"}, "data": DATA, **spec})
    run = RunDirectory(Path(tempfile.mkdtemp(dir=out)))
    started = time.perf_counter()
    run_federation(scenario, run)
    return list(run.metrics())[-1]["test_accuracy"], time.perf_counter() - started


def kde_spec(epsilon: float | None, seed: int, aggregation: str = "per_client", **reduction: int) -> dict[str, Any]:
    """A dp_kde federation; `reduction`: projection=p (random JL) or pca=p (public classes)."""
    strategy = {"name": "dp_kde", "epsilon": epsilon if epsilon is not None else 1e6, "aggregation": aggregation}
    return {"name": "kde", "seed": seed, "model": {**KDE_MODEL, **reduction},
            "federation": {"strategy": strategy, "rounds": 1}}


def distance_spec(epsilon: float | None, seed: int, metric: str, levels: int) -> dict[str, Any]:
    """A dp_kde federation over the `distance` model (pixels already in [0, 1], its default domain)."""
    strategy = {"name": "dp_kde", "epsilon": epsilon if epsilon is not None else 1e6}
    return {"name": "distance", "seed": seed, "model": {"name": "distance", "metric": metric, "levels": levels},
            "federation": {"strategy": strategy, "rounds": 1}}


def dpsgd_spec(epsilon: float | None, seed: int) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "dpsgd", "seed": seed, "model": {"name": "mlp", "hidden": [64, 32]},
        "training": {"local_epochs": 1, "batch_size": 16, "lr": 0.5},
        "federation": {"strategy": "fedavg", "rounds": 5},
    }
    if epsilon is not None:
        spec["defenses"] = [{"name": "dp_sgd", "target_epsilon": epsilon, "max_grad_norm": 1.0, "delta": 1e-5}]
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the dp_kde rows")
    parser.add_argument("--only", nargs="+", choices=["raw", "jl", "pca", "secure", "l1", "l2", "l2sq", "dpsgd"], help="rows to run (default: all)")
    parser.add_argument("--levels", type=int, default=3, help="tree depth of the l1 and l2 distance rows")
    parser.add_argument("--dpsgd-seeds", type=int, default=1, help="seeds of the DP-SGD row")
    args = parser.parse_args()
    set_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    methods = {
        "raw": ("dp_kde raw pixels (fedsim)", lambda e, s, out: fedsim_run(kde_spec(e, s), out)),
        "jl": ("dp_kde + public JL-32 (fedsim)", lambda e, s, out: fedsim_run(kde_spec(e, s, projection=32), out)),
        "pca": ("dp_kde + public-class PCA-16 (fedsim)", lambda e, s, out: fedsim_run(kde_spec(e, s, pca=16), out)),
        "secure": ("dp_kde + PCA-16, secure sum (noise split over 10 clients)",
                   lambda e, s, out: fedsim_run(kde_spec(e, s, "secure", pca=16), out)),
        **{metric: (f"dp_kde over DP {metric} distance queries (fedsim)",
                    lambda e, s, out, metric=metric: fedsim_run(distance_spec(e, s, metric, args.levels), out))
           for metric in ("l1", "l2", "l2sq")},
        "dpsgd": ("DP-SGD MLP, FedAvg 5 rounds (fedsim)", lambda e, s, out: fedsim_run(dpsgd_spec(e, s), out)),
    }
    epsilons: list[float | None] = [*args.epsilons, None]
    print(f"\ndigits, 8 private classes, 10 iid clients, delta 1e-5, mean +- std over {args.seeds} seeds "
          f"(DP-SGD: {args.dpsgd_seeds})\n")
    print("| method | " + " | ".join(f"eps {e:g}" if e else "no DP" for e in epsilons) + " | mean wall s |")
    print("|---|" + "---|" * (len(epsilons) + 1))
    with tempfile.TemporaryDirectory() as out:
        for key in args.only or list(methods):
            name, method = methods[key]
            cells, times = [], []
            for epsilon in epsilons:
                seeds = args.dpsgd_seeds if key == "dpsgd" else args.seeds
                results = [method(epsilon, seed, Path(out)) for seed in range(seeds)]
                accs = [a for a, _ in results]
                times += [t for _, t in results]
                spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
                cells.append(f"{statistics.mean(accs):.3f} +- {spread:.3f}")
            print(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(times):.2f} |", flush=True)


if __name__ == "__main__":
    main()
