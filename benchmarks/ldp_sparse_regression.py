"""LDP sparse linear regression (Zhu et al. 2024): estimation error against n and epsilon, and
the same federation under Flower's LocalDpMod at equal local epsilon.

Part 1 (rates). x ~ N(0, I_d), y = <theta*, x> + N(0, 0.1^2), theta* k-sparse with
||theta*|| = 1 (the `sparse_regression` dataset's distribution). For every (n, epsilon) it
draws the summed noise of n one-pair clients' messages with `pooled_noise` (equal in
distribution to summing n `private_message`s' noise, so n reaches 10^7 on a laptop), runs
the server's estimator and reports the l2 error ||theta^ - theta*|| (mean over seeds) and its
privacy part ||theta^ - theta~|| (theta~: the same estimator on the noiseless truncated sums).
Log-log slopes are least-squares fits; the upper bound O~(d sqrt(k) / (sqrt(n) eps)) predicts
-1/2 in n and -1 in eps (the bound is stated for eps <= 1; the analytic Gaussian noise shrinks
slower than 1/eps above that).

Part 2 (end to end, fedsim runs on the inline engine). `ldp_sparse_regression` and FedAvg on
the linear model with `local_dp` (clip C, Gaussian noise each round; per-round epsilon chosen so
the RDP composition over all rounds equals the target) on the same n one-pair clients; error
of the final model's weights against theta*, test R^2 and wall time.

    python benchmarks/ldp_sparse_regression.py            # the tables in docs/baselines.md
    python benchmarks/ldp_sparse_regression.py --rates-only   # part 1 only
    python benchmarks/ldp_sparse_regression.py --quick    # fewer points, one seed
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from fedsim.core.config import build_scenario
from fedsim.core.device import set_threads
from fedsim.core.results import RunDirectory
from fedsim.data.datasets import SparseRegression
from fedsim.defenses.ldp_sparse_regression import (
    LdpSparseRegressionParams,
    estimate,
    pooled_noise,
    truncated_sums,
)
from fedsim.defenses.local_dp import LocalDp
from fedsim.federation.simulation import run_federation

D, K, NOISE, CHUNK = 10, 2, 0.1, 1_000_000
RECOVERED = 0.1  # ||theta*|| = 1: below this the k coordinates are found
MECHANISM = dict(clip_x=1.0, clip_y=1.0, eigen_floor=0.1, sparsity=K, delta=1e-5)


@lru_cache(maxsize=64)
def sums_of(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(theta*, noiseless truncated sums of n fresh (x, y) pairs), drawn in chunks; the
    truncation does not depend on epsilon, so every epsilon reuses them."""
    theta = SparseRegression.theta(SparseRegression.Params(features=D, sparsity=K), 0).double()
    params = LdpSparseRegressionParams(**MECHANISM)
    rng = np.random.default_rng([seed, n])
    xx, xy = torch.zeros(D, D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        x = torch.from_numpy(rng.standard_normal((m, D)))
        y = x @ theta + NOISE * torch.from_numpy(rng.standard_normal(m))
        a, b = truncated_sums(x, y, params)
        xx, xy = xx + a, xy + b
    return theta, xx, xy


def errors(n: int, epsilon: float, seeds: int) -> tuple[float, float]:
    """Mean (total error, privacy part of the error) over `seeds` data-and-noise draws."""
    params = LdpSparseRegressionParams(epsilon=epsilon, **MECHANISM)
    total, private = [], []
    for seed in range(seeds):
        theta, xx, xy = sums_of(n, seed)
        clean = estimate(xx, xy, n, K, params.eigen_floor)
        noise_xx, noise_xy = pooled_noise(D, n, params, torch.Generator().manual_seed(seed))
        noisy = estimate(xx + noise_xx, xy + noise_xy, n, K, params.eigen_floor)
        total.append(float((noisy - theta).norm()))
        private.append(float((noisy - clean).norm()))
    return float(np.mean(total)), float(np.mean(private))


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def recovered_slope(xs: list[float], ys: list[float]) -> str:
    """The slope over the points past support recovery (privacy error below RECOVERED, where
    the estimator is in its linear regime: the bound's rates are asymptotic)."""
    kept = [(x, y) for x, y in zip(xs, ys, strict=True) if y < RECOVERED]
    return f"{slope(*zip(*kept)):.2f}" if len(kept) > 1 else "n/a"


def rates(ns: list[int], epsilons: list[float], n_fixed: int, eps_fixed: float, seeds: int) -> None:
    print(f"\n### error vs n (d={D}, k={K}, eps={eps_fixed}, delta=1e-5, {seeds} seeds)\n")
    print("| n | error ||theta^ - theta*|| | privacy part | privacy part * sqrt(n) eps / (d sqrt(k)) |")
    print("|---|---|---|---|")
    totals, privates = [], []
    for n in ns:
        t, p = errors(n, eps_fixed, seeds)
        totals.append(t), privates.append(p)
        print(f"| {n:.0e} | {t:.4f} | {p:.4f} | {p * math.sqrt(n) * eps_fixed / (D * math.sqrt(K)):.2f} |")
    print(f"\nslope in n: total {slope(ns, totals):.2f}, privacy part {slope(ns, privates):.2f}; "
          f"privacy part where < {RECOVERED}: {recovered_slope(ns, privates)} (bound: -0.5)")
    print(f"\n### error vs eps (d={D}, k={K}, n={n_fixed:.0e}, {seeds} seeds)\n")
    print("| eps | error | privacy part |")
    print("|---|---|---|")
    totals, privates = [], []
    for eps in epsilons:
        t, p = errors(n_fixed, eps, seeds)
        totals.append(t), privates.append(p)
        print(f"| {eps:g} | {t:.4f} | {p:.4f} |")
    print(f"\nslope in eps: total {slope(epsilons, totals):.2f}, privacy part {slope(epsilons, privates):.2f}; "
          f"privacy part where < {RECOVERED}: {recovered_slope(epsilons, privates)} (bound: -1)")


def per_round_epsilon(target: float, rounds: int, delta: float) -> float:
    """The local_dp per-round epsilon whose RDP composition over `rounds` is `target`."""
    low, high = 1e-3, 1e3
    for _ in range(60):
        mid = math.sqrt(low * high)
        spent = LocalDp(LocalDp.Params(epsilon=mid, delta=delta, clipping_norm=1.0)).composed_epsilon(rounds)
        low, high = (mid, high) if spent < target else (low, mid)
    return low


def end_to_end(n_clients: int, epsilons: list[float], rounds: int, out: Path) -> None:
    examples = round(n_clients / 0.8)
    base = {
        "seed": 0,
        "data": {
            "dataset": {"name": "sparse_regression", "num_examples": examples, "features": D, "sparsity": K, "noise": NOISE},
            "num_clients": n_clients,
            "val_fraction": 0.0,
        },
        "model": {"name": "mlp", "hidden": []},
        "observer": {"rounds": "none"},
    }
    theta = SparseRegression.theta(SparseRegression.Params(num_examples=examples, features=D, sparsity=K, noise=NOISE), 0)
    print(f"\n### end to end: {n_clients} one-pair clients, d={D}, k={K} (fedsim runs, inline engine)\n")
    print("| method | local eps (reported) | rounds | error ||theta - theta*|| | test R^2 | wall s |")
    print("|---|---|---|---|---|---|")
    for eps in epsilons:
        runs = {
            "ldp_sparse_regression": {
                "name": "ldp", **base,
                "federation": {"strategy": {"name": "ldp_sparse_regression", "epsilon": eps, **{**MECHANISM, "eigen_floor": 1.0}}, "rounds": 1},
            },
            "fedavg + local_dp": {
                "name": "localdp", **base,
                "training": {"local_steps": 1, "batch_size": 1, "lr": 0.5},
                "federation": {"strategy": "fedavg", "rounds": rounds},
                "defenses": [{"name": "local_dp", "clipping_norm": 0.5, "delta": 1e-5,
                              "epsilon": per_round_epsilon(eps, rounds, 1e-5)}],
            },
        }
        for method, spec in runs.items():
            scenario = build_scenario(spec)
            run = RunDirectory(Path(tempfile.mkdtemp(dir=out)))
            started = time.perf_counter()
            run_federation(scenario, run)
            wall = time.perf_counter() - started
            last = list(run.metrics())[-1]
            weight = next(w for w in load_file(run.model_path).values() if w.ndim == 2).flatten()
            reported = max(e["epsilon"] for e in last["privacy"])
            print(f"| {method} | {reported:.2f} | {scenario.federation.rounds} | "
                  f"{float((weight - theta).norm()):.3f} | {last['test_accuracy']:.3f} | {wall:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer points, one seed, smaller federation")
    parser.add_argument("--rates-only", action="store_true", help="only part 1 (no fedsim runs)")
    args = parser.parse_args()
    set_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    if args.quick:
        rates([10**5, 10**6], [1.0, 4.0], 10**6, 4.0, seeds=1)
    else:
        rates([10**6, 3 * 10**6, 10**7], [0.5, 1.0, 2.0, 4.0, 8.0, 16.0], 10**7, 4.0, seeds=5)
    if args.rates_only:
        return
    with tempfile.TemporaryDirectory() as out:
        end_to_end(400 if args.quick else 800, [8.0] if args.quick else [2.0, 8.0], 3, Path(out))


if __name__ == "__main__":
    main()
