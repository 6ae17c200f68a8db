"""What an attack's numbers mean: success counts against a stated threshold, the
zero-knowledge baseline, the recognisability judge, and the leak verdicts."""

from __future__ import annotations

import torch
from rich.console import Console

from fedsim.data.datasets import TensorData
from fedsim.evaluation.metrics import (
    RECOVERED,
    describe_meaning,
    leaks,
    score_images,
    summarise_reconstructions,
    train_judge,
    zero_knowledge_baseline,
)


def images(count: int, channels: int, side: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images (blobs), so SSIM has structure to compare."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, channels, 4, 4, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)


def test_counts_and_baseline_on_rgb_and_grey_images_of_other_sizes() -> None:
    for channels, side in ((3, 16), (1, 8), (3, 32)):
        truth = images(6, channels, side)
        labels = torch.tensor([0, 1, 2, 0, 1, 2])
        reference = TensorData(images(40, channels, side, seed=1), torch.tensor([0] * 30 + [1] * 5 + [2] * 5), 3)
        exact = score_images(truth.flip(0), truth, labels, labels)  # order-free pairing
        assert exact["recovered"] == exact["paired"] == 6
        noise = score_images(torch.rand(6, channels, side, side, generator=torch.Generator().manual_seed(2)), truth, labels, labels)
        assert noise["recovered"] == 0
        baseline = zero_knowledge_baseline(truth, reference)
        assert baseline["label_chance"] == 0.75  # the majority class's rate, above 1/3
        assert baseline["baseline_recovered"] == 0 and baseline["baseline_ssim"] < 0.7
        assert 0 < baseline["baseline_psnr"] < exact["psnr"]


def test_feature_vectors_get_a_baseline_without_ssim() -> None:
    truth = torch.rand(5, 7, generator=torch.Generator().manual_seed(0))
    baseline = zero_knowledge_baseline(truth, TensorData(torch.rand(20, 7), torch.randn(20), 1))
    assert set(baseline) == {"baseline_psnr"}  # regression targets: no label chance


def test_leak_verdicts_state_threshold_and_chance() -> None:
    records = [
        {"psnr": 8.3, "ssim": 0.1, "label_accuracy": 0.84, "label_chance": 0.1, "baseline_psnr": 11.0,
         "baseline_ssim": 0.4, "recovered": 0, "paired": 4, "baseline_recovered": 0},
        {"psnr": 9.0, "ssim": 0.2, "label_accuracy": 0.84, "label_chance": 0.1, "baseline_psnr": 11.0,
         "baseline_ssim": 0.4, "recovered": 1, "paired": 4, "baseline_recovered": 0},
    ]  # fmt: skip
    summary = summarise_reconstructions(records)
    assert summary["recovered"] == 1 and summary["paired"] == 8 and summary["recovered_threshold"] == RECOVERED
    assert summary["leaked"] == [f"images: 1/8 with {RECOVERED}", "labels: accuracy 0.84 vs chance 0.10"]
    line = describe_meaning(summary)
    assert "1/8 recovered (SSIM >= 0.7)" in line and "mean-image baseline PSNR 11.0 dB" in line
    assert leaks({"label_accuracy": 0.25, "label_chance": 0.1, "recovered": 0, "paired": 4}) == []
    assert leaks({"auc": 0.52}) == [] and leaks({"auc": 0.71}) == ["membership: AUC 0.710 vs chance 0.5"]
    assert "chance AUC 0.5, TPR@FPR = FPR" in describe_meaning({"auc": 0.52})
    model_inversion = {"top1_accuracy": 0.9, "chance_top1": 0.2, "public_baseline_top1": 0.6}
    assert leaks(model_inversion) == ["class features: top-1 0.90 vs zero-knowledge 0.60"]
    assert leaks({**model_inversion, "public_baseline_top1": 0.8}) == []


def test_judge_recognises_originals_not_noise(tmp_path) -> None:
    """The judge learns two well-separated classes from the server's data; a reconstruction
    of pure noise is recognised no better than chance, the originals almost always."""
    generator = torch.Generator().manual_seed(0)
    base = torch.zeros(2, 1, 12, 12)
    base[0, :, :, :6] = 1.0
    base[1, :, :, 6:] = 1.0

    def sample(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(count) % 2
        return (base[labels] + 0.1 * torch.randn(count, 1, 12, 12, generator=generator)).clamp(0, 1), labels

    reference = TensorData(*sample(64), 2)
    judge = train_judge(reference, "two-halves", 0, tmp_path, Console(quiet=True))
    assert list(tmp_path.glob("judge-*.safetensors"))  # cached for a resumed run
    truth, labels = sample(8)
    scores = score_images(truth.clone(), truth, labels, labels, judge)
    assert scores["recognised"] == scores["recognised_truth"] == 1.0
    constant = score_images(torch.full_like(truth, 0.5), truth, labels, labels, judge)
    assert constant["recognised"] == 0.5  # one class for every copy of the same image


def test_feature_reconstructions_leak_well_above_the_mean_input() -> None:
    """No image to judge (a vqc's features): 10 dB above the mean-input baseline is a leak."""
    quantum = {"psnr": 83.2, "feature_error": 1.0e-4, "baseline_psnr": 11.7, "label_error": 0.0}
    assert leaks(quantum) == ["features: PSNR 83.2 dB (error 0.0001) vs mean input 11.7 dB"]
    assert leaks({**quantum, "psnr": 21.6}) == []  # 9.9 dB above: not a tenth of the error
    assert leaks({**quantum, "ssim": 0.2}) == []  # images are judged by SSIM counts instead
