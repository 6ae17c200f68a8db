"""What the numbers mean, beyond one run's summary: the model-inversion zero-knowledge image,
and the meaning columns (recovered counts, baselines, chance, kinds of leak) of a sweep's
results table, its seed summary and its report. Synthetic run directories, no training."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedsim.evaluation.metrics import RECOVERED, leaks, meaning_parts, summarise_reconstructions
from fedsim.evaluation.mi_evaluation import zero_knowledge_image
from fedsim.experiments.sweep_table import MANIFEST, load_results, metric_columns, seed_summary
from fedsim.reporting.report import spread_table
from fedsim.reporting.report_figures import attacks_of


def test_zero_knowledge_image_is_the_public_mean_or_grey() -> None:
    public = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4), torch.full((1, 4, 4), 0.25)])
    image, name = zero_knowledge_image(public, (1, 4, 4))
    assert image.shape == (1, 1, 4, 4) and torch.allclose(image, torch.full_like(image, 1.25 / 3))
    assert name == "mean public image"
    grey, name = zero_knowledge_image(torch.empty(0, 1, 4, 4), (1, 4, 4))
    assert torch.equal(grey, torch.full((1, 1, 4, 4), 0.5)) and name == "mid-grey image, no public data"


def test_model_inversion_meaning_states_both_baselines_and_beats_the_higher() -> None:
    scores = {"top1_accuracy": 0.8, "chance_top1": 0.2, "public_baseline_top1": 0.4, "public_baseline_knn": 9.3,
              "mean_image_baseline_top1": 0.7, "mean_image_baseline_knn": 10.8,
              "mean_image_baseline": "mean public image"}  # fmt: skip
    assert leaks(scores) == []  # 0.8 is not 0.2 above the zero-knowledge image's 0.7
    assert leaks({**scores, "mean_image_baseline_top1": 0.2}) == ["class features: top-1 0.80 vs zero-knowledge 0.40"]
    assert meaning_parts(scores) == [
        "top-1 chance 0.20",
        "zero-effort baseline (the public images the target is surest of) top-1 0.40, KNN 9.30",
        "zero-knowledge baseline (mean public image) top-1 0.70, KNN 10.80",
        "no leak beyond a zero-knowledge attacker",
    ]
    # a summary written before the zero-knowledge image existed (None) still reads
    assert len(meaning_parts({**scores, "mean_image_baseline_top1": None})) == 3


def reconstruction_summary(recovered: int, label_accuracy: float) -> dict:
    """A gradient attack's summary (4 images) with the given recovered count."""
    record = {"psnr": 12.0 + recovered, "ssim": 0.2 * recovered, "label_accuracy": label_accuracy,
              "label_chance": 0.1, "baseline_psnr": 11.0, "baseline_ssim": 0.43, "recovered": recovered,
              "paired": 4, "baseline_recovered": 0}  # fmt: skip
    return summarise_reconstructions([record])


def write_sweep(root: Path) -> None:
    """2 settings x 2 seeds: setting 0 recovers images in one seed only, labels in both."""
    cells = []
    for index, noise in enumerate((0.5, 2.0)):
        for seed in (0, 1):
            name = f"cell-{index}-{seed}"
            recovered = 3 if (index, seed) == (0, 0) else 0
            attacks = {"dlg": reconstruction_summary(recovered, 0.9 if index == 0 else 0.1)}
            summary = {"training": {"final_test_accuracy": 0.5, "wall_time_s": 1.0}, "privacy": [], "attacks": attacks}
            (root / name).mkdir(parents=True)
            (root / name / "summary.json").write_text(json.dumps(summary))
            cells.append({"name": name, "index": index, "seed": seed, "values": {"noise": noise}})
    (root / MANIFEST).write_text(json.dumps({"sweep": "s", "axes": ["noise"], "cells": cells}))


def test_sweep_table_report_and_seed_summary_carry_the_meaning(tmp_path: Path) -> None:
    write_sweep(tmp_path)
    table = load_results(tmp_path).set_index("cell")
    assert table.loc["cell-0-0", "dlg_recovered"] == 3 and table.loc["cell-0-0", "dlg_paired"] == 4
    assert table.loc["cell-0-0", "dlg_psnr_baseline"] == 11.0 and table.loc["cell-0-0", "dlg_ssim_baseline"] == 0.43
    assert table.loc["cell-0-0", "dlg_recovered_baseline"] == 0 and table.loc["cell-0-0", "dlg_label_chance"] == 0.1
    assert table.loc["cell-0-0", "dlg_leaked"] == "images; labels"
    assert table.loc["cell-0-1", "dlg_leaked"] == "labels" and table.loc["cell-1-0", "dlg_leaked"] == "none"

    summary = seed_summary(load_results(tmp_path), ["noise"])
    assert summary["dlg_recovered"].tolist() == [1.5, 0.0]
    assert summary["dlg_leaked"].tolist() == ["images 1/2; labels 2/2", "none"]
    metrics = metric_columns(load_results(tmp_path))
    assert {"dlg_recovered", "dlg_paired", "dlg_psnr_baseline", "dlg_label_chance"} <= set(metrics)
    assert attacks_of(summary) == ["dlg"]  # no baseline column passes for an attack's score
    spread = spread_table(summary, ["noise"], metrics)
    row = dict(zip(spread.headers, spread.rows[0]))
    assert row["dlg_recovered"] == "1.5 ± 2.1" and row["dlg_leaked"] == "images 1/2; labels 2/2"
    assert f"{RECOVERED}" in meaning_parts(reconstruction_summary(3, 0.9))[0]
