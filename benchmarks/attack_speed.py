"""Speed of the gradient-inversion attacks, and what batched restarts cost.

For DLG (L-BFGS, sigmoid LeNet) and Inverting Gradients (signed Adam, ConvNet) on real
digits (8x8, or upsampled bilinearly to `--size`) at batch 1 and 4, it times
`attack.reconstruct` for R = 1, 8 and 32 restarts, which run as one vectorised problem, and
prints objective evaluations per second (the unit in which L-BFGS and Adam compare: a DLG step
is up to 20 of them, an IG iteration one), the cost of R restarts relative to one, and
relative to a Python loop of R single runs (R times one).

    python benchmarks/attack_speed.py [--evaluations 40] [--repeats 3] [--threads 1] [--size 8]

Each figure is the fastest of `repeats` runs (the machine may be shared), after a warm-up.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_digits

from fedsim.attacks.dlg import DLG
from fedsim.attacks.inverting_gradients import InvertingGradients
from fedsim.attacks.targets import from_local_training
from fedsim.core.attack import Attack, GradientTarget
from fedsim.data.datasets import TensorData
from fedsim.core.registry import MODELS
from fedsim.federation.training import LocalHyperParams

Budget = Callable[[int], dict[str, int]]
CASES: tuple[tuple[str, type[DLG] | type[InvertingGradients], str, Budget], ...] = (
    ("dlg", DLG, "lenet", lambda evaluations: {"iterations": 1, "evaluations_per_step": evaluations}),
    ("ig", InvertingGradients, "convnet", lambda evaluations: {"iterations": evaluations - 1}),
)
"""attack, class, model, settings that make `evaluations` objective evaluations"""
BATCHES = (1, 4)
RESTARTS = (1, 8, 32)


def target(model_name: str, batch: int, size: int) -> GradientTarget:
    """One untrained model's one-step update on the first `batch` digits, size x size."""
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    data = TensorData(images, torch.tensor(digits.target), 10)
    torch.manual_seed(0)
    cls = MODELS.get(model_name)
    model = cls(cls.Params(), (1, size, size), 10)
    hp = LocalHyperParams(lr=0.1, batch_size=batch, local_epochs=1, local_steps=1, optimizer="sgd", momentum=0.0, weight_decay=0.0)
    return from_local_training(model, data.subset(list(range(batch))), hp)[0]


def seconds(attack: Attack, observed: GradientTarget, repeats: int) -> float:
    """Fastest wall time of `repeats` reconstructions, after one warm-up."""
    attack.reconstruct(observed)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        attack.reconstruct(observed)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=8, help="image side (digits upsampled from 8x8)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    title = f"gradient inversion speed ({args.size}x{args.size}, CPU, {args.threads} thread(s), {args.evaluations} evaluations)"
    table = Table(title=title)
    for column in ("attack", "model", "batch", "restarts", "evaluations/s", "ms/evaluation", "cost vs R=1", "vs a loop of R"):
        table.add_column(column, justify="right")
    for name, cls, model_name, budget in CASES:
        for batch in BATCHES:
            observed = target(model_name, batch, args.size)
            single = None
            for restarts in RESTARTS:
                params = cls.Params(**budget(args.evaluations), restarts=restarts)
                elapsed = seconds(cls(params, seed=0), observed, args.repeats)
                single = single or elapsed
                table.add_row(
                    name, model_name, str(batch), str(restarts),
                    f"{args.evaluations / elapsed:.1f}", f"{1000 * elapsed / args.evaluations:.2f}",
                    f"{elapsed / single:.2f}x", f"{elapsed / (restarts * single):.2f}x",
                )  # fmt: skip
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
