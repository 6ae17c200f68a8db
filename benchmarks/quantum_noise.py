"""Shots and hardware noise as defenses of a vqc's gradient: attack success and utility.

    python benchmarks/quantum_noise.py                   # every stage (~20 min on a shared 2-core CPU)
    python benchmarks/quantum_noise.py --stages shots    # one stage; others are reused
    python benchmarks/quantum_noise.py --fresh           # recompute instead of reusing results

Results go to docs/quantum/noise.json as each stage finishes, keyed by the stage's settings
(as in benchmarks/quantum_study.py, whose clients this reuses: Kumar et al.'s one-feature
Fourier model, m = 3, L = 4, <Z Z Z>, MSE, known label, every experiment its own weights, x, y).

Stages:
  shot_check  the batched finite-shot gradient below against PennyLane's own parameter-shift
              with `shots` (the vqc scenario option): mean and spread over repeats agree.
  shots       grid-scan success (eps 0.01) vs shots S per circuit evaluation.
  noise       grid-scan success vs depolarising p / amplitude damping gamma (exact expectations
              of the noisy circuit), for an attacker who models the noise and one who does not.
  utility     test R^2 of scenarios/quantum_privacy.yaml's federation with the same settings.

Finite-shot gradient (what a client on hardware sends). Every RY/RZ weight obeys the two-term
parameter-shift rule df/dtheta_j = (f(theta + pi/2 e_j) - f(theta - pi/2 e_j)) / 2, and each
of the 2 d + 1 expectation values (f itself and the shifted ones) of the +-1-valued Z x Z x Z
is estimated from S shots: 2 Binomial(S, (1 + mu) / 2) / S - 1, independently. The client's
MSE gradient is then 2 (f_hat - y) grad_hat f. PennyLane's parameter-shift on a device with
`shots` draws exactly this; here all experiments' 2 d + 1 circuits are one broadcast call.

Success rates come with 95% Wilson score intervals (K experiments per setting).
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

import numpy as np
import torch
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quantum_study import SEED, SUCCESS_EPS, experiments  # noqa: E402
from quantum_cases import kumar_params  # noqa: E402  (quantum_study puts tests/ on the path)

from fedsim.attacks.quantum_landscape import QuantumGridScan, grid_scan  # noqa: E402
from fedsim.attacks.quantum_oracle import QuantumGradientOracle, circular_distance  # noqa: E402
from fedsim.core.config import load_scenario  # noqa: E402
from fedsim.core.seeding import derive_seed  # noqa: E402
from fedsim.federation.simulation import quiet_flower  # noqa: E402
from fedsim.models.quantum import VQC  # noqa: E402
from fedsim.pipeline.runner import run_scenario  # noqa: E402

OUT = ROOT / "docs" / "quantum"
M, LAYERS = 3, 4
console = Console()

CONFIG = {
    "shot_check": {"shots": 100, "repeats": 30},
    "shots": {"shots": [1, 10, 100, 1000, 10000, None], "experiments": 50, "max_points_per_cycle": 32},
    "noise": {
        "settings": [{"depolarizing": p} for p in (0.01, 0.05, 0.2)] + [{"amplitude_damping": 0.2}],
        "experiments": 20,
        "max_points_per_cycle": 16,
    },
    "utility": {
        "settings": [{}, {"shots": 100}, {"shots": 1000}, {"depolarizing": 0.05},
                     {"depolarizing": 0.2}, {"amplitude_damping": 0.2}],
        "rounds": 30,
        "clients_per_round": 5,
    },
}  # fmt: skip


# ----------------------------------------------------------------------------- clients


def paper_params(**changes: object) -> VQC.Params:
    return kumar_params(M, LAYERS, **changes)


def shot_gradients(
    oracle: QuantumGradientOracle, x: torch.Tensor, shots: int, generator: torch.Generator
) -> torch.Tensor:
    """Each target's MSE gradient from S-shot estimates of its 2 d + 1 circuits (module doc)."""
    count, d = oracle.weights.shape[0], oracle.observed.shape[1]
    shifts = torch.cat([torch.zeros(1, d), torch.eye(d) * math.pi / 2, -torch.eye(d) * math.pi / 2])
    weights = oracle.weights.reshape(count, 1, d) + shifts.double()
    with torch.no_grad():
        mu = oracle.simulator.forward_per_example(
            x.repeat_interleave(2 * d + 1, dim=0),
            weights.reshape(-1, *oracle.weights.shape[1:]),
        )[:, 0].reshape(count, 2 * d + 1)
    ones = torch.full_like(mu, float(shots))
    estimate = 2 * torch.binomial(ones, ((1 + mu) / 2).clamp(0, 1), generator=generator) / shots - 1
    slope = (estimate[:, 1 : d + 1] - estimate[:, d + 1 :]) / 2
    return 2 * (estimate[:, :1] - oracle.known_labels) * slope


def with_observed(oracle: QuantumGradientOracle, observed: torch.Tensor, simulator: VQC | None = None) -> QuantumGradientOracle:
    """The same clients' oracle for another observed gradient (and attacker's simulator)."""
    return QuantumGradientOracle(
        simulator or oracle.simulator, oracle.weights, observed, oracle.known_labels, regression=True
    )


def scan(oracle: QuantumGradientOracle, x: torch.Tensor, max_points_per_cycle: int) -> dict:
    params = QuantumGridScan.Params(labels="known", max_points_per_cycle=max_points_per_cycle)
    result = grid_scan(oracle, params)
    distance = circular_distance(result.x, x).flatten()
    return {
        "distance": distance.tolist(),
        "loss": result.loss.tolist(),
        "found": result.found.tolist(),
    }


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summary(distances: list[float]) -> dict:
    hits = sum(d < SUCCESS_EPS for d in distances)
    low, high = wilson(hits, len(distances))
    return {"success": hits / len(distances), "ci95": [low, high], "n": len(distances),
            "median_distance": float(np.median(distances))}  # fmt: skip


# ----------------------------------------------------------------------------- stages


def stage_shot_check(c: dict) -> dict:
    """Mean and std of PennyLane's S-shot gradient against the batched sampler's, one client."""
    oracle, x = experiments(M, LAYERS, 1)
    model = VQC(paper_params(diff_method="parameter-shift", shots=c["shots"]), (1,), 1).double()
    with torch.no_grad():
        model.quantum.weights.copy_(oracle.weights[0])
    pennylane = []
    for _ in range(c["repeats"]):
        model.zero_grad()
        (model(x)[:, 0] - oracle.known_labels[:, 0]).square().sum().backward()
        pennylane.append(model.quantum.weights.grad.flatten().clone())
    generator = torch.Generator().manual_seed(derive_seed(SEED, "shot-check"))
    batched = [shot_gradients(oracle, x, c["shots"], generator)[0] for _ in range(c["repeats"])]
    a, b = torch.stack(pennylane), torch.stack(batched)
    z = (a.mean(0) - b.mean(0)) / torch.sqrt((a.var(0) + b.var(0)) / c["repeats"]).clamp_min(1e-12)
    return {
        "max_abs_z_of_mean_difference": float(z.abs().max()),
        "std_ratio_median": float((a.std(0) / b.std(0).clamp_min(1e-12)).median()),
        "exact_norm": float(oracle.observed.norm()),
    }


def stage_shots(c: dict) -> dict:
    oracle, x = experiments(M, LAYERS, c["experiments"])
    out = {}
    for shots in c["shots"]:
        started = time.perf_counter()
        if shots is None:
            observed = oracle.observed
        else:
            generator = torch.Generator().manual_seed(derive_seed(SEED, "shots", shots))
            observed = shot_gradients(oracle, x, shots, generator)
        error = (observed - oracle.observed).norm(dim=1) / oracle.observed.norm(dim=1)
        result = scan(with_observed(oracle, observed), x, c["max_points_per_cycle"])
        result["relative_gradient_error"] = error.tolist()
        result["seconds"] = round(time.perf_counter() - started, 1)
        out[str(shots)] = result
        s = summary(result["distance"])
        console.print(f"shots {shots}: success {s['success']:.2f} {s['ci95']}, median gradient error {float(error.median()):.3f} ({result['seconds']} s)")
    return out


def stage_noise(c: dict) -> dict:
    clean, x = experiments(M, LAYERS, c["experiments"])
    out = {}
    for setting in c["settings"]:
        started = time.perf_counter()
        noisy = VQC(paper_params(device="default.mixed", **setting), (1,), 1).double()
        blank = with_observed(clean, clean.observed, noisy)
        observed = blank.gradients(x).detach()  # the exact gradient of the noisy circuit
        change = (observed - clean.observed).norm(dim=1) / clean.observed.norm(dim=1)
        key = json.dumps(setting)
        out[key] = {
            "aware": scan(with_observed(clean, observed, noisy), x, c["max_points_per_cycle"]),
            "unaware": scan(with_observed(clean, observed), x, c["max_points_per_cycle"]),
            "gradient_change": change.tolist(),
            "seconds": round(time.perf_counter() - started, 1),
        }
        aware, unaware = summary(out[key]["aware"]["distance"]), summary(out[key]["unaware"]["distance"])
        console.print(f"noise {setting}: aware {aware['success']:.2f} {aware['ci95']}, unaware {unaware['success']:.2f} {unaware['ci95']} ({out[key]['seconds']} s)")
    return out


def stage_utility(c: dict) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in c["settings"]:
            started = time.perf_counter()
            overrides = [f"federation.rounds={c['rounds']}", f"federation.clients_per_round={c['clients_per_round']}",
                         "attacks=[]", "observer.rounds=none", f"output.dir={tmp}", "output.save_model=false"]  # fmt: skip
            if "shots" in setting:
                overrides += [f"model.shots={setting['shots']}", "model.diff_method=parameter-shift"]
            for name in ("depolarizing", "amplitude_damping"):
                if name in setting:
                    overrides += [f"model.{name}={setting[name]}", "model.device=default.mixed"]
            scenario = load_scenario(ROOT / "scenarios" / "quantum_privacy.yaml", overrides)
            key = json.dumps(setting)
            run = run_scenario(scenario, Path(tmp) / str(len(out)), console=Console(quiet=True))
            final = list(run.metrics())[-1]
            out[key] = {"test_r2": final["test_accuracy"], "seconds": round(time.perf_counter() - started, 1)}
            console.print(f"utility {setting}: test R^2 {final['test_accuracy']:.3f} ({out[key]['seconds']} s)")
    return out


STAGES: dict[str, Callable[[dict], dict]] = {
    "shot_check": stage_shot_check, "shots": stage_shots, "noise": stage_noise, "utility": stage_utility,
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="recompute every stage")
    parser.add_argument("--stages", nargs="*", default=list(STAGES), choices=list(STAGES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    quiet_flower()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "noise.json"
    results = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    for name in args.stages:
        if results.get(name, {}).get("config") == CONFIG[name]:
            console.print(f"{name}: stored")
            continue
        started = time.perf_counter()
        results[name] = {"config": CONFIG[name], "result": STAGES[name](CONFIG[name])}
        results[name]["seconds"] = round(time.perf_counter() - started, 1)
        path.write_text(json.dumps(results, indent=1))
    console.print(f"results in {path}")


if __name__ == "__main__":
    main()
