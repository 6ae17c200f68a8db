"""Gradient inversion suite: the shared maths, batched L-BFGS, label inference, IG, FedAvg-update
inversion, vectorised restarts/targets, the runner's threat-model honesty and the CLI filters.

Targets come from fedsim's own client loop (`fedsim.attacks.targets.from_local_training`) on real
8x8 digits; attacks only ever get the `GradientTarget`, the truth is used to score.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import run_cli
from rich.console import Console
from sklearn.datasets import load_digits
from torch import nn

from fedsim.attacks.batched_lbfgs import BatchedLBFGS
from fedsim.attacks.dlg import DLG
from fedsim.attacks.fedavg_inversion import FedAvgInversion, local_schedule, unrolled_update
from fedsim.attacks.gradient_matching import (
    FunctionalModel,
    MatchingProblem,
    cosine_distance,
    l2_distance,
    mean_step_gradient,
    one_gradient,
    total_variation,
)
from fedsim.attacks.inverting_gradients import InvertingGradients, tv_weight
from fedsim.attacks.label_inference import (
    estimated_scale,
    infer_labels,
    labels_from_counts,
    last_layer,
    mean_prediction,
)
from fedsim.evaluation.metrics import label_accuracy, score_images
from fedsim.attacks.targets import from_gradient, from_local_training
from fedsim.core.attack import GradientTarget
from fedsim.core.config import build_scenario
from fedsim.data.datasets import FederatedData, TensorData
from fedsim.core.errors import UserError
from fedsim.federation.observer import load_ground_truth
from fedsim.core.registry import ATTACKS, MODELS
from fedsim.core.results import RunDirectory
from fedsim.pipeline.runner import attack_run, load_run_scenario, run_scenario
from fedsim.federation.training import LocalHyperParams, make_loader

SHAPE = (1, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> TensorData:
    data = load_digits()
    return TensorData(torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1), torch.tensor(data.target), 10)


def model(name: str, seed: int = 0, **params: object) -> nn.Module:
    torch.manual_seed(seed)
    cls = MODELS.get(name)
    return cls(cls.Params(**params), SHAPE, 10)


def hyper(batch_size: int, steps: int, lr: float = 0.05, **extra: object) -> LocalHyperParams:
    values = {"lr": lr, "batch_size": batch_size, "local_epochs": 1, "local_steps": steps,
              "optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0}  # fmt: skip
    return LocalHyperParams(**{**values, **extra})  # type: ignore[arg-type]


def client(digits: TensorData, first: int, count: int, hp: LocalHyperParams, net: nn.Module, index: int = 0) -> tuple[GradientTarget, TensorData]:
    return from_local_training(net, digits.subset(list(range(first, first + count))), hp, seed=index, client=index)


# ----------------------------------------------------------------------------- shared maths


def test_distances_and_total_variation() -> None:
    a = [torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 2.0]])]
    assert float(cosine_distance(a, [2 * t for t in a])) == pytest.approx(0.0, abs=1e-6)
    assert float(cosine_distance(a, [-t for t in a])) == pytest.approx(2.0)
    assert float(cosine_distance(a, [torch.tensor([0.0, 1.0]), torch.tensor([[0.0, 0.0]])])) == pytest.approx(1.0)
    assert float(l2_distance(a, [torch.zeros(2), torch.zeros(1, 2)])) == pytest.approx(5.0)
    stripes = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).reshape(1, 1, 2, 2)  # |dx| = 1, |dy| = 0
    assert total_variation(stripes).item() == pytest.approx(1.0)
    assert total_variation(stripes.expand(3, 4, 1, 1, 2, 2)).shape == (3, 4)


def test_batched_lbfgs_reproduces_torch_lbfgs_row_by_row() -> None:
    """Three ill-conditioned quadratics stacked: each row follows its own torch.optim.LBFGS."""
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([[1.0, 10.0, 100.0], [2.0, 3.0, 50.0], [0.5, 5.0, 20.0]])
    starts = torch.randn((3, 3), generator=generator)

    def loss(x: torch.Tensor, row: slice | int) -> torch.Tensor:
        return 0.5 * (scales[row] * (x - 1) ** 2).sum(-1) + 0.1 * (x**4).sum(-1)

    optimizer, x = BatchedLBFGS(lr=0.1, history_size=5), starts.clone()
    for _ in range(12):
        point = x.clone().requires_grad_()
        (gradient,) = torch.autograd.grad(loss(point, slice(None)).sum(), point)
        x = x + optimizer.step(gradient, torch.ones(3, dtype=torch.bool))
    for row in range(3):
        single = starts[row].clone().requires_grad_()
        reference = torch.optim.LBFGS([single], lr=0.1, max_iter=1, history_size=5)
        closure = partial(lbfgs_closure, reference, single, partial(loss, row=row))
        for _ in range(12):
            reference.step(closure)
        assert torch.allclose(x[row], single.detach(), atol=1e-5), row


def lbfgs_closure(optimizer: torch.optim.Optimizer, x: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    optimizer.zero_grad()
    value = loss(x)
    value.backward()
    return value


def test_stacked_problem_equals_plain_autograd_per_row(digits: TensorData) -> None:
    """T = 2 targets from different weights x R = 3 restarts: every row's distance and gradient
    equal the ones computed alone with torch.autograd."""
    nets = [model("lenet", seed) for seed in (0, 1)]
    targets = [client(digits, 2 * t, 2, hyper(2, 1), nets[t], t)[0] for t in range(2)]
    labels = torch.tensor([[0, 1], [2, 3]])
    problem = MatchingProblem.build(targets, mean_step_gradient, labels, one_gradient, cosine_distance)
    assert problem.stacked
    images = torch.rand((2, 3, 2, *SHAPE), generator=torch.Generator().manual_seed(0)).requires_grad_()
    values = problem.matching(images)
    values.sum().backward()
    for t in range(2):
        for r in range(3):
            x = images[t, r].detach().clone().requires_grad_()
            weights = [p.detach().requires_grad_() for p in nets[t].parameters()]
            names = [n for n, _ in nets[t].named_parameters()]
            out = torch.func.functional_call(nets[t], dict(zip(names, weights)), (x,))
            grads = torch.autograd.grad(nn.functional.cross_entropy(out, labels[t]), weights, create_graph=True)
            value = cosine_distance(list(grads), mean_step_gradient(targets[t]))
            value.backward()
            assert values[t, r].item() == pytest.approx(value.item(), abs=1e-6)
            assert torch.allclose(images.grad[t, r], x.grad, atol=1e-6)


# ----------------------------------------------------------------------------- labels


def test_label_inference_idlg_and_mean_softmax_counts(digits: TensorData) -> None:
    generator = torch.Generator().manual_seed(0)
    accuracy = []
    for trial, batch in enumerate([1] * 5 + [2, 4, 8] * 5):
        net = model("lenet" if trial % 2 else "convnet", trial)
        first = 17 * trial
        target, used = client(digits, first, batch, hyper(batch, 1), net)
        labels, method = infer_labels(target, mean_step_gradient(target), batch, generator, "test")
        assert method == ("idlg" if batch == 1 else "mean-softmax-counts")
        accuracy.append(label_accuracy(labels, used.y))
    assert accuracy[:5] == [1.0] * 5  # iDLG at batch 1: always right
    assert sum(accuracy) / len(accuracy) >= 0.98, accuracy


def test_estimated_scale_recovers_the_labels_of_a_clipped_update(digits: TensorData) -> None:
    """A client that scales its update by an unknown c (norm clipping) breaks the counts at
    the update's scale; the scale estimated from the absent classes restores them, and on an
    unscaled update it finds c = 1."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(6):
        target, used = client(digits, 40 * trial, 4, hyper(4, 1), model("lenet", trial))
        gradient = mean_step_gradient(target)
        weight, bias = last_layer(target)
        pbar = mean_prediction(target, generator)
        assert estimated_scale(gradient[bias], pbar) == pytest.approx(1.0, rel=0.2)
        clipped = [0.1 * g for g in gradient]
        as_sent, _ = infer_labels(target, clipped, 4, generator, "test")
        rescaled, method = infer_labels(target, clipped, 4, generator, "test", "estimated")
        assert method == "mean-softmax-counts (scale estimated)"
        assert label_accuracy(rescaled, used.y) == 1.0
        assert label_accuracy(as_sent, used.y) < 1.0


def test_labels_from_counts_rounds_by_largest_remainder() -> None:
    assert labels_from_counts(torch.tensor([1.6, -0.3, 2.2, 0.2]), 4).tolist() == [0, 0, 2, 2]
    assert labels_from_counts(torch.zeros(3), 3).tolist() == [0, 1, 2]


def test_labels_it_cannot_infer_are_one_line_errors(digits: TensorData) -> None:
    no_bias = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Sigmoid(), nn.Linear(16, 10, bias=False))
    target, _ = client(digits, 0, 2, hyper(2, 1), no_bias)
    with pytest.raises(UserError, match="attack 'ig': counting the labels of 2 images needs a bias"):
        InvertingGradients(InvertingGradients.Params(iterations=1), seed=0).reconstruct(target)
    wrong_head = nn.Sequential(nn.Flatten(), nn.Linear(64, 7))
    target = from_gradient(wrong_head, [torch.zeros_like(p) for p in wrong_head.parameters()], 1, SHAPE, 10)
    with pytest.raises(UserError, match="does not end in a linear layer with one row per class"):
        InvertingGradients(InvertingGradients.Params(iterations=1), seed=0).reconstruct(target)
    with pytest.raises(UserError, match="labels: known but the target carries no known labels"):
        InvertingGradients(InvertingGradients.Params(labels="known"), seed=0).reconstruct(target)


def test_known_labels_are_used_as_given(digits: TensorData) -> None:
    target, used = client(digits, 0, 2, hyper(2, 1), model("convnet", width=8))
    attack = InvertingGradients(InvertingGradients.Params(labels="known", iterations=2), seed=0)
    recon = attack.reconstruct(dataclasses.replace(target, known_labels=used.y))
    assert recon.labels.tolist() == used.y.tolist() and recon.details["labels"] == "known"
    assert "labels: known" in attack.threat_model


# ----------------------------------------------------------------------------- attacks


def test_ig_recovers_a_batch_of_four_digits(digits: TensorData) -> None:
    target, used = client(digits, 0, 4, hyper(4, 1), model("convnet", width=32))
    recon = InvertingGradients(InvertingGradients.Params(iterations=300), seed=0).reconstruct(target)
    scores = score_images(recon.images, used.x, recon.labels, used.y)
    assert recon.images.shape == (4, *SHAPE) and 0 <= recon.images.min() <= recon.images.max() <= 1
    assert scores["label_accuracy"] == 1.0
    assert scores["psnr"] >= 30, scores["psnr_per_image"]


@pytest.mark.parametrize("proximal_mu", [0.0, 0.5])
def test_unrolled_update_equals_the_clients_update(digits: TensorData, proximal_mu: float) -> None:
    """Given the true data in the client's batch order, the unroll reproduces the update the
    client sent: SGD with momentum and weight decay (and FedProx's proximal term), 2 steps
    over 6 examples in batches of 4."""
    net = model("convnet", width=8)
    data = digits.subset(list(range(6)))
    hp = hyper(4, 2, lr=0.1, momentum=0.9, weight_decay=1e-3, proximal_mu=proximal_mu)
    target, _ = from_local_training(net, data, hp, seed=3)
    batches = [idx.tolist() for _, _, idx in make_loader(data, 4, torch.Generator().manual_seed(3))]
    order = [i for batch in batches for i in batch]  # the attacker's slices, filled truthfully
    assert local_schedule(6, 4, 2) == [(0, 4), (4, 6)]
    assert local_schedule(6, 4, 5) == [(0, 4), (4, 6), (0, 4), (4, 6), (0, 4)]  # epochs cycle
    params = {k: p.detach() for k, p in net.named_parameters()}
    simulated = unrolled_update(
        FunctionalModel.of(net), params, data.x[order], data.y[order], local_schedule(6, 4, 2),
        0.1, 0.9, 1e-3, target.proximal_mu,
    )
    assert target.proximal_mu == proximal_mu
    for got, want in zip(simulated, target.parameter_update(), strict=True):
        assert torch.allclose(got, want, atol=1e-6)


def test_fedavg_inversion_beats_the_one_gradient_view_of_a_multi_step_update(digits: TensorData) -> None:
    target, used = client(digits, 40, 4, hyper(4, 5), model("convnet", width=32, seed=1))
    psnr = {}
    for cls in (InvertingGradients, FedAvgInversion):
        recon = cls(cls.Params(iterations=200), seed=0).reconstruct(target)
        psnr[cls.registered_name] = score_images(recon.images, used.x, recon.labels, used.y)["psnr"]
    assert psnr["fedavg_inversion"] >= 30 and psnr["fedavg_inversion"] >= psnr["ig"] + 5, psnr


def test_restarts_and_targets_are_one_problem_with_the_best_restart_by_attack_loss(digits: TensorData) -> None:
    targets = [client(digits, 4 * t, 4, hyper(4, 1), model("convnet", t, width=8), t)[0] for t in range(2)]
    attack = InvertingGradients(InvertingGradients.Params(iterations=20, restarts=3), seed=0)
    together = attack.reconstruct_many(targets)
    alone = attack.reconstruct(targets[1])
    assert torch.allclose(together[1].images, alone.images, atol=1e-4)  # seeded per target
    for recon in together:
        assert len(recon.details["restart_losses"]) == 3
        assert recon.attack_loss == pytest.approx(min(recon.details["restart_losses"]))


def test_observation_from_another_architecture_and_adam_clients_are_refused(digits: TensorData) -> None:
    target, _ = client(digits, 0, 1, hyper(1, 1), model("lenet"))
    other = dataclasses.replace(target, model=model("convnet", width=8))
    with pytest.raises(UserError, match="comes from another architecture"):
        DLG(DLG.Params(iterations=1), seed=0).reconstruct(other)
    adam, _ = client(digits, 0, 2, hyper(2, 2, optimizer="adam"), model("lenet"))
    with pytest.raises(UserError, match="unrolls SGD but the client used optimizer 'adam'"):
        FedAvgInversion(FedAvgInversion.Params(iterations=1), seed=0).reconstruct(adam)


# ----------------------------------------------------------------------------- runner and CLI


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-client digits federation on DLG's LeNet, batch 2, one step, every update recorded."""
    tmp = tmp_path_factory.mktemp("inversion")
    scenario = build_scenario({
        "name": "honest", "seed": 2,
        "data": {"dataset": "digits", "num_clients": 3},
        "model": {"name": "lenet"},
        "training": {"batch_size": 2, "local_steps": 1, "lr": 0.1},
        "federation": {"rounds": 2},
        "observer": {"rounds": [1, 2], "clients": "all"},
        "output": {"dir": str(tmp / "runs")},
    })  # fmt: skip
    return run_scenario(scenario, console=Console(file=io.StringIO())).root


def test_attacks_get_only_what_the_server_saw(recorded_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner hands an attack GradientTargets holding the sent weights, the update and the
    hyper-parameters; true labels only under `labels: known`, and never the images."""
    seen: dict[str, list[list[GradientTarget]]] = {}
    original = InvertingGradients.reconstruct_many

    def spy(self: InvertingGradients, targets: list[GradientTarget]) -> list:
        seen.setdefault(self.params.labels, []).append(list(targets))
        return original(self, targets)

    monkeypatch.setattr(InvertingGradients, "reconstruct_many", spy)
    run = RunDirectory(recorded_run)
    scenario = load_run_scenario(run)
    for labels in ("inferred", "known"):
        raw = {**scenario.model_dump(mode="json"), "attacks": [{"name": "ig", "iterations": 1, "labels": labels}]}
        attack_run(run, scenario, build_scenario(raw).attacks, Console(file=io.StringIO()), rounds=[1])
    assert [len(call) for call in seen["inferred"]] == [3]  # round 1's three clients, one call
    fields = {f.name for f in dataclasses.fields(GradientTarget)}
    assert not fields & {"images", "x", "truth", "batches", "indices"}
    for target in seen["inferred"][0]:
        assert target.known_labels is None and target.server_round == 1
        assert target.batch_size == 2 and target.local_steps == 1 and target.lr == 0.1
    train = FederatedData(scenario.data, scenario.public().seed)  # the clients' partitions
    for target in seen["known"][0]:
        batches = load_ground_truth(recorded_run, 1, target.client)
        truth = train.client(target.client)[0].subset(batches[0]).y
        assert sorted(target.known_labels.tolist()) == sorted(truth.tolist())
    (known,) = (recorded_run / "attacks").glob("ig-*")  # other settings: their own result set
    record = json.loads((known / "round_0001_client_0000.json").read_text())
    assert record["details"]["labels"] == "known" and "labels: known" in record["threat_model"]


def test_cli_round_and_client_filters_and_one_line_errors(recorded_run: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(recorded_run, tmp_path / "run"))
    code, out, err = run_cli("attack", run, "--attack", "dlg", "--set", "iterations=2", "--round", "2", "--client", "1")
    assert (code, err) == (0, ""), out
    assert sorted(p.name for p in (run / "attacks" / "dlg").glob("*.json")) == ["round_0002_client_0001.json"]
    for flag, value, message in (("--round", "5", "--round 5: "), ("--client", "9", "--client 9: ")):
        code, _, err = run_cli("attack", run, "--attack", "dlg", flag, value)
        assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {message}") and "recorded: " in err
    scenario = yaml.safe_load((run / "scenario.yaml").read_text())
    scenario["model"] = {"name": "convnet", "width": 8, "norm": "none", "groups": 8}
    (run / "scenario.yaml").write_text(yaml.safe_dump(scenario, sort_keys=False))
    code, _, err = run_cli("attack", run, "--attack", "ig")
    assert code == 2 and err.count("\n") == 1 and "does not fit model 'convnet'" in err
    assert ATTACKS.get("fedavg_inversion") is FedAvgInversion


def test_lpips_is_left_out_cleanly_without_torchvision(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from fedsim.evaluation.metrics import lpips_input, lpips_metric

    truth = torch.rand((2, *SHAPE))
    assert lpips_input(truth).shape == (2, 3, 64, 64)  # grey 8x8 digits -> RGB 64x64
    monkeypatch.setitem(sys.modules, "torchmetrics.image.lpip", None)  # as without torchvision
    lpips_metric.cache_clear()
    with caplog.at_level("INFO", logger="fedsim.evaluation.metrics"):
        scores = [score_images(truth, truth, torch.zeros(2), torch.zeros(2)) for _ in range(2)]
    assert all("lpips" not in s and s["psnr"] == 100.0 for s in scores)
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "LPIPS left out of the scores" in caplog.records[0].message
    lpips_metric.cache_clear()  # later tests see this machine's LPIPS again


def test_auto_tv_weight_grows_with_the_image_side() -> None:
    """`tv: auto` is 1e-4 at 8x8 (the figures measured on digits) and 1e-4 (side / 8)^3 above
    (docs/gradient_inversion.md, "TV weight by image size"); a number is used as it is."""
    assert tv_weight("auto", (4, 1, 8, 8)) == pytest.approx(1e-4)
    assert tv_weight("auto", (1, 3, 32, 32)) == pytest.approx(6.4e-3)
    assert tv_weight("auto", (2, 1, 64, 64)) == pytest.approx(0.0512)
    assert tv_weight("auto", (1, 1, 16, 64)) == pytest.approx(1e-4 * 4**3)  # side: sqrt(H W)
    assert tv_weight(0.2, (1, 3, 64, 64)) == 0.2
    assert InvertingGradients.Params().tv == "auto"
