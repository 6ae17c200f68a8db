"""DLG and iDLG on real 8x8 digits against DLG's sigmoid LeNet, and the image metrics.

The target is built by hand: one client with one real digit takes one SGD step, and the
server sees `update = -lr * gradient`. The attacks get only that `GradientTarget`.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from fedsim.attacks.dlg import DLG, IDLG
from fedsim.attacks.gradient_matching import l2_distance, mean_step_gradient
from fedsim.attacks.label_inference import idlg_label, last_layer
from fedsim.evaluation.metrics import (
    MAX_PSNR_DB,
    label_accuracy,
    pair_by_best_match,
    psnr_per_image,
    save_image_grid,
    score_images,
)
from fedsim.core.attack import GradientTarget, Reconstruction
from fedsim.core.errors import UserError
from fedsim.core.registry import ATTACKS, MODELS

LR = 0.1
SHAPE = (1, 8, 8)
PIXEL_ACCURATE_DB = 30.0


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 sklearn digits as (N, 1, 8, 8) images in [0, 1] and their labels."""
    data = load_digits()
    images = torch.tensor(data.data, dtype=torch.float32).reshape(-1, *SHAPE) / 16
    return images, torch.tensor(data.target)


def observe(images: torch.Tensor, labels: torch.Tensor, model_seed: int = 0) -> GradientTarget:
    """What the server sees after one client takes one SGD step on (images, labels)."""
    torch.manual_seed(model_seed)
    lenet = MODELS.get("lenet")
    model = lenet(lenet.Params(), SHAPE, 10)  # sigmoid, U(-0.5, 0.5) init, as in DLG
    loss = F.cross_entropy(model(images), labels)
    gradients = torch.autograd.grad(loss, list(model.parameters()))
    update = {name: -LR * g for (name, _), g in zip(model.named_parameters(), gradients)}
    update |= {name: torch.zeros_like(b) for name, b in model.named_buffers()}
    return GradientTarget(
        model=copy.deepcopy(model),
        update=update,
        num_examples=len(labels),
        lr=LR,
        local_steps=1,
        batch_size=len(labels),
        input_shape=SHAPE,
        num_classes=10,
        server_round=1,
        client=0,
    )


def test_target_carries_no_ground_truth() -> None:
    fields = {f.name for f in dataclasses.fields(GradientTarget)}
    assert fields == {
        "model", "update", "num_examples", "lr", "local_steps", "batch_size",
        "input_shape", "num_classes", "server_round", "client", "known_labels",
        "optimizer", "momentum", "weight_decay", "proximal_mu",
        "start",  # the attacker's own starting point, not the client's data
    }  # fmt: skip
    assert not any(word in name for name in fields for word in ("image", "data", "input_x"))


def test_attacks_are_registered() -> None:
    assert ATTACKS.get("dlg") is DLG
    assert ATTACKS.get("idlg") is IDLG
    assert (DLG.Params().iterations, DLG.Params().evaluations_per_step) == (15, 20)  # 300 evaluations
    with pytest.raises(ValueError):
        DLG.Params(iteratons=10)


def test_dlg_recovers_single_digits(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = digits
    psnrs, label_hits = [], []
    for index in range(0, 35, 7):
        truth, label = images[index : index + 1], labels[index : index + 1]
        recon = DLG(DLG.Params(), seed=0).reconstruct(observe(truth, label))
        assert recon.images.shape == truth.shape
        assert 0 <= recon.images.min() <= recon.images.max() <= 1
        scores = score_images(recon.images, truth, recon.labels, label)
        psnrs.append(scores["psnr"])
        label_hits.append(scores["label_accuracy"])
    assert sum(p >= PIXEL_ACCURATE_DB for p in psnrs) >= 4, psnrs
    assert sum(label_hits) >= 4, label_hits


def test_idlg_label_always_right(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = digits
    for digit in range(10):
        index = int((labels == digit).nonzero()[0])
        target = observe(images[index : index + 1], labels[index : index + 1], model_seed=digit)
        weight, _ = last_layer(target)
        assert int(idlg_label(mean_step_gradient(target)[weight])) == digit


def test_idlg_recovers_images(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = digits
    psnrs = []
    for index in (3, 11):
        truth, label = images[index : index + 1], labels[index : index + 1]
        recon = IDLG(IDLG.Params(), seed=0).reconstruct(observe(truth, label))
        assert recon.labels.tolist() == label.tolist()
        psnrs.append(score_images(recon.images, truth, recon.labels, label)["psnr"])
    assert max(psnrs) >= PIXEL_ACCURATE_DB, psnrs


def test_idlg_refuses_batches(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = digits
    with pytest.raises(UserError, match="batch_size=2"):
        IDLG(IDLG.Params(iterations=1), seed=0).reconstruct(observe(images[:2], labels[:2]))


def test_dlg_known_labels_need_labels(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = digits
    target = observe(images[:1], labels[:1])
    with pytest.raises(UserError, match="known labels"):
        DLG(DLG.Params(labels="known"), seed=0).reconstruct(target)
    recon = DLG(DLG.Params(labels="known", iterations=1, evaluations_per_step=5), seed=0).reconstruct(
        dataclasses.replace(target, known_labels=labels[:1])
    )
    assert recon.labels.tolist() == labels[:1].tolist()


def test_same_seed_same_reconstruction(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = digits
    target = observe(images[:2], labels[:2])
    params = DLG.Params(iterations=1, restarts=2)

    def run(seed: int) -> Reconstruction:
        return DLG(params, seed=seed).reconstruct(target)

    first, again, other = run(5), run(5), run(6)
    assert first.images.shape == (2, *SHAPE)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert first.attack_loss == again.attack_loss
    assert not torch.equal(first.images, other.images)


def test_psnr_of_identical_and_noisy_images() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((4, 3, 16, 16), generator=generator)
    assert psnr_per_image(x, x).tolist() == [MAX_PSNR_DB] * 4
    noisy = x + 0.1 * torch.randn(x.shape, generator=generator)  # MSE 0.01 -> 20 dB
    assert psnr_per_image(noisy, x).mean().item() == pytest.approx(20.0, abs=1.0)


def test_pairing_undoes_a_shuffle() -> None:
    generator = torch.Generator().manual_seed(1)
    truth = torch.rand((6, 1, 8, 8), generator=generator)
    shuffle = torch.randperm(6, generator=generator)
    recon = truth[shuffle] + 0.01 * torch.randn(truth.shape, generator=generator)
    truth_idx, recon_idx = pair_by_best_match(recon, truth)
    assert torch.equal(truth_idx, torch.arange(6))
    assert torch.equal(shuffle[recon_idx], torch.arange(6))
    scores = score_images(recon, truth, torch.arange(6)[shuffle], torch.arange(6))
    assert scores["label_accuracy"] == 1.0 and scores["ssim"] > 0.95
    assert len(scores["psnr_per_image"]) == 6


def test_label_accuracy_is_order_free() -> None:
    assert label_accuracy(torch.tensor([7, 3, 3]), torch.tensor([3, 3, 7])) == 1.0
    assert label_accuracy(torch.tensor([7, 3, 1]), torch.tensor([3, 3, 7])) == pytest.approx(2 / 3)


def test_save_image_grid(tmp_path: Path) -> None:
    truth = torch.rand((3, 1, 8, 8))
    path = tmp_path / "grid" / "dlg.png"
    save_image_grid(truth, truth.flip(0), path, title="DLG")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1024
    assert [p.name for p in path.parent.iterdir()] == ["dlg.png"]
    save_image_grid(torch.rand((2, 3, 8, 8)), torch.rand((2, 3, 8, 8)), path)


def test_non_finite_distance_stops_early(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = digits
    target = observe(images[:1], labels[:1])
    broken = {name: torch.full_like(u, float("nan")) for name, u in target.update.items()}
    recon = DLG(DLG.Params(), seed=0).reconstruct(dataclasses.replace(target, update=broken))
    assert recon.details["iterations"] == 1 and recon.details["objective_evaluations"] == 1
    assert recon.attack_loss == float("inf")
    assert torch.isfinite(recon.images).all()


def test_budget_counts_lbfgs_steps_as_torch_does(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    """3 steps of 5 evaluations = torch.optim.LBFGS(max_iter=5).step called 3 times: the same
    15 evaluations, the same lowest distance; splitting the budget differently changes nothing."""
    images, labels = digits
    target = dataclasses.replace(observe(images[:1], labels[:1]), known_labels=labels[:1])
    start = torch.full((1, *SHAPE), 0.5)
    target = dataclasses.replace(target, start=start)
    found = DLG(DLG.Params(labels="known", iterations=3, evaluations_per_step=5), seed=0).reconstruct(target)
    assert (found.details["iterations"], found.details["objective_evaluations"]) == (3, 15)

    observed = mean_step_gradient(target)
    model = copy.deepcopy(target.model)
    x = start.clone().requires_grad_()
    reference = torch.optim.LBFGS([x], lr=1.0, max_iter=5, history_size=100)
    losses: list[float] = []

    def closure() -> torch.Tensor:
        reference.zero_grad()
        gradient = torch.autograd.grad(F.cross_entropy(model(x), labels[:1]), list(model.parameters()), create_graph=True)
        loss = l2_distance(list(gradient), observed)
        loss.backward()
        losses.append(float(loss.detach()))
        return loss

    for _ in range(3):
        reference.step(closure)
    assert len(losses) == 15
    assert found.attack_loss == pytest.approx(min(losses), rel=1e-3)  # float32 rounding
    other = DLG(DLG.Params(labels="known", iterations=1, evaluations_per_step=15), seed=0).reconstruct(target)
    assert torch.equal(other.images, found.images) and other.details["iterations"] == 1
