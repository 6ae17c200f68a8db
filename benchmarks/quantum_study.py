"""Kumar et al. 2023 reproduced on fedsim's quantum models: every figure of
docs/quantum_privacy.md from one command.

    python benchmarks/quantum_study.py            # all stages (~27 min on a shared 2-core CPU)
    python benchmarks/quantum_study.py --quick    # tiny sizes, to check the pipeline
    python benchmarks/quantum_study.py --fresh    # recompute instead of reusing results

Each stage's numbers go to docs/quantum/results.json as soon as they exist, keyed by the
stage's settings; a rerun recomputes only stages whose settings changed (or with --fresh),
then redraws every figure in docs/quantum/.

The client model is the paper's: one feature x in [0, 1) on m qubits (Fourier tower,
RX(5^(k-1) 2 pi x)), L hardware-efficient layers (d = 2 L m weights, uniform in [0, 2 pi)),
<Z x ... x Z>, MSE against a label y ~ U[-1, 1] that the attacker knows, batch size 1,
exact gradients. Every experiment draws its own weights, x and y; the K experiments of one
setting are one batched attack problem (attacks/quantum_oracle.py holds K targets).

Stages:
  eps        P(success within eps) for m = 1..6: Adam (lr 0.01, 60 iterations) from 10
             random starts, answer = the start with the lowest attack loss (the paper's
             protocol), and the global grid scan (the strongest attacker for one feature).
  minima     distinct local minima of the attack loss vs m, fitted to N = a exp(b m).
  overparam  success and minima vs L at m = 3 (d = 6 L; over-parameterised from L = 2).
  (--quick writes to the system temp directory, never to docs/quantum.)
  learned    held-out error of the learning-based attack vs m and network size.
  utility    test R^2 of the same models trained in the federation (scenarios/quantum_privacy.yaml).
  refine     the grid scan's misses at a fixed 8 points per cycle, and the adaptive refinement
             (doubling while the polished loss is above tolerance) on exactly those.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fedsim.attacks.quantum_landscape import (
    QuantumGridScan,
    feature_grid,
    grid_scan,
    grid_size,
    local_minima,
    loss_on_grid,
)
from fedsim.attacks.quantum_learned import Inverter, QuantumLearned
from fedsim.attacks.quantum_matching import local_search
from fedsim.attacks.quantum_oracle import QuantumGradientOracle, circular_distance
from fedsim.federation.simulation import quiet_flower
from fedsim.core.config import load_scenario
from fedsim.models.quantum import VQC
from fedsim.pipeline.runner import run_scenario
from fedsim.core.seeding import derive_seed
from quantum_cases import kumar_params

OUT = ROOT / "docs" / "quantum"
SEED = 0
PAPER_MINIMA = (0.622, 1.484)  # N_c ~ 0.622 exp(1.484 m), Kumar et al. (secondary source)
EPS = np.logspace(-3, math.log10(0.5), 40)
SUCCESS_EPS = 0.01
console = Console()

FULL = {
    "eps": {
        "ms": [1, 2, 3, 4, 5, 6],
        "layers": 4,
        "experiments": 100,
        "restarts": 10,
        "iterations": 60,
        "lr": 0.01,
        "grid_experiments": {"5": 30, "6": 15},
    },
    "minima": {"ms": [1, 2, 3, 4, 5, 6], "layers": 4, "experiments": 10, "points_per_cycle": 16},
    "overparam": {
        "m": 3,
        "layers": [1, 2, 3, 4, 6, 8],
        "experiments": 50,
        "restarts": 10,
        "minima_experiments": 5,
    },
    "learned": {
        "ms": [1, 2, 3, 4, 5],
        "layers": 4,
        "hidden": [[16], [64], [256, 256]],
        "samples": 8192,
        "epochs": 60,
    },
    "utility": {"ms": [1, 2, 3, 4, 5], "layers": [1, 2, 4, 8], "rounds": 30},
    "refine": {"ms": [3, 4], "layers": 4, "experiments": 200},
}
QUICK = {
    "eps": {
        "ms": [1, 2, 3],
        "layers": 2,
        "experiments": 10,
        "restarts": 10,
        "iterations": 60,
        "lr": 0.01,
        "grid_experiments": {},
    },
    "minima": {"ms": [1, 2, 3], "layers": 2, "experiments": 3, "points_per_cycle": 16},
    "overparam": {
        "m": 2,
        "layers": [1, 2, 4],
        "experiments": 10,
        "restarts": 10,
        "minima_experiments": 2,
    },
    "learned": {"ms": [1, 2], "layers": 2, "hidden": [[16], [64]], "samples": 1024, "epochs": 20},
    "utility": {"ms": [1, 2], "layers": [2], "rounds": 5},
    "refine": {"ms": [2], "layers": 2, "experiments": 20},
}


# ----------------------------------------------------------------------------- experiments


def paper_model(m: int, layers: int) -> VQC:
    return VQC(kumar_params(m, layers), (1,), 1).double()


def experiments(m: int, layers: int, count: int) -> tuple[QuantumGradientOracle, torch.Tensor]:
    """`count` independent clients (weights, x, y) and the exact gradients they send."""
    generator = torch.Generator().manual_seed(derive_seed(SEED, "quantum-study", m, layers))
    simulator = paper_model(m, layers)
    shape = simulator.quantum.circuit.weight_shape
    weights = torch.rand(count, *shape, generator=generator, dtype=torch.float64) * 2 * math.pi
    x = torch.rand(count, 1, generator=generator, dtype=torch.float64)
    y = torch.rand(count, generator=generator, dtype=torch.float64) * 2 - 1
    blank = QuantumGradientOracle(
        simulator, weights, torch.ones(count, math.prod(shape)), y, regression=True
    )
    observed = blank.gradients(x)  # candidate k is target k's truth: its own gradient
    return QuantumGradientOracle(simulator, weights, observed, y, regression=True), x


def restart_attack(
    oracle: QuantumGradientOracle,
    x: torch.Tensor,
    restarts: int,
    iterations: int,
    lr: float,
    key: object,
) -> dict[str, list[float]]:
    """Every experiment's restarts as one batch; distances of the best-loss and the closest start."""
    count = len(x)
    generator = torch.Generator().manual_seed(derive_seed(SEED, "starts", key))
    starts = torch.rand(count * restarts, 1, generator=generator, dtype=torch.float64)
    final, loss, _ = local_search(oracle, starts, iterations, lr)
    final, loss = final.reshape(count, restarts), loss.reshape(count, restarts)
    distance = circular_distance(final, x)
    best = distance.gather(1, loss.argmin(1, keepdim=True)).flatten()
    return {
        "best_loss_distance": best.tolist(),
        "closest_distance": distance.min(1).values.tolist(),
    }


def scan_attack(oracle: QuantumGradientOracle, x: torch.Tensor, count: int) -> list[float]:
    """The global grid scan on the first `count` experiments (one batched polish)."""
    found = grid_scan(oracle.targets(0, count), QuantumGridScan.Params(labels="known")).x
    return circular_distance(found, x[:count]).flatten().tolist()


def minima_counts(oracle: QuantumGradientOracle, count: int, points_per_cycle: int) -> list[int]:
    counts = []
    for k in range(count):
        single = oracle.targets(k, k + 1)
        grid = feature_grid(grid_size(single, points_per_cycle), 1, periodic=True)
        counts.append(len(local_minima(loss_on_grid(single, grid, chunk=8192), periodic=True)))
    return counts


# ----------------------------------------------------------------------------- stages


def stage_eps(c: dict) -> dict:
    out = {}
    for m in c["ms"]:
        started = time.perf_counter()
        oracle, x = experiments(m, c["layers"], c["experiments"])
        result = restart_attack(oracle, x, c["restarts"], c["iterations"], c["lr"], ("eps", m))
        scans = c["grid_experiments"].get(str(m), c["experiments"])
        result["grid_distance"] = scan_attack(oracle, x, scans)
        result["seconds"] = round(time.perf_counter() - started, 1)
        out[str(m)] = result
        console.print(
            f"eps m={m}: success@{SUCCESS_EPS} local {success(result['best_loss_distance']):.2f}, grid {success(result['grid_distance']):.2f} ({result['seconds']} s)"
        )
    return out


def stage_minima(c: dict) -> dict:
    out = {}
    for m in c["ms"]:
        oracle, _ = experiments(m, c["layers"], c["experiments"])
        out[str(m)] = minima_counts(oracle, c["experiments"], c["points_per_cycle"])
        console.print(f"minima m={m}: {out[str(m)]}")
    ms = np.array([int(m) for m in out])
    slope, intercept = np.polyfit(ms, np.log([np.mean(v) for v in out.values()]), 1)
    return {"counts": out, "fit": {"a": float(math.exp(intercept)), "b": float(slope)}}


def stage_overparam(c: dict) -> dict:
    out = {}
    m = c["m"]
    for layers in c["layers"]:
        oracle, x = experiments(m, layers, c["experiments"])
        result = restart_attack(oracle, x, c["restarts"], 60, 0.01, ("overparam", layers))
        result["grid_distance"] = scan_attack(oracle, x, c["experiments"])
        result["minima"] = minima_counts(oracle, c["minima_experiments"], 16)
        result["d"], result["qubits"] = 2 * layers * m, m
        out[str(layers)] = result
        console.print(
            f"overparam L={layers} d={result['d']}: local {success(result['best_loss_distance']):.2f}, grid {success(result['grid_distance']):.2f}, minima {np.mean(result['minima']):.0f}"
        )
    return out


def stage_learned(c: dict) -> dict:
    out: dict[str, Any] = {}
    for m in c["ms"]:
        oracle, _ = experiments(m, c["layers"], 1)
        for hidden in c["hidden"]:
            params = QuantumLearned.Params(
                labels="known", samples=c["samples"], hidden=hidden, epochs=c["epochs"]
            )
            generator = torch.Generator().manual_seed(derive_seed(SEED, "learned", m))
            inverter = Inverter.fit(
                oracle, params, generator, derive_seed(SEED, "network", m, str(hidden))
            )
            out[f"{m}:{hidden}"] = {
                "m": m,
                "hidden": hidden,
                "d": oracle.observed.shape[1],
                "parameters": inverter.size,
                "held_out_error": inverter.held_out_error,
            }
            console.print(
                f"learned m={m} hidden={hidden}: held-out error {inverter.held_out_error:.4f} ({inverter.size} weights)"
            )
    return out


def stage_utility(c: dict) -> dict:
    """Final test R^2 of the federation in scenarios/quantum_privacy.yaml, m and L varied."""
    settings = [(m, 4) for m in c["ms"]] + [(3, layers) for layers in c["layers"] if layers != 4]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m, layers in settings:
            overrides = [f"model.qubits_per_feature={m}", f"model.layers={layers}", f"federation.rounds={c['rounds']}",
                         "attacks=[]", "observer.rounds=none", f"output.dir={tmp}", "output.save_model=false"]  # fmt: skip
            scenario = load_scenario(ROOT / "scenarios" / "quantum_privacy.yaml", overrides)
            run = run_scenario(scenario, Path(tmp) / f"m{m}-L{layers}", console=Console(quiet=True))
            final = list(run.metrics())[-1]
            out[f"{m}:{layers}"] = {
                "m": m,
                "layers": layers,
                "test_r2": final["test_accuracy"],
                "test_mse": final["test_loss"],
            }
            console.print(f"utility m={m} L={layers}: test R^2 {final['test_accuracy']:.3f}")
    return out


def stage_refine(c: dict) -> dict:
    """Fixed 8-point scan on every experiment; the adaptive scan (whose first pass is that same
    scan) rerun on the experiments whose polished loss stayed above the tolerance."""
    out = {}
    for m in c["ms"]:
        oracle, x = experiments(m, c["layers"], c["experiments"])
        fixed = grid_scan(oracle, QuantumGridScan.Params(labels="known", max_points_per_cycle=8))
        distance = circular_distance(fixed.x, x).flatten()
        missed = torch.nonzero(~fixed.found).flatten()
        adaptive = grid_scan(oracle.subset(missed), QuantumGridScan.Params(labels="known"))
        out[str(m)] = {
            "fixed_distance": distance.tolist(),
            "fixed_loss": fixed.loss.tolist(),
            "refined": missed.tolist(),
            "refined_distance": circular_distance(adaptive.x, x[missed]).flatten().tolist(),
            "refined_loss": adaptive.loss.tolist(),
            "refined_points_per_cycle": adaptive.points_per_cycle.tolist(),
        }
        console.print(
            f"refine m={m}: fixed-scan misses {int((distance >= SUCCESS_EPS).sum())} of {len(x)}, refined {missed.tolist()} -> {out[str(m)]['refined_distance']}"
        )
    return out


STAGES: dict[str, Callable[[dict], dict]] = {
    "eps": stage_eps, "minima": stage_minima, "overparam": stage_overparam, "learned": stage_learned, "utility": stage_utility,
    "refine": stage_refine,
}  # fmt: skip


# ----------------------------------------------------------------------------- figures


def success(distances: list[float], eps: float = SUCCESS_EPS) -> float:
    return float(np.mean(np.asarray(distances) < eps))


def save(figure: Figure, name: str) -> None:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(OUT / name, dpi=110)


def plot_eps(r: dict) -> None:
    figure = Figure(figsize=(10, 4))
    axes = figure.subplots(1, 2, sharey=True)
    titles = (
        "Adam, 10 starts, lowest-loss start (Kumar et al.)",
        "global grid scan (strongest attacker)",
    )
    for axis, key, title in zip(axes, ("best_loss_distance", "grid_distance"), titles, strict=True):
        for m, result in r.items():
            axis.plot(EPS, [success(result[key], e) for e in EPS], label=f"m = {m}")
        axis.plot(EPS, np.minimum(2 * EPS, 1), "k:", label="random guess (2 eps)")
        axis.set(xscale="log", xlabel="eps (circular distance)", title=title)
    axes[0].set_ylabel("P(|x' - x| < eps)")
    axes[1].legend(fontsize=8)
    save(figure, "success_vs_eps.png")


def plot_minima(r: dict) -> None:
    figure = Figure(figsize=(5.5, 4))
    axis = figure.subplots()
    ms = np.array([int(m) for m in r["counts"]])
    for m, counts in r["counts"].items():
        axis.scatter([int(m)] * len(counts), counts, color="tab:blue", alpha=0.4, s=12)
    axis.plot(
        ms, [np.mean(v) for v in r["counts"].values()], "o", color="tab:blue", label="fedsim (mean)"
    )
    a, b = r["fit"]["a"], r["fit"]["b"]
    grid = np.linspace(ms.min(), ms.max(), 50)
    axis.plot(grid, a * np.exp(b * grid), color="tab:blue", label=f"fit {a:.3f} exp({b:.3f} m)")
    pa, pb = PAPER_MINIMA
    axis.plot(grid, pa * np.exp(pb * grid), "k--", label=f"paper {pa} exp({pb} m)")
    axis.set(
        yscale="log",
        xlabel="qubits per feature m",
        ylabel="local minima of the attack loss",
        title="attack-loss landscape, one feature",
    )
    axis.legend(fontsize=8)
    save(figure, "minima_vs_m.png")


def plot_overparam(r: dict, utility: dict) -> None:
    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    ratio = [v["d"] / (4 * v["qubits"]) for v in r.values()]
    axis.plot(
        ratio, [success(v["best_loss_distance"]) for v in r.values()], "o-", label="Adam, 10 starts"
    )
    axis.plot(ratio, [success(v["grid_distance"]) for v in r.values()], "s-", label="grid scan")
    axis.axvline(1, color="grey", lw=0.8)
    axis.set(
        xscale="log",
        xlabel="d / (4 Nq)  (over-parameterised right of 1)",
        ylabel=f"P(success at eps {SUCCESS_EPS}); test R^2",
        ylim=(-0.02, 1.02),
    )
    twin = axis.twinx()
    twin.plot(
        ratio,
        [np.mean(v["minima"]) for v in r.values()],
        "^:",
        color="tab:red",
        label="local minima",
    )
    twin.set(ylabel="local minima of the attack loss")
    m = next(iter(r.values()))["qubits"]
    points = sorted((v["layers"], v["test_r2"]) for v in utility.values() if v["m"] == m)
    if points:  # d / (4 Nq) = 2 L m / (4 m) = L / 2
        axis.plot(
            [layers / 2 for layers, _ in points],
            [r2 for _, r2 in points],
            "d--",
            color="tab:green",
            label="test R^2 (FL)",
        )
    axis.legend(loc="center left", fontsize=8)
    twin.legend(loc="center right", fontsize=8)
    axis.set_title(f"m = {m}: success vs over-parameterisation")
    save(figure, "overparam.png")


def plot_learned(r: dict) -> None:
    figure = Figure(figsize=(5.5, 4))
    axis = figure.subplots()
    for hidden in sorted({json.dumps(v["hidden"]) for v in r.values()}, key=len):
        rows = [v for v in r.values() if json.dumps(v["hidden"]) == hidden]
        axis.plot(
            [v["m"] for v in rows],
            [v["held_out_error"] for v in rows],
            "o-",
            label=f"hidden {hidden} ({rows[-1]['parameters']} weights at m = {rows[-1]['m']})",
        )
    axis.axhline(0.25, color="k", ls=":", label="random guess (0.25)")
    axis.set(
        yscale="log",
        xlabel="qubits per feature m",
        ylabel="mean circular error, held-out clients",
        title="learning-based attack",
    )
    axis.legend(fontsize=7, loc="lower right")
    save(figure, "learned_attack.png")


def plot_utility(utility: dict, eps_results: dict) -> None:
    figure = Figure(figsize=(5.5, 4))
    axis = figure.subplots()
    rows = sorted((v["m"], v["test_r2"]) for v in utility.values() if v["layers"] == 4)
    axis.plot(
        [m for m, _ in rows],
        [r2 for _, r2 in rows],
        "o-",
        color="tab:green",
        label="test R^2 (federated, L = 4)",
    )
    ms = sorted(int(m) for m in eps_results)
    axis.plot(
        ms,
        [success(eps_results[str(m)]["best_loss_distance"]) for m in ms],
        "s--",
        label=f"Adam attack success (eps {SUCCESS_EPS})",
    )
    axis.plot(
        ms,
        [success(eps_results[str(m)]["grid_distance"]) for m in ms],
        "^--",
        label=f"grid-scan success (eps {SUCCESS_EPS})",
    )
    axis.set(
        xlabel="qubits per feature m",
        ylabel=f"test R^2; P(success at eps {SUCCESS_EPS})",
        ylim=(-0.02, 1.02),
        title="utility and leakage of the same models",
    )
    axis.legend(fontsize=8)
    save(figure, "utility_vs_m.png")


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the pipeline")
    parser.add_argument("--fresh", action="store_true", help="recompute every stage")
    parser.add_argument("--stages", nargs="*", default=list(STAGES), choices=list(STAGES))
    args = parser.parse_args()
    torch.set_num_threads(1)  # small circuits: one thread is many times faster on few cores
    quiet_flower()
    global OUT
    if args.quick:  # never mixes with the real study's results and figures
        OUT = Path(tempfile.gettempdir()) / "fedsim-quantum-quick"
    OUT.mkdir(parents=True, exist_ok=True)
    results_path = OUT / "results.json"
    config = QUICK if args.quick else FULL
    results = (
        json.loads(results_path.read_text()) if results_path.exists() and not args.fresh else {}
    )
    for name in args.stages:
        if results.get(name, {}).get("config") == config[name]:
            console.print(f"{name}: stored")
            continue
        started = time.perf_counter()
        results[name] = {
            "config": config[name],
            "result": STAGES[name](config[name]),
            "seconds": 0.0,
        }
        results[name]["seconds"] = round(time.perf_counter() - started, 1)
        results_path.write_text(json.dumps(results, indent=1))
    r = {name: results[name]["result"] for name in results}
    if "eps" in r:
        plot_eps(r["eps"])
    if "minima" in r:
        plot_minima(r["minima"])
        console.print(
            f"minima fit: {r['minima']['fit']['a']:.3f} exp({r['minima']['fit']['b']:.3f} m); paper {PAPER_MINIMA}"
        )
    if "overparam" in r:
        plot_overparam(r["overparam"], r.get("utility", {}))
    if "learned" in r:
        plot_learned(r["learned"])
    if "utility" in r and "eps" in r:
        plot_utility(r["utility"], r["eps"])
    console.print(f"figures in {OUT}")


if __name__ == "__main__":
    main()
