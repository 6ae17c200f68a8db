"""Papadopoulos et al.'s numerical inversion against Adam on the exact gradient, on Kumar et al.'s model.

One Fourier-encoded feature on m qubits, L hardware-efficient layers, <Z...Z>, MSE, the label
known (the threat model of docs/quantum_privacy.md); per (m, L) `--trials` random examples and
models (the test suite's draws), both attacks from the same number of random starts. Prints, per
attack: successes (circular error < 1e-3), median error and squared error, loss evaluations per
target, and seconds.

    python benchmarks/quantum_numerical.py                 # m = 2, 3 at L = 4, 8 trials, 8 starts
    python benchmarks/quantum_numerical.py --cases 3,4 4,8 --starts 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from quantum_cases import fourier_vqc, observed_target, random_example  # noqa: E402

from fedsim.attacks.quantum_matching import QuantumGradientMatching  # noqa: E402
from fedsim.attacks.quantum_numerical import QuantumNumericalInversion  # noqa: E402
from fedsim.attacks.quantum_oracle import circular_distance  # noqa: E402


def attacks(starts: int, seed: int) -> dict[str, object]:
    numerical = QuantumNumericalInversion.Params(labels="known", restarts=starts)
    return {
        "quantum_numerical": QuantumNumericalInversion(numerical, seed=seed),
        "quantum_numerical, no Kalman": QuantumNumericalInversion(numerical.model_copy(update={"kalman": False}), seed=seed),
        "quantum_gradient_matching": QuantumGradientMatching(
            QuantumGradientMatching.Params(labels="known", restarts=starts), seed=seed
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["2,4", "3,4"], help="m,L pairs")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--starts", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| m | L | attack | within 1e-3 | median error | median squared error | evaluations | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        m, layers = map(int, case.split(","))
        errors: dict[str, list[float]] = {}
        seconds: dict[str, float] = {}
        evaluations: dict[str, int] = {}
        for seed in range(args.trials):
            x, y = random_example(seed)
            target = observed_target(fourier_vqc(m=m, layers=layers, seed=seed), x, y)
            for name, attack in attacks(args.starts, seed).items():
                started = time.perf_counter()
                recon = attack.reconstruct(target)
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
                error = circular_distance(recon.images.flatten().double(), x.flatten().double()).item()
                errors.setdefault(name, []).append(error)
                evaluations[name] = recon.details.get(
                    "objective_evaluations", attack.params.restarts * (attack.params.iterations + 1)
                )
        for name, found in errors.items():
            median = statistics.median(found)
            print(f"| {m} | {layers} | `{name}` | {sum(e < 1e-3 for e in found)}/{len(found)} | {median:.1e} | "
                  f"{median ** 2:.1e} | {evaluations[name]} | {seconds[name]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
