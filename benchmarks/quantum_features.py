"""Inverting more than one secret number: several features per example, a batch's averaged
gradient, several local steps (a FedAvg update), the label known or unknown.

Kumar et al.'s study inverts one feature of one example from one SGD step. Here a client holds
n = B S examples of F features each (Fourier encoding, m qubits per feature, L
hardware-efficient layers, <Z...Z>, MSE, exact gradients) and sends the update of S E local
SGD steps in batches of B (E passes over its data): the attacker's unknowns are the n F
inputs. The grid scan's first pass grows as (4 f_max)^(n F) and stops being an option; what
still works, at which cost: per setting, `--trials` random models and clients (x ~ U[0, 1),
y ~ U[-1, 1]), trained by fedsim's own local training, attacked by the numerical inversion
(`quantum_numerical`, Papadopoulos et al.) and Adam gradient matching
(`quantum_gradient_matching`, Kumar et al.'s attack, 8x the starts), with the labels known
(the paper's threat model) or unknown (the loss derivatives solved jointly; one local step
only). Success: every input within 1e-3 (circular distance, examples paired to the truth by
best match); Wilson 95 % interval; seconds per target.

    python benchmarks/quantum_features.py                         # F = 1, 2, 3; one example
    python benchmarks/quantum_features.py --features 1 --batch 1 2 4 --steps 1 2 --adam-iterations 200
    python benchmarks/quantum_features.py --features 1 --layers 4 16 --batch 2 4 --labels known --adam-iterations 200
    python benchmarks/quantum_features.py --features 1 --batch 2 --labels known unknown --adam-iterations 200 --grid-scan
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from quantum_cases import fourier_vqc, random_example, trained_target  # noqa: E402
from quantum_noise import wilson  # noqa: E402

from fedsim.attacks.quantum_landscape import QuantumGridScan  # noqa: E402
from fedsim.attacks.quantum_matching import QuantumGradientMatching  # noqa: E402
from fedsim.attacks.quantum_numerical import QuantumNumericalInversion  # noqa: E402
from fedsim.core.attack import GradientAttack  # noqa: E402
from fedsim.evaluation.metrics import score_features  # noqa: E402

SUCCESS = 1e-3
LR = 0.1


def attacks(labels: str, starts: int, adam_iterations: int, seed: int, grid_scan: bool) -> dict[str, GradientAttack]:
    numerical = QuantumNumericalInversion.Params(labels=labels, restarts=starts)
    matching = QuantumGradientMatching.Params(labels=labels, restarts=8 * starts, iterations=adam_iterations)
    chosen: dict[str, GradientAttack] = {
        f"quantum_numerical ({starts} starts)": QuantumNumericalInversion(numerical, seed=seed),
        f"quantum_gradient_matching ({8 * starts} starts, {adam_iterations} its)": QuantumGradientMatching(
            matching, seed=seed
        ),
    }
    if grid_scan:
        chosen["quantum_grid_scan"] = QuantumGridScan(QuantumGridScan.Params(labels=labels), seed=seed)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, nargs="+", default=[1, 2, 3], help="F per example")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="B examples per local step")
    parser.add_argument("--steps", type=int, nargs="+", default=[1], help="S local steps per pass, each on its own batch")
    parser.add_argument("--epochs", type=int, default=1, help="E passes over the client's n = B S examples")
    parser.add_argument("--m", type=int, default=2, help="qubits per feature")
    parser.add_argument("--layers", type=int, nargs="+", default=[4], help="L (d = 2 L m F weights)")
    parser.add_argument("--labels", nargs="+", choices=("known", "unknown"), default=["known", "unknown"])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--starts", type=int, default=8, help="numerical starts (Adam gets 8x as many)")
    parser.add_argument("--adam-iterations", type=int, default=60, help="Adam iterations (Kumar et al.: 60)")
    parser.add_argument("--grid-scan", action="store_true", help="also the global grid scan (its cost: (4 f_max)^unknowns)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| F | L | B | S x E | unknowns | labels | attack | all within 1e-3 | Wilson 95% | median max error | s / target |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    settings = itertools.product(args.features, args.layers, args.batch, args.steps, args.labels)
    for features, layers, batch, steps, labels in settings:
        if labels == "unknown" and steps * args.epochs > 1:
            continue  # an unknown label is solved for over one step only
        errors: dict[str, list[float]] = {}
        seconds: dict[str, float] = {}
        for seed in range(args.trials):
            x, y = random_example(seed, features=features, examples=batch * steps)
            model = fourier_vqc(m=args.m, layers=layers, seed=seed, features=features)
            target, trained = trained_target(model, x, y, LR, batch, steps * args.epochs, seed)
            for name, attack in attacks(labels, args.starts, args.adam_iterations, seed, args.grid_scan).items():
                started = time.perf_counter()
                recon = attack.reconstruct(target)
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
                scores = score_features(recon.images, trained, recon.labels, target.known_labels, period=1.0)
                errors.setdefault(name, []).append(float(scores["max_feature_error"]))
        for name, found in errors.items():
            hits = sum(e < SUCCESS for e in found)
            low, high = wilson(hits, len(found))
            print(f"| {features} | {layers} | {batch} | {steps} x {args.epochs} | {features * batch * steps} | {labels} | `{name}` | "
                  f"{hits}/{len(found)} | {low:.2f}-{high:.2f} | {statistics.median(found):.1e} | "
                  f"{seconds[name] / len(found):.1f} |", flush=True)


if __name__ == "__main__":
    main()
