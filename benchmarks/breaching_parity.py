r"""fedsim's `ig` and `dlg` beside breaching 0.1.2's Inverting Gradients and DLG, on the same gradients.

Four cases, each one cross-entropy gradient of a batch at an untrained model
(torch.manual_seed(0)): 32x32 upsampled digits on Zhu et al.'s sigmoid LeNet (`lenet`) and
32x32 synthetic RGB scenes on a ConvNet (`convnet`, width 16), batches of 1 and 4
(`benchmarks/ig_table.py` draws the images). Both sides get the same weights, the same
gradient, the true labels (fedsim `labels: known`, breaching `metadata.labels`) and the same
starting images (U[0, 1]: fedsim's `start`, breaching's `initial_data`), so what differs is
the image optimisation itself:

- Inverting Gradients at breaching's `attack/invertinggradients.yaml` (cosine distance,
  signed Adam lr 0.1, step decay at 3/8, 5/8, 7/8, boxed to [0, 1], TV 0.2, 1 restart) with
  the budget cut from 24,000 to 500 and 2,000 iterations: 24,000 would take about 30 minutes
  for the four cases and both sides on 2 CPUs (the line below the table projects it from the
  measured time per evaluation). fedsim `tv: 0.2`: both TVs are mean |dx| + mean |dy|.
- DLG: L-BFGS (torch's, lr 1, no line search, 20 evaluations a step), 50 steps, squared
  gradient distance under the known labels: breaching's `attack/deepleakage.yaml` with
  `attack_type=optimization` (its joint label optimisation refuses given labels) and
  `objective.scale=2` (its Euclidean loss is half the sum of squares, fedsim's the sum).

Not equalised (each side as it ships): breaching's TV zero-pads, so it also counts |x| on
the right column and bottom row and pulls them towards 0 (fedsim takes differences inside the
image only); breaching keeps the iterate with the lowest objective, fedsim's `ig` the last one
(fedsim's `dlg` keeps the best evaluated point; breaching's L-BFGS the point after the step
whose starting loss was lowest); breaching's step decay falls at iteration n // 2.667,
n // 1.6, n // 1.142 (749, 1250, 1751 at 2,000), fedsim's at int(3n/8), ... (750, 1250, 1750);
torch's L-BFGS ends a step early once the loss changes by < 1e-9 (fewer evaluations),
fedsim's spends the whole budget. breaching's TotalVariation is written for 3 channels (a
grouped convolution with groups=3); on the 1-channel digits the script gives it one group per
channel (`fit_tv_to_channels`), the same per-channel formula.

Each row reports the budget in iterations and in objective evaluations (counted on both sides
as forward calls of the model, so breaching's final scoring evaluation is included), PSNR by
fedsim's `score_images` (best-match pairing, [0, 1] data range; breaching's unboxed DLG
output is clamped to [0, 1] first, as fedsim's is), mean and per image, and the wall time of
each attack divided by its evaluations, the two sides run alternately in one process on one
torch thread after an untimed warm-up. The load average (`uptime`) is printed before and after.

Setup. breaching needs its own environment, and PyPI's torchvision 0.29.1 does not load
beside torch 2.13.0 (`operator torchvision::nms does not exist`), so /work/bvenv gets a
local import-only stub package `torchvision`: just the names breaching 0.1.2 and torchmetrics
import when torchvision is importable (`transforms.Compose/ToTensor/Normalize`,
`models.densenet._DenseLayer`, `models.resnet50/vgg16/VGG16_Weights`,
`datasets.utils.download_and_extract_archive`, `utils.save_image`), each raising if used;
any other `torchvision.models` name raises ModuleNotFoundError, so fedsim leaves LPIPS out as
it does without torchvision. Nothing here uses torchvision:

    python3 -m venv /work/bvenv
    /work/bvenv/bin/pip install torch==2.13.0
    /work/bvenv/bin/pip install --no-deps breaching==0.1.2
    /work/bvenv/bin/pip install hydra-core scipy
    S=$(echo /work/bvenv/lib/python3*/site-packages)/torchvision && mkdir -p $S/models $S/datasets
    echo '# Import-only torchvision stub (see fedsim benchmarks/breaching_parity.py).' > $S/_stub.py
    echo 'def refuse(*args, **kwargs): raise RuntimeError("torchvision is an import-only stub")' >> $S/_stub.py
    echo 'class Unavailable: __init__ = refuse' >> $S/_stub.py
    echo 'from torchvision import datasets, models, transforms, utils' > $S/__init__.py
    echo 'from torchvision._stub import Unavailable as Compose, Unavailable as ToTensor, Unavailable as Normalize' > $S/transforms.py
    printf 'import torch\nfrom torchvision._stub import refuse\nclass _DenseLayer(torch.nn.Module): __init__ = refuse\n' > $S/models/densenet.py
    printf 'from torchvision.models import densenet\nfrom torchvision._stub import refuse as resnet50, refuse as vgg16, Unavailable as VGG16_Weights\n' > $S/models/__init__.py
    printf 'def __getattr__(name): raise ModuleNotFoundError(f"torchvision.models.{name}: stub")\n' >> $S/models/__init__.py
    echo 'from torchvision.datasets import utils' > $S/datasets/__init__.py
    echo 'from torchvision._stub import refuse as download_and_extract_archive' > $S/datasets/utils.py
    echo 'from torchvision._stub import refuse as save_image' > $S/utils.py
    /work/bvenv/bin/pip install -e /work/main --no-deps
    /work/bvenv/bin/pip install pydantic typer rich scikit-learn torchmetrics safetensors

Run (about 5 minutes on 2 CPUs at the defaults: 288 to 295 s measured; `--ig-iterations 24000
--dlg-steps 0`, breaching's full IG budget, 29 min):

    /work/bvenv/bin/python benchmarks/breaching_parity.py [--ig-iterations 500 2000] [--dlg-steps 50 (0: IG only)]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import breaching
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from fedsim.attacks.dlg import DLG
from fedsim.attacks.inverting_gradients import InvertingGradients
from fedsim.core.attack import from_gradient
from fedsim.core.registry import MODELS
from fedsim.evaluation.metrics import score_images

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ig_table import digits, synthetic_rgb, upsampled_digits  # noqa: E402

SIZE = 32
CLASSES = 10
BATCHES = (1, 4)
TV = 0.2
"""breaching's `regularization.total_variation.scale`, and fedsim's `tv` to match."""
PAPER_ITERATIONS = 24_000
"""breaching's `optim.max_iterations` for Inverting Gradients."""
BREACHING_SETUP = {"dtype": torch.float, "device": torch.device("cpu")}
FedsimAttack = InvertingGradients | DLG


@dataclass
class Case:
    """One observed gradient: the model at its weights, the true batch, and the shared start."""

    name: str
    model: nn.Module
    images: Tensor
    labels: Tensor
    gradient: list[Tensor]
    start: Tensor


@dataclass
class Outcome:
    """One side's result on one case: PSNR per image, evaluations made and wall seconds."""

    psnr: list[float]
    evaluations: int
    seconds: float

    @property
    def ms_per_evaluation(self) -> float:
        return 1000 * self.seconds / self.evaluations


def build_case(content: str, batch: int) -> Case:
    """The batch of `content` (digits on lenet, rgb on convnet), its CE gradient at the
    untrained model (seed 0) and a U[0, 1] start shared by both sides."""
    data = upsampled_digits(digits(), SIZE, batch) if content == "digits" else synthetic_rgb(SIZE, batch)
    model_name, params = ("lenet", {}) if content == "digits" else ("convnet", {"width": 16})
    torch.manual_seed(0)
    cls = MODELS.get(model_name)
    model = cls(cls.Params(**params), tuple(data.x.shape[1:]), CLASSES)
    loss = F.cross_entropy(model(data.x), data.y)
    gradient = [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]
    start = torch.rand(data.x.shape, generator=torch.Generator().manual_seed(1))
    return Case(f"{content} {model_name} b{batch}", model, data.x, data.y, gradient, start)


def counting_forwards(model: nn.Module) -> tuple[nn.Module, Callable[[], int]]:
    """A copy of `model` that counts its forward calls, and the counter's reader. Copies of
    the copy count too (each side deep-copies the model it is given): the hook is a plain
    function, which deepcopy shares."""
    calls = [0]

    def count(module: nn.Module, inputs: object, output: object) -> None:
        calls[0] += 1

    counted = copy.deepcopy(model)
    counted.register_forward_hook(count)
    return counted, lambda: calls[0]


def score(case: Case, images: Tensor) -> list[float]:
    """fedsim's PSNR per image (best-match pairs) of `images` against the true batch."""
    return score_images(images.clamp(0, 1), case.images, case.labels, case.labels)["psnr_per_image"]


def run_fedsim(case: Case, attack: FedsimAttack) -> Outcome:
    """fedsim's attack on the case's gradient, with known labels and the shared start."""
    model, evaluations = counting_forwards(case.model)
    target = from_gradient(
        model, case.gradient, len(case.labels), tuple(case.images.shape[1:]), CLASSES,
        client=0, known_labels=case.labels, start=case.start,
    )  # fmt: skip
    started = time.perf_counter()
    recon = attack.reconstruct(target)
    seconds = time.perf_counter() - started
    return Outcome(score(case, recon.images), evaluations(), seconds)


def fedsim_ig(iterations: int) -> InvertingGradients:
    params = InvertingGradients.Params(
        iterations=iterations, restarts=1, tv=TV, lr=0.1, distance="cosine", labels="known"
    )
    return InvertingGradients(params, seed=0)


def fedsim_dlg(steps: int) -> DLG:
    return DLG(DLG.Params(iterations=steps, evaluations_per_step=20, lr=1.0, restarts=1, labels="known"), seed=0)


def breaching_config(attack: str, overrides: list[str]) -> DictConfig:
    """breaching's attack config `attack` with `overrides`, its prints and hydra's
    version_base warning silenced."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return breaching.get_attack_config(attack, overrides=[*overrides, "optim.callback=1000000"])


def breaching_ig(iterations: int) -> DictConfig:
    return breaching_config("invertinggradients", [f"optim.max_iterations={iterations}"])


def breaching_dlg(steps: int) -> DictConfig:
    overrides = ["attack_type=optimization", f"optim.max_iterations={steps}", "objective.scale=2.0"]
    return breaching_config("deepleakage", overrides)


def fit_tv_to_channels(attacker: object, channels: int) -> None:
    """breaching's TotalVariation convolves with 3 groups (RGB only); on other channel
    counts give it one group per channel, the same per-channel |dx| + |dy|."""
    for regularizer in getattr(attacker, "regularizers", []):
        if regularizer.groups != channels:
            regularizer.groups = channels
            regularizer.weight = regularizer.weight[: 2 * channels]


def run_breaching(case: Case, cfg: DictConfig) -> Outcome:
    """breaching's attack on the case's gradient, with known labels and the shared start
    (images in [0, 1]: data mean 0, std 1)."""
    model, evaluations = counting_forwards(case.model)
    channels = case.images.shape[1]
    attacker = breaching.attacks.prepare_attack(model, nn.CrossEntropyLoss(), cfg, BREACHING_SETUP)
    fit_tv_to_channels(attacker, channels)
    metadata = OmegaConf.create({
        "shape": list(case.images.shape[1:]), "mean": [0.0] * channels, "std": [1.0] * channels,
        "classes": CLASSES, "modality": "vision", "task": "classification",
    })  # fmt: skip
    parameters = [p.detach().clone() for p in case.model.parameters()]
    server_payload = {"parameters": parameters, "buffers": None, "metadata": metadata}
    shared_data = {
        "gradients": [g.clone() for g in case.gradient], "buffers": None,
        "metadata": {"num_data_points": len(case.labels), "labels": case.labels.clone(), "local_hyperparams": None},
    }  # fmt: skip
    started = time.perf_counter()
    recon, _ = attacker.reconstruct([server_payload], [shared_data], {}, initial_data=case.start.clone(), dryrun=False)
    seconds = time.perf_counter() - started
    return Outcome(score(case, recon["data"].detach()), evaluations(), seconds)


def psnr_cell(psnr: list[float]) -> str:
    mean = sum(psnr) / len(psnr)
    return f"{mean:.1f} ({', '.join(f'{p:.1f}' for p in psnr)})" if len(psnr) > 1 else f"{mean:.1f}"


def row(case: Case, attack: str, budget: str, ours: Outcome, theirs: Outcome) -> str:
    ratio = ours.ms_per_evaluation / theirs.ms_per_evaluation
    return (
        f"| {case.name} | {attack} | {budget}; {ours.evaluations} / {theirs.evaluations} "
        f"| {psnr_cell(ours.psnr)} | {psnr_cell(theirs.psnr)} "
        f"| {ours.ms_per_evaluation:.2f} | {theirs.ms_per_evaluation:.2f} | {ratio:.2f} |"
    )


def compare(case: Case, fedsim_attack: FedsimAttack, cfg: DictConfig, first_fedsim: bool) -> tuple[Outcome, Outcome]:
    """Both sides on `case`, fedsim first or second (alternated so drifts of load even out)."""
    if first_fedsim:
        ours = run_fedsim(case, fedsim_attack)
        return ours, run_breaching(case, cfg)
    theirs = run_breaching(case, cfg)
    return run_fedsim(case, fedsim_attack), theirs


def warm_up() -> None:
    """One tiny run of every attack on each side, untimed, so that first-call costs (torch.func
    set-up, TorchScript of breaching's objectives) stay out of the timings."""
    case = build_case("digits", 1)
    for fedsim_attack, cfg in ((fedsim_ig(2), breaching_ig(2)), (fedsim_dlg(1), breaching_dlg(1))):
        compare(case, fedsim_attack, cfg, first_fedsim=True)


def load() -> str:
    return "load average (uptime): " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def run_cases(ig_iterations: list[int], dlg_steps: int) -> dict[str, float]:
    """Print one table row per (case, attack, budget); return per case the two sides' summed
    ms per IG evaluation at the last IG budget."""
    both_sides: dict[str, float] = {}
    turn = 0
    for content in ("digits", "rgb"):
        for batch in BATCHES:
            case = build_case(content, batch)
            runs = [("ig", f"{n}", fedsim_ig(n), breaching_ig(n)) for n in ig_iterations]
            if dlg_steps:
                runs.append(("dlg", f"{dlg_steps} L-BFGS steps", fedsim_dlg(dlg_steps), breaching_dlg(dlg_steps)))
            for attack, budget, fedsim_attack, cfg in runs:
                ours, theirs = compare(case, fedsim_attack, cfg, first_fedsim=turn % 2 == 0)
                turn += 1
                print(row(case, attack, budget, ours, theirs), flush=True)
                if attack == "ig":
                    both_sides[case.name] = ours.ms_per_evaluation + theirs.ms_per_evaluation
    return both_sides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ig-iterations", nargs="+", type=int, default=[500, 2000])
    parser.add_argument("--dlg-steps", type=int, default=50, help="0: no DLG rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warm_up()
    print(f"torch {torch.__version__}, 1 thread; {load()}\n")
    print("| case | attack | budget (iterations; evaluations fedsim / breaching) | fedsim PSNR dB mean (per image) "
          "| breaching PSNR dB mean (per image) | fedsim ms/eval | breaching ms/eval | ratio fedsim/breaching |")
    print("|---|---|---|---|---|---|---|---|")
    both_sides = run_cases(args.ig_iterations, args.dlg_steps)
    minutes = {name: ms * PAPER_ITERATIONS / 60_000 for name, ms in both_sides.items()}
    print(f"\nbreaching's {PAPER_ITERATIONS:,} IG iterations, both sides, at the last measured ms/eval: "
          + ", ".join(f"{name} {m:.0f} min" for name, m in minutes.items())
          + f"; {sum(minutes.values()):.0f} min in all.\n{load()}")


if __name__ == "__main__":
    main()
