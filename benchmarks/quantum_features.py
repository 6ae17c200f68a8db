"""Inverting several secret features per example, with the label known or unknown.

Kumar et al.'s study has one feature; with F features on m qubits each (Fourier encoding,
F m qubits, L hardware-efficient layers, <Z...Z>, MSE, batch 1, exact gradients) the grid
scan's first pass grows as (4 f_max)^F and stops being an option. What still works, at which
cost: per F, `--trials` random models and examples (x ~ U[0, 1)^F, y ~ U[-1, 1]), the
numerical inversion (`quantum_numerical`, Papadopoulos et al.) and Adam gradient matching
(`quantum_gradient_matching`, Kumar et al.'s attack, more starts), each with the label known
(the paper's threat model) or unknown (`labels: unknown`: the loss derivative solved jointly).
Success: every feature within 1e-3 (circular distance); Wilson 95 % interval; seconds per
target.

    python benchmarks/quantum_features.py                         # F = 1, 2, 3; m = 2; L = 4
    python benchmarks/quantum_features.py --features 2 --labels unknown --trials 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantum_noise import wilson  # noqa: E402

from fedsim.attacks.quantum_matching import QuantumGradientMatching  # noqa: E402
from fedsim.attacks.quantum_numerical import QuantumNumericalInversion  # noqa: E402
from fedsim.attacks.quantum_oracle import circular_distance  # noqa: E402
from fedsim.core.attack import GradientAttack, GradientTarget  # noqa: E402
from fedsim.federation.training import SquaredError  # noqa: E402
from fedsim.models.quantum import VQC  # noqa: E402

SUCCESS = 1e-3
LR = 0.1


def observed(features: int, m: int, layers: int, seed: int) -> tuple[GradientTarget, torch.Tensor]:
    """One client's single-example SGD step on a fresh model (seeded), and its secret x."""
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.rand(1, features, generator=generator), torch.rand(1, generator=generator) * 2 - 1
    torch.manual_seed(seed)
    params = VQC.Params(encoding="fourier", qubits_per_feature=m, reupload=False, layers=layers, observable="tensor_z")
    model = VQC(params, (features,), 1)
    SquaredError()(model(x), y).backward()
    update = {"quantum.weights": -LR * model.quantum.weights.grad.detach().clone()}
    target = GradientTarget(
        model=model, update=update, num_examples=1, lr=LR, local_steps=1, batch_size=1,
        input_shape=(features,), num_classes=0, server_round=1, client=0, known_labels=y,
    )  # fmt: skip
    return target, x


def attacks(labels: str, starts: int, seed: int) -> dict[str, GradientAttack]:
    numerical = QuantumNumericalInversion.Params(labels=labels, restarts=starts)
    matching = QuantumGradientMatching.Params(labels=labels, restarts=8 * starts)
    return {
        f"quantum_numerical ({starts} starts)": QuantumNumericalInversion(numerical, seed=seed),
        f"quantum_gradient_matching ({8 * starts} starts)": QuantumGradientMatching(matching, seed=seed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--m", type=int, default=2, help="qubits per feature")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--labels", nargs="+", choices=("known", "unknown"), default=["known", "unknown"])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--starts", type=int, default=8, help="numerical starts (Adam gets 8x as many)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| F | qubits | labels | attack | all features within 1e-3 | Wilson 95% | median max error | s / target |")
    print("|---|---|---|---|---|---|---|---|")
    for features in args.features:
        for labels in args.labels:
            errors: dict[str, list[float]] = {}
            seconds: dict[str, float] = {}
            for seed in range(args.trials):
                target, x = observed(features, args.m, args.layers, seed)
                for name, attack in attacks(labels, args.starts, seed).items():
                    started = time.perf_counter()
                    recon = attack.reconstruct(target)
                    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
                    error = circular_distance(recon.images.flatten().double(), x.flatten().double()).max().item()
                    errors.setdefault(name, []).append(error)
            for name, found in errors.items():
                hits = sum(e < SUCCESS for e in found)
                low, high = wilson(hits, len(found))
                print(f"| {features} | {features * args.m} | {labels} | `{name}` | {hits}/{len(found)} | "
                      f"{low:.2f}-{high:.2f} | {statistics.median(found):.1e} | {seconds[name] / len(found):.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
