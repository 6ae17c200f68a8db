"""How close a reconstruction is to the client's real data: the only place ground truth is used.

The runner calls these after an attack has returned, so no attack ever sees the truth.
Images are (B, C, H, W) tensors in [0, 1]. An attack returns its batch in no particular
order, so every score first pairs each true image with the reconstruction closest to it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file, save
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from fedsim.core.results import atomic_write_bytes
from fedsim.data.datasets import TensorData
from fedsim.evaluation.mi_evaluation import EvaluationParams, train_classifier
from fedsim.models import build_model

MAX_PSNR_DB = 100.0
"""PSNR of identical images is +inf; it is reported as this finite ceiling instead, so means
and JSON files stay finite. 100 dB is an MSE of 1e-10, far below float32 image noise."""

SSIM_KERNEL = 11
SSIM_SIGMA = 1.5
"""Wang et al.'s standard SSIM window: an 11x11 Gaussian with sigma 1.5."""

LPIPS_MIN_SIDE = 64
"""LPIPS's AlexNet needs far more than 8x8 pixels: smaller images are upsampled (bilinear)
to 64x64 first, and grey images repeated over three channels."""


def pair_by_best_match(recon: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    """Indices `(truth_idx, recon_idx)`: `recon[recon_idx[i]]` is paired with `truth[truth_idx[i]]`.

    Solves the assignment problem  min sum_i MSE(truth_i, recon_pi(i))  exactly (Hungarian
    algorithm on the matrix of pairwise MSEs). When the client trained on more examples than
    the attack reconstructs (several local batches), each reconstruction is paired with a
    distinct true image and the unmatched true images are left out of the scores.
    """
    if recon.shape[1:] != truth.shape[1:]:
        raise ValueError(f"cannot pair shapes {tuple(recon.shape)} and {tuple(truth.shape)}")
    flat_truth = truth.detach().flatten(1).double().cpu()
    flat_recon = recon.detach().flatten(1).double().cpu()
    cost = torch.cdist(flat_truth, flat_recon).square() / flat_truth.shape[1]
    rows, columns = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(columns, dtype=torch.long)


def psnr_per_image(recon: Tensor, truth: Tensor) -> Tensor:
    """PSNR = 10 log10(1 / MSE) in dB per image (data range 1), capped at `MAX_PSNR_DB`."""
    psnr = peak_signal_noise_ratio(
        recon, truth, data_range=1.0, reduction="none", dim=tuple(range(1, truth.dim()))
    )
    return psnr.clamp(max=MAX_PSNR_DB)


def ssim_per_image(recon: Tensor, truth: Tensor) -> Tensor:
    """SSIM per image (data range 1) with a Gaussian window that fits the image.

    The standard 11x11 window is larger than an 8x8 digit (torchmetrics reflect-pads by half
    the window, which must stay below the image size), so the window shrinks to the largest
    odd size <= min(H, W, 11) and its sigma shrinks in proportion (1.5 * size / 11), keeping
    the standard window's shape. Images of 11x11 and up get exactly the standard window.
    As usual, the score averages only window positions that lie wholly inside the image (the
    central 2x2 of an 8x8 digit); those windows still cover every pixel.
    """
    side = min(SSIM_KERNEL, *truth.shape[-2:])
    kernel = side if side % 2 == 1 else side - 1
    return structural_similarity_index_measure(
        recon,
        truth,
        kernel_size=kernel,
        sigma=SSIM_SIGMA * kernel / SSIM_KERNEL,
        data_range=1.0,
        reduction="none",
    )


def label_accuracy(recon_labels: Tensor, true_labels: Tensor) -> float:
    """Fraction of the true labels recovered, as multisets: |recon ∩ truth| / |truth|.

    Order-free, so it needs no pairing: the batch {3, 3, 7} recovered as {7, 3, 1} scores 2/3.
    """
    recovered = Counter(recon_labels.tolist()) & Counter(true_labels.tolist())
    return sum(recovered.values()) / len(true_labels)


RECOVERED_SSIM = 0.7
"""A reconstruction counts as recovered when its SSIM to its true image is at least this.
SSIM, not PSNR: SSIM compares local structure and does not drift with image size (a
recognisable 8x8 digit can sit at 11 dB, a useless 64x64 blur above it). 0.7 leaves the
zero-knowledge guesses out even on 8x8 digits, where SSIM sees only the central windows:
there the dataset's mean image passes 0.7 for 0.4% of digits, a random digit for 3%, while
a digit under pixel noise of std 0.1 scores 0.86."""
RECOVERED = f"SSIM >= {RECOVERED_SSIM}"

LEAK_MARGIN = 0.2
"""A rate (label accuracy, recognition, model-inversion top-1) this far above what a
zero-knowledge attacker gets is flagged as a leak."""
MODEL_INVERSION_BASELINES = ("public_baseline_top1", "mean_image_baseline_top1")
"""Model-inversion top-1 rates an attack must beat besides chance: the public images the
target is surest of (zero effort), and the mean public image (zero knowledge)."""
MEMBERSHIP_LEAK_AUC = 0.6
FEATURE_LEAK_DB = 10.0
"""Feature reconstructions (no image to judge) this many dB above the mean-input baseline's
PSNR, i.e. with a tenth of its squared error or less, are flagged as a leak."""
"""A membership AUC at least this (chance: 0.5) is flagged as a leak."""

JUDGE = EvaluationParams(model={"name": "convnet", "width": 16}, epochs=10, batch_size=32, lr=1e-3)
"""The recognisability judge: a ConvNet (any image size, 1 or 3 channels) trained on the
server's held-out test set, which no client trains on, so it never saw the client's images."""


def score_images(
    recon: Tensor,
    truth: Tensor,
    recon_labels: Tensor,
    true_labels: Tensor,
    judge: nn.Module | None = None,
) -> dict[str, float | list[float]]:
    """Mean MSE, PSNR and SSIM over best-matched pairs, label accuracy, PSNR per image, the
    count recovered (`RECOVERED`), and with a `judge` the fraction of reconstructions it
    classifies as their true image's label (`recognised`) beside the same on the true images.

    `psnr_per_image` lists the paired PSNRs in the order of the (matched) true images.
    """
    truth_idx, recon_idx = pair_by_best_match(recon, truth)
    recon = recon.detach().float().cpu()[recon_idx]
    truth = truth.detach().float().cpu()[truth_idx]
    mse = (recon - truth).square().flatten(1).mean(dim=1)
    psnr = psnr_per_image(recon, truth)
    ssim = ssim_per_image(recon, truth)
    paired_labels = true_labels.cpu()[truth_idx]
    scores: dict[str, float | list[float]] = {
        "mse": mse.mean().item(),
        "psnr": psnr.mean().item(),
        "ssim": ssim.mean().item(),
        "label_accuracy": label_accuracy(recon_labels.cpu(), paired_labels),
        "recovered": int((ssim >= RECOVERED_SSIM).sum()),
        "paired": len(truth),
        "psnr_per_image": psnr.tolist(),
    }
    if judge is not None and not paired_labels.is_floating_point():
        with torch.no_grad():
            scores["recognised"] = (judge(recon.clamp(0, 1)).argmax(1) == paired_labels).float().mean().item()
            scores["recognised_truth"] = (judge(truth).argmax(1) == paired_labels).float().mean().item()
    lpips = lpips_metric()
    if lpips is not None and truth.shape[1] in (1, 3):
        scores["lpips"] = lpips(lpips_input(recon), lpips_input(truth))
    return scores


@functools.cache
def lpips_metric() -> Callable[[Tensor, Tensor], float] | None:
    """Mean LPIPS (torchmetrics, AlexNet, inputs in [0, 1]) when torchvision and the
    pretrained weights are available here; else None, logged once, and the score is left out."""
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    except (ImportError, OSError, RuntimeError) as err:
        logging.getLogger(__name__).info("LPIPS left out of the scores: %s", err)
        return None

    def mean_lpips(recon: Tensor, truth: Tensor) -> float:
        metric.reset()
        return float(metric(recon, truth))

    return mean_lpips


def lpips_input(images: Tensor) -> Tensor:
    """Three channels and at least `LPIPS_MIN_SIDE` pixels a side, values still in [0, 1]."""
    images = images.clamp(0, 1).expand(-1, 3, -1, -1)
    scale = -(-LPIPS_MIN_SIDE // min(images.shape[-2:]))
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
    return images


def score_features(
    recon: Tensor, truth: Tensor, recon_labels: Tensor, true_labels: Tensor, period: float | None = None
) -> dict[str, float | list[float]]:
    """Feature vectors (B, F) in [0, 1], where SSIM means nothing: MSE, PSNR, and the mean
    and largest per-feature error, measured around the circle when the attack says its
    inputs are periodic with `period` (a Fourier-encoded feature x and x + 1 are the same
    input). Labels: accuracy for classes, mean absolute error for regression targets.
    """
    truth_idx, recon_idx = pair_by_best_match(recon, truth)
    recon = recon.detach().double().cpu()[recon_idx].flatten(1)
    truth = truth.detach().double().cpu()[truth_idx].flatten(1)
    error = (recon - truth).abs()
    if period is not None:
        error = torch.minimum(error % period, period - error % period)
    scores: dict[str, float | list[float]] = {
        "mse": (recon - truth).square().mean().item(),
        "psnr": psnr_per_image(recon, truth).mean().item(),
        "feature_error": error.mean().item(),
        "max_feature_error": error.max().item(),
    }
    true_labels = true_labels.cpu()[truth_idx]
    if true_labels.is_floating_point():
        scores["label_error"] = (recon_labels.cpu()[recon_idx].double() - true_labels.double()).abs().mean().item()
    else:
        scores["label_accuracy"] = label_accuracy(recon_labels.cpu(), true_labels)
    return scores


def score_reconstruction(
    recon_images: Tensor,
    truth: Tensor,
    recon_labels: Tensor,
    true_labels: Tensor,
    details: dict,
    judge: nn.Module | None = None,
) -> dict[str, float | list[float]]:
    """`score_images` for images (B, C, H, W), `score_features` for feature vectors."""
    if truth.dim() == 4:
        return score_images(recon_images, truth, recon_labels, true_labels, judge)
    return score_features(recon_images, truth, recon_labels, true_labels, details.get("period"))


def zero_knowledge_baseline(truth: Tensor, reference: TensorData) -> dict[str, float | int]:
    """What an attacker who ignores the update gets, scored like an attack: every
    reconstruction is the mean of the server's own examples (`reference`: its test set), and
    every label its majority class, whose expected label accuracy is that class's rate."""
    guess = reference.x.detach().float().cpu().mean(0, keepdim=True).expand_as(truth)
    truth = truth.detach().float().cpu()
    scores: dict[str, float | int] = {"baseline_psnr": psnr_per_image(guess, truth).mean().item()}
    if truth.dim() == 4:
        ssim = ssim_per_image(guess, truth)
        scores["baseline_ssim"] = ssim.mean().item()
        scores["baseline_recovered"] = int((ssim >= RECOVERED_SSIM).sum())
    if not reference.y.is_floating_point():
        counts = torch.bincount(reference.y.cpu(), minlength=reference.num_classes)
        scores["label_chance"] = max(1 / reference.num_classes, (counts.max() / counts.sum()).item())
    return scores


def train_judge(reference: TensorData, key: object, seed: int, cache_dir: Path, console: Console) -> nn.Module:
    """The recognisability judge (`JUDGE`) trained on `reference` (the server's test set);
    cached under `cache_dir` by `key` (the data's config) and seed, so resuming reuses it."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(JUDGE.model, tuple(reference.x.shape[1:]), reference.num_classes)
    digest = hashlib.sha256(json.dumps([key, seed, JUDGE.model_dump(mode="json")]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"judge-{digest}.safetensors"
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
    else:
        train_classifier(model, reference, JUDGE, seed, console)
        atomic_write_bytes(path, save({k: v.contiguous() for k, v in model.state_dict().items()}))
    return model.eval()


SUMMARY_KEYS = (
    "mse", "psnr", "ssim", "feature_error", "label_accuracy", "label_error", "attack_loss",
    "baseline_psnr", "baseline_ssim", "label_chance", "recognised", "recognised_truth",
)  # fmt: skip
"""The scores a run summary averages over an attack's targets (those every record has)."""
COUNT_KEYS = ("recovered", "paired", "baseline_recovered")
"""The counts a run summary adds up over an attack's targets."""


def summarise_reconstructions(records: list[dict[str, Any]]) -> dict[str, Any]:
    """A reconstruction attack's summary: mean scores, counts, the threshold, what leaked."""
    summary: dict[str, Any] = {
        "targets": len(records),
        **{key: sum(r[key] for r in records) / len(records) for key in SUMMARY_KEYS if all(key in r for r in records)},
        **{key: sum(r[key] for r in records) for key in COUNT_KEYS if all(key in r for r in records)},
    }
    if "recovered" in summary:
        summary["recovered_threshold"] = RECOVERED
    if "recognised" in summary:
        summary["judge"] = f"{JUDGE.model.name} trained on the server's test set"
    summary["leaked"] = leaks(summary)
    return summary


def leaks(scores: dict[str, Any]) -> list[str]:
    """What an attack's summary shows leaked beyond a zero-knowledge attacker, in words."""
    found = []
    if scores.get("recovered", 0) > scores.get("baseline_recovered", 0):
        found.append(f"images: {scores['recovered']}/{scores['paired']} with {RECOVERED}")
    chance = scores.get("label_chance")
    if chance is not None and scores.get("label_accuracy", 0) >= chance + LEAK_MARGIN:
        found.append(f"labels: accuracy {scores['label_accuracy']:.2f} vs chance {chance:.2f}")
    if chance is not None and scores.get("recognised", 0) >= chance + LEAK_MARGIN:
        found.append(f"class: judge recognises {scores['recognised']:.2f} vs chance {chance:.2f}")
    top1, chance_top1 = scores.get("top1_accuracy"), scores.get("chance_top1")
    if top1 is not None and chance_top1 is not None:
        floor = max(chance_top1, *(scores.get(key) or 0.0 for key in MODEL_INVERSION_BASELINES))
        if top1 >= floor + LEAK_MARGIN:
            found.append(f"class features: top-1 {top1:.2f} vs zero-knowledge {floor:.2f}")
    if "feature_error" in scores and "baseline_psnr" in scores and "ssim" not in scores:
        if scores["psnr"] >= scores["baseline_psnr"] + FEATURE_LEAK_DB:
            found.append(
                f"features: PSNR {scores['psnr']:.1f} dB (error {scores['feature_error']:.2g}) "
                f"vs mean input {scores['baseline_psnr']:.1f} dB"
            )
    if scores.get("auc", 0) >= MEMBERSHIP_LEAK_AUC:
        found.append(f"membership: AUC {scores['auc']:.3f} vs chance 0.5")
    return found


def leak_kinds(verdicts: list[str]) -> list[str]:
    """The kind of each `leaks` verdict, its text before the colon ("images", "labels",
    "class", "class features", "membership"): stable over seeds, unlike the numbers."""
    return [verdict.split(":")[0] for verdict in verdicts]


def describe_scores(scores: dict) -> str:
    """One line for the console: image or feature quality, then labels."""
    if "ssim" in scores:
        parts = [f"PSNR {scores['psnr']:.1f} dB", f"SSIM {scores['ssim']:.3f}"]
    else:
        parts = [f"feature error {scores['feature_error']:.4f}"]
    if "label_accuracy" in scores:
        parts.append(f"labels {scores['label_accuracy']:.2f}")
    if "label_error" in scores:
        parts.append(f"label error {scores['label_error']:.3f}")
    return "  ".join(parts)


def describe_meaning(scores: dict[str, Any]) -> str:
    """The summary's second line for an attack: `meaning_parts` in one line."""
    return "; ".join(meaning_parts(scores))


MEANINGS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("recovered",), "{recovered}/{paired} recovered ({recovered_threshold})"),
    (("baseline_ssim",), "mean-image baseline PSNR {baseline_psnr:.1f} dB, SSIM {baseline_ssim:.3f}"),
    (("baseline_psnr", "feature_error"), "mean-input baseline PSNR {baseline_psnr:.1f} dB"),
    (("label_chance",), "label chance {label_chance:.2f}"),
    (("recognised",), "recognised {recognised:.2f}, originals {recognised_truth:.2f} (judge: {judge})"),
    (("chance_top1",), "top-1 chance {chance_top1:.2f}"),
    (("public_baseline_top1",),
     "zero-effort baseline (the public images the target is surest of) top-1 {public_baseline_top1:.2f}, "
     "KNN {public_baseline_knn:.2f}"),
    (("mean_image_baseline_top1", "mean_image_baseline"),
     "zero-knowledge baseline ({mean_image_baseline}) top-1 {mean_image_baseline_top1:.2f}, "
     "KNN {mean_image_baseline_knn:.2f}"),
    (("auc",), "chance AUC 0.5, TPR@FPR = FPR"),
)  # fmt: skip
"""What a summary's scores mean, one part each: (the keys that must be present, the text)."""


def meaning_parts(scores: dict[str, Any]) -> list[str]:
    """What an attack's scores mean: success count against the stated threshold, the
    zero-knowledge baseline, the judge, and what leaked (or that nothing did)."""
    parts = [
        template.format_map(scores)
        for keys, template in MEANINGS
        if all(scores.get(key) is not None for key in keys)
    ]
    leaked = scores.get("leaked", leaks(scores))
    parts.append("LEAKED: " + "; ".join(leaked) if leaked else "no leak beyond a zero-knowledge attacker")
    return parts


GRID_COLUMNS = 16
"""Truth-over-reconstruction pairs per row of an image grid (about 2,000 px wide at most)."""
GRID_ROWS = 4
"""Rows of pairs in a grid file; the pairs beyond go to `more_path` (at most `MORE_ROWS` rows)."""
MORE_ROWS = 16


def more_path(path: Path) -> Path:
    """Where `save_image_grid` puts the pairs that do not fit in `path`: `more/<name>` beside
    it, out of the way of readers that take one PNG per attacked observation."""
    return path.parent / "more" / path.name


def save_image_grid(truth: Tensor, recon: Tensor, path: Path, title: str = "") -> None:
    """Write a PNG of true images over their best-matched reconstructions, `GRID_COLUMNS`
    pairs a row and at most `GRID_ROWS` rows, so the file stays readable however large the
    batch; the next pairs (up to `MORE_ROWS` rows) go to `more_path(path)`, linked by reports.
    """
    truth_idx, recon_idx = pair_by_best_match(recon, truth)
    recon = recon.detach().cpu()[recon_idx].clamp(0, 1)
    truth = truth.detach().cpu()[truth_idx].clamp(0, 1)
    path = Path(path)
    shown = GRID_COLUMNS * GRID_ROWS
    count = len(truth)
    write_grid(truth[:shown], recon[:shown], path, title + (f" (pairs 1-{shown} of {count})" if count > shown else ""))
    if count > shown:
        end = min(count, shown + GRID_COLUMNS * MORE_ROWS)
        more_title = f"{title} (pairs {shown + 1}-{end} of {count})"
        write_grid(truth[shown:end], recon[shown:end], more_path(path), more_title)
    else:
        more_path(path).unlink(missing_ok=True)


def mosaic(truth: Tensor, recon: Tensor) -> Tensor:
    """The pairs as one (H', W', 3) image: rows of up to `GRID_COLUMNS` pairs, truth above its
    reconstruction, one pixel of white between images. One array, drawn with one `imshow`:
    a subplot per image costs matplotlib ~40 ms each (seconds for a large batch)."""
    count, channels, height, width = truth.shape
    columns = min(count, GRID_COLUMNS)
    pair_rows = -(-count // GRID_COLUMNS)
    gap = 1
    canvas = torch.ones(2 * pair_rows * (height + gap), columns * (width + gap), 3)
    for index in range(count):
        pair_row, column = divmod(index, GRID_COLUMNS)
        for offset, image in enumerate((truth[index], recon[index])):
            top, left = (2 * pair_row + offset) * (height + gap), column * (width + gap)
            canvas[top : top + height, left : left + width] = image.permute(1, 2, 0).expand(height, width, 3)
    return canvas


def write_grid(truth: Tensor, recon: Tensor, path: Path, title: str) -> None:
    """One PNG, written atomically (beside `path`, then renamed over it): rows of up to
    `GRID_COLUMNS` pairs, truth above reconstruction."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    count = len(truth)
    columns = min(count, GRID_COLUMNS)
    pair_rows = -(-count // GRID_COLUMNS)
    width, height = max(4.0, 1.1 * columns + 0.6), 2.2 * pair_rows + 0.5  # inches; room for the title
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    # margins in inches (room for the row names and the title), whatever the grid's size
    axis = figure.add_axes((0.45 / width, 0.1 / height, 1 - 0.55 / width, 1 - 0.55 / height))
    axis.imshow(mosaic(truth, recon).numpy(), vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
    axis.set_xticks([])
    axis.set_yticks([])
    for side in axis.spines.values():
        side.set_visible(False)
    for row in range(2 * pair_rows):  # large type: reports show a wide grid scaled down
        name = "truth" if row % 2 == 0 else "reconstruction"
        y = 1 - (row + 0.5) / (2 * pair_rows)
        axis.text(-0.22 / (width - 0.55), y, name, transform=axis.transAxes, rotation=90,
                  fontsize=12, ha="center", va="center")  # fmt: skip
    if title:
        figure.suptitle(title, fontsize=14)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            figure.savefig(file, format="png", dpi=100)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
