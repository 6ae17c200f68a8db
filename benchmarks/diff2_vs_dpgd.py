"""DIFF2 against DP-GD at equal epsilon: test accuracy of an MLP on digits (or synthetic blobs).

Both are fedsim strategies (`dp_gd`, `diff2`) run end to end on the inline engine: every round
each client releases a clipped, Gaussian-noised full-batch gradient (or, for DIFF2 between
refreshes, gradient difference), and both spend the same sample-level epsilon after all
rounds (`target_epsilon`, Opacus RDP, delta 1e-5; see defenses/diff2.py).

Hyper-parameters are chosen per method and epsilon on the tuning seed by the final validation
accuracy (every client's validation split), then the chosen setting is run on fresh seeds and
its test accuracy reported as mean +- std. Prints a markdown table; not a test.

    python benchmarks/diff2_vs_dpgd.py                                # the table in docs/diff2.md
    python benchmarks/diff2_vs_dpgd.py --epsilons 2 --rounds 20 --eval-seeds 1   # quick look
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fedsim.core.config import build_scenario
from fedsim.core.device import set_threads
from fedsim.core.results import RunDirectory
from fedsim.federation.simulation import run_federation

GRIDS: dict[str, dict[str, list[Any]]] = {
    "dp_gd": {"lr": [0.5, 1.0, 2.0, 4.0]},
    "diff2": {"lr": [0.5, 1.0, 2.0], "refresh_every": [5], "clip_diff": [0.1, 0.3], "refresh_share": [0.8]},
}
DATASETS: dict[str, Any] = {
    "digits": "digits",
    # 12,000 Gaussian blobs of 16 features: more examples per client, fewer inputs
    "synthetic": {"name": "synthetic", "num_examples": 12000, "image_size": 4, "noise": 0.6},
}


def run_once(strategy: dict[str, Any], seed: int, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """Train one federation; its final test and validation accuracy and the epsilon spent."""
    scenario = build_scenario(
        {
            "name": "diff2_vs_dpgd",
            "seed": seed,
            "data": {"dataset": DATASETS[args.dataset], "num_clients": args.clients},
            "model": {"name": "mlp", "hidden": [args.hidden]},
            "federation": {
                "strategy": strategy,
                "rounds": args.rounds,
                "evaluate_clients_per_round": args.clients,
            },
            "observer": {"rounds": "none"},
            "output": {"dir": str(out), "save_model": False},
        }
    )
    run = RunDirectory(Path(tempfile.mkdtemp(dir=out)))
    run_federation(scenario, run)
    last = list(run.metrics())[-1]
    evaluated = last["client_evaluation"]
    examples = sum(c["num-examples"] for c in evaluated)
    return {
        "test": last["test_accuracy"],
        "val": sum(c["val-accuracy"] * c["num-examples"] for c in evaluated) / examples,
        "epsilon": last.get("max_client_epsilon", float("nan")),
    }


def settings(method: str, epsilon: float) -> list[dict[str, Any]]:
    grid = GRIDS[method]
    return [
        {"name": method, "target_epsilon": epsilon, **dict(zip(grid, values, strict=True))}
        for values in itertools.product(*grid.values())
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="digits")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--tune-seed", type=int, default=0)
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    set_threads(1)
    torch.manual_seed(0)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for epsilon, method in itertools.product(args.epsilons, GRIDS):
            tuned = [(run_once(s, args.tune_seed, args, out), s) for s in settings(method, epsilon)]
            best_result, best = max(tuned, key=lambda pair: pair[0]["val"])
            results = [run_once(best, seed, args, out) for seed in args.eval_seeds]
            tests = [r["test"] for r in results]
            chosen = ", ".join(f"{k}={v:g}" for k, v in best.items() if k not in ("name", "target_epsilon"))
            rows.append(
                f"| {epsilon:g} | {method} | {chosen} | {best_result['val']:.3f} | "
                f"{statistics.mean(tests):.3f} +- {statistics.pstdev(tests):.3f} | "
                f"{max(r['epsilon'] for r in results):.3f} |"
            )
            print(rows[-1], flush=True)
    print(
        f"\nMLP (hidden {args.hidden}) on {args.dataset}, {args.clients} clients, {args.rounds} rounds, "
        f"delta 1e-5; tuned on seed {args.tune_seed}, test accuracy over seeds {args.eval_seeds}; "
        f"{time.perf_counter() - started:.0f} s\n"
    )
    print("| epsilon | method | chosen | val acc (tuning seed) | test acc | epsilon spent |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
