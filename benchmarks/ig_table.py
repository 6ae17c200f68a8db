"""PSNR of Inverting Gradients and FedAvg-update inversion by batch size and by local steps.

Clients hold `batch` real 8x8 digits each and take `steps` local SGD steps on them (every
step on the whole local data, lr 0.05) on an untrained ConvNet (width 32); the server
inverts each client's update. `fedavg_inversion` unrolls the steps, `ig` treats the update
as one gradient. Labels are inferred (mean-softmax counts). The clients of a cell are one
vectorised problem. Also: label-inference accuracy of the mean-softmax counts against LLG's
simple rule (Wainakh et al. 2022), PSNR of `ig` by TV weight, and a grid of truth over
reconstruction.

Section `sizes`: PSNR / SSIM of `ig` by TV weight across image sizes and channels, one
client's one-step gradient per cell: real digits upsampled (bilinear) from 8x8 to 32x32 and
64x64 (1 channel), and synthetic RGB scenes (a colour gradient and two soft-edged discs,
drawn at each size, so the content does not change with the resolution), on Zhu et al.'s
sigmoid LeNet and a ConvNet (width 16).

    python benchmarks/ig_table.py [--iterations 500] [--restarts 2] [--clients 3] [--grid PATH]
                                  [--sections psnr labels tv sizes]
    python benchmarks/ig_table.py --sections sizes [--sizes 8 32 64] [--size-batch 1]
                                  [--size-iterations 200] [--size-tv 1e-4 1e-3 1e-2 1e-1 auto]
    python benchmarks/ig_table.py --sections bn [--bn-contents digits rgb] [--bn-batches 1 4]
                                  [--bn-size 16] [--bn-iterations 500] [--bn-weights 0.01 0.1]

Section `bn`: GradInversion (`grad_inversion`, Yin et al. 2021) against `ig` on a BatchNorm
ResNet-20 (untrained, one local SGD step, lr 0.05, labels inferred): the BN-statistics prior
at each weight, read from the client's update (`bn_statistics: update`) or from the sent
model's running buffers (`running`, Yin et al.'s; the initialisation at round 1).

Prints markdown tables (docs/gradient_inversion.md holds the figures of one run).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor

from fedsim.attacks.fedavg_inversion import FedAvgInversion
from fedsim.attacks.gradient_matching import GradientInversion, mean_step_gradient
from fedsim.attacks.grad_inversion import GradInversion
from fedsim.attacks.inverting_gradients import InvertingGradients
from fedsim.attacks.label_inference import infer_labels, last_layer
from fedsim.evaluation.metrics import label_accuracy, save_image_grid, score_images
from fedsim.attacks.targets import from_local_training
from fedsim.core.attack import GradientTarget
from fedsim.data.datasets import TensorData
from fedsim.core.registry import MODELS
from fedsim.federation.training import LocalHyperParams

SHAPE = (1, 8, 8)
BATCHES = (1, 2, 4, 8)
STEPS = (1, 5, 10)
LABEL_BATCHES = (2, 4, 8, 16)
LABEL_TRIALS = 40
TV_WEIGHTS = (1e-4, 1e-3, 1e-2, 1e-1)
SIZE_MODELS = (("lenet", {}), ("convnet", {"width": 16}))


def digits() -> TensorData:
    data = load_digits()
    return TensorData(torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1), torch.tensor(data.target), 10)


def clients(data: TensorData, batch: int, steps: int, count: int) -> list[tuple[GradientTarget, TensorData]]:
    """`count` clients, each with its own untrained ConvNet and `batch` distinct digits."""
    observed = []
    for index in range(count):
        torch.manual_seed(index)
        cls = MODELS.get("convnet")
        model = cls(cls.Params(width=32), SHAPE, 10)
        hp = LocalHyperParams(lr=0.05, batch_size=batch, local_epochs=1, local_steps=steps, optimizer="sgd", momentum=0.0, weight_decay=0.0)
        start = 100 * index + 8 * steps + batch  # different digits in every cell
        observed.append(from_local_training(model, data.subset(list(range(start, start + batch))), hp, client=index))
    return observed


def cell(attack: GradientInversion, observed: list[tuple[GradientTarget, TensorData]]) -> tuple[str, list]:
    """'mean (min) PSNR, label accuracy, seconds' of one attack on the cell's clients."""
    started = time.perf_counter()
    recons = attack.reconstruct_many([t for t, _ in observed])
    elapsed = time.perf_counter() - started
    scores = [score_images(r.images, used.x, r.labels, used.y) for r, (_, used) in zip(recons, observed, strict=True)]
    psnr = [s["psnr"] for s in scores]
    labels = sum(s["label_accuracy"] for s in scores) / len(scores)
    return f"{sum(psnr) / len(psnr):.1f} ({min(psnr):.1f}) | {labels:.2f} | {elapsed:.0f}", recons


def llg_labels(weight_gradient: Tensor, count: int) -> Tensor:
    """LLG's simple rule (Wainakh et al. 2022): classes with a negative weight-row sum first,
    then repeatedly the most negative row after subtracting the estimated impact m."""
    rows = weight_gradient.sum(dim=1).clone()
    labels = [int(k) for k in (rows < 0).nonzero().flatten()]
    impact = rows[rows < 0].sum() * (1 + 1 / len(rows)) / count
    rows[rows < 0] -= impact
    while len(labels) < count:
        k = int(rows.argmin())
        labels.append(k)
        rows[k] -= impact
    return torch.tensor(labels[:count])


def psnr_table(data: TensorData, attacks: list[GradientInversion], count: int, grid: Path) -> None:
    print("\n| batch | local steps | fedavg_inversion | ig (one gradient) |\n|---|---|---|---|")
    cells = [(batch, 5) for batch in BATCHES] + [(4, steps) for steps in STEPS if steps != 5]
    for batch, steps in cells:
        observed = clients(data, batch, steps, count)
        results = [cell(attack, observed) for attack in attacks]
        print(f"| {batch} | {steps} | {results[0][0]} | {results[1][0]} |", flush=True)
        if (batch, steps) == (4, 5):
            truth = torch.cat([used.x for _, used in observed])
            save_image_grid(truth, torch.cat([r.images for r in results[0][1]]), grid,
                            title="fedavg_inversion: 4 digits per client, 5 local steps")  # fmt: skip


def label_table(data: TensorData) -> None:
    print("\n| model | batch | mean-softmax counts | LLG simple |\n|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for model_name in ("lenet", "convnet"):
        for batch in LABEL_BATCHES:
            ours, llg = [], []
            for trial in range(LABEL_TRIALS):
                torch.manual_seed(trial)
                cls = MODELS.get(model_name)
                model = cls(cls.Params(), SHAPE, 10)
                chosen = torch.randperm(len(data), generator=generator)[:batch].tolist()
                hp = LocalHyperParams(lr=0.1, batch_size=batch, local_epochs=1, local_steps=1, optimizer="sgd", momentum=0.0, weight_decay=0.0)
                target, used = from_local_training(model, data.subset(chosen), hp)
                gradient = mean_step_gradient(target)
                labels, _ = infer_labels(target, gradient, batch, generator, "benchmark")
                ours.append(label_accuracy(labels, used.y))
                llg.append(label_accuracy(llg_labels(gradient[last_layer(target)[0]], batch), used.y))
            print(f"| {model_name} | {batch} | {sum(ours) / len(ours):.3f} | {sum(llg) / len(llg):.3f} |")


def tv_table(data: TensorData, iterations: int, restarts: int, count: int) -> None:
    print("\n`ig`, batch 4, one local step\n\n| TV weight | PSNR dB mean (min) / label accuracy / seconds |\n|---|---|")
    observed = clients(data, 4, 1, count)
    for tv in TV_WEIGHTS:
        attack = InvertingGradients(InvertingGradients.Params(iterations=iterations, restarts=restarts, tv=tv), seed=0)
        print(f"| {tv:g} | {cell(attack, observed)[0].replace(' | ', ' / ')} |", flush=True)


def upsampled_digits(data: TensorData, size: int, batch: int) -> TensorData:
    """The first `batch` digits, bilinearly resized from 8x8 to size x size."""
    images = data.x[:batch]
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return TensorData(images, data.y[:batch], 10)


def synthetic_rgb(size: int, batch: int, seed: int = 0) -> TensorData:
    """`batch` RGB scenes: a linear colour gradient and two discs with an edge one pixel wide,
    drawn from the same random shapes at every size; labels 0, 1, ... (arbitrary)."""
    generator = torch.Generator().manual_seed(seed)
    grid = (torch.arange(size) + 0.5) / size
    rows, cols = grid[:, None], grid[None, :]
    images = []
    for _ in range(batch):
        low, high, angle = torch.rand(3, generator=generator), torch.rand(3, generator=generator), torch.rand(1, generator=generator)
        ramp = (cols * torch.cos(angle) + rows * torch.sin(angle)).clamp(0, 1)
        image = low[:, None, None] + (high - low)[:, None, None] * ramp
        for _ in range(2):
            centre, radius = torch.rand(2, generator=generator), 0.15 + 0.2 * torch.rand(1, generator=generator)
            colour = torch.rand(3, generator=generator)
            distance = ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2).sqrt()
            inside = torch.sigmoid((radius - distance) * size * 2)
            image = image * (1 - inside) + colour[:, None, None] * inside
        images.append(image)
    return TensorData(torch.stack(images), torch.arange(batch) % 10, 10)


def tv_setting(text: str) -> float | str:
    """A `--size-tv` value: `auto` or a number."""
    return text if text == "auto" else float(text)


def sizes_table(data: TensorData, sizes: list[int], batch: int, iterations: int, tv_weights: list[float | str]) -> None:
    """`ig` by TV weight for every (size, content, model): one client, one step, lr 0.1."""
    print(f"\n`ig`, batch {batch}, one local step, {iterations} iterations, 1 restart; "
          "PSNR dB / SSIM / seconds per TV weight\n")
    print("| size | content | model | " + " | ".join(f"TV {tv:g}" if isinstance(tv, float) else f"TV {tv}" for tv in tv_weights) + " |")
    print("|---|---|---|" + "---|" * len(tv_weights))
    for size in sizes:
        for content, used in (("digits", upsampled_digits(data, size, batch)), ("rgb", synthetic_rgb(size, batch))):
            for model_name, kwargs in SIZE_MODELS:
                torch.manual_seed(0)
                cls = MODELS.get(model_name)
                model = cls(cls.Params(**kwargs), tuple(used.x.shape[1:]), 10)
                hp = LocalHyperParams(lr=0.1, batch_size=batch, local_epochs=1, local_steps=1, optimizer="sgd", momentum=0.0, weight_decay=0.0)
                target, truth = from_local_training(model, used, hp)
                cells = []
                for tv in tv_weights:
                    attack = InvertingGradients(InvertingGradients.Params(iterations=iterations, restarts=1, tv=tv), seed=0)
                    started = time.perf_counter()
                    recon = attack.reconstruct(target)
                    scores = score_images(recon.images, truth.x, recon.labels, truth.y)
                    cells.append(f"{scores['psnr']:.1f} / {scores['ssim']:.2f} / {time.perf_counter() - started:.0f}")
                print(f"| {size}x{size} | {content} | {model_name} | " + " | ".join(cells) + " |", flush=True)


def bn_table(data: TensorData, contents: list[str], batches: list[int], size: int, iterations: int, weights: list[float]) -> None:
    """`ig` and `grad_inversion` (by BN weight and statistics source) on a BN ResNet-20."""
    attacks: list[tuple[str, GradientInversion]] = [
        ("ig", InvertingGradients(InvertingGradients.Params(iterations=iterations, restarts=2), seed=0))]
    for weight in weights:
        for source in ("update", "running"):
            params = GradInversion.Params(iterations=iterations, bn=weight, bn_statistics=source)
            attacks.append((f"grad_inversion bn {weight:g} {source}", GradInversion(params, seed=0)))
    print(f"\nBN ResNet-20, {size}x{size}, one local step, {iterations} iterations, 2 restarts; "
          "PSNR dB / label accuracy / seconds\n")
    print("| content | batch | " + " | ".join(name for name, _ in attacks) + " |")
    print("|---|---|" + "---|" * len(attacks))
    for content in contents:
        for batch in batches:
            used = upsampled_digits(data, size, batch) if content == "digits" else synthetic_rgb(size, batch)
            torch.manual_seed(0)
            cls = MODELS.get("resnet20")
            model = cls(cls.Params(norm="batch"), tuple(used.x.shape[1:]), 10)
            hp = LocalHyperParams(lr=0.05, batch_size=batch, local_epochs=1, local_steps=1, optimizer="sgd", momentum=0.0, weight_decay=0.0)
            target, truth = from_local_training(model, used, hp)
            cells = []
            for _, attack in attacks:
                started = time.perf_counter()
                recon = attack.reconstruct(target)
                scores = score_images(recon.images, truth.x, recon.labels, truth.y)
                cells.append(f"{scores['psnr']:.1f} / {scores['label_accuracy']:.2f} / {time.perf_counter() - started:.0f}")
            print(f"| {content} | {batch} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--grid", type=Path, default=Path("docs/gradient_inversion_fedavg_b4.png"))
    parser.add_argument("--sections", nargs="+", choices=("psnr", "labels", "tv", "sizes", "bn"), default=["psnr", "labels", "tv"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[8, 32, 64])
    parser.add_argument("--size-batch", type=int, default=1)
    parser.add_argument("--size-iterations", type=int, default=200)
    parser.add_argument("--size-tv", nargs="+", type=tv_setting, default=[*TV_WEIGHTS, "auto"])
    parser.add_argument("--bn-contents", nargs="+", choices=("digits", "rgb"), default=["digits", "rgb"])
    parser.add_argument("--bn-batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--bn-size", type=int, default=16)
    parser.add_argument("--bn-iterations", type=int, default=500)
    parser.add_argument("--bn-weights", nargs="+", type=float, default=[0.01, 0.1])
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = digits()
    settings = {"iterations": args.iterations, "restarts": args.restarts}
    attacks = [cls(cls.Params(**settings), seed=0) for cls in (FedAvgInversion, InvertingGradients)]

    if {"psnr", "tv"} & set(args.sections):
        print(f"{args.clients} clients per cell, {args.iterations} iterations, {args.restarts} restarts; "
              "PSNR dB mean (min) | label accuracy | seconds")
    if "psnr" in args.sections:
        psnr_table(data, attacks, args.clients, args.grid)
    if "labels" in args.sections:
        label_table(data)
    if "tv" in args.sections:
        tv_table(data, args.iterations, args.restarts, args.clients)
    if "sizes" in args.sections:
        sizes_table(data, args.sizes, args.size_batch, args.size_iterations, args.size_tv)
    if "bn" in args.sections:
        bn_table(data, args.bn_contents, args.bn_batches, args.bn_size, args.bn_iterations, args.bn_weights)


if __name__ == "__main__":
    main()
