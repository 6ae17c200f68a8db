"""GradInversion (Yin et al. 2021): the BatchNorm statistics it reads from a client's update are
that client's batch statistics, its prior is zero at the true batch, and it refuses what it
cannot use; one federation end to end."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import fedsim
from fedsim.attacks.grad_inversion import (
    GradientAndStatistics,
    GradInversion,
    batch_norm_layers,
    feature_statistics,
    observed_statistics,
    statistics_distance,
)
from fedsim.attacks.gradient_matching import FunctionalModel
from fedsim.attacks.targets import from_local_training
from fedsim.core.attack import from_gradient
from fedsim.core.errors import UserError
from fedsim.core.registry import ATTACKS, MODELS
from fedsim.data.datasets import TensorData
from fedsim.federation.training import LocalHyperParams

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def digits() -> TensorData:
    data = load_digits()
    return TensorData(torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1), torch.tensor(data.target), 10)


def resnet(norm: str = "batch") -> nn.Module:
    torch.manual_seed(0)
    cls = MODELS.get("resnet20")
    return cls(cls.Params(norm=norm), SHAPE, 10)


def one_step(model: nn.Module, data: TensorData, steps: int = 1, batch: int = 4):
    hp = LocalHyperParams(lr=0.05, batch_size=batch, local_epochs=1, local_steps=steps, optimizer="sgd", momentum=0.0, weight_decay=0.0)
    return from_local_training(model, data.subset(list(range(batch))), hp)


def true_statistics(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Each BatchNorm layer's input statistics on `images`, through the attack's own simulation."""
    layers = tuple(batch_norm_layers(model))
    functional = FunctionalModel.of(model)
    params = {name: p.detach() for name, p in model.named_parameters()}
    out = GradientAndStatistics(layers)(functional, params, images, torch.zeros(len(images), dtype=torch.long))
    return out[len(params):]


def test_update_statistics_are_the_client_batchs_after_one_step(digits: TensorData) -> None:
    target, used = one_step(resnet(), digits)
    observed = observed_statistics(target, "update", "grad_inversion")
    truth = true_statistics(target.model, used.x)
    assert len(observed) == len(truth) == 21  # resnet20: stem, 18 block norms, 2 shortcut norms
    for seen, real in zip(observed, truth, strict=True):
        assert torch.allclose(seen, real, atol=1e-4, rtol=1e-3)
    assert float(statistics_distance(truth, observed)) < 1e-2
    # another batch's statistics are far from them: the prior tells batches apart
    other = true_statistics(target.model, digits.x[100:104])
    assert float(statistics_distance(other, observed)) > 100 * float(statistics_distance(truth, observed))
    # the sent model's running buffers are the initialisation at round 1: mean 0, variance 1
    running = observed_statistics(target, "running", "grad_inversion")
    assert torch.equal(running[0], torch.stack([torch.zeros(16), torch.ones(16)]))


def test_feature_statistics_are_batchnorms_own() -> None:
    features = torch.randn(6, 3, 5, 5) * 2 + 1
    layer = nn.BatchNorm2d(3, momentum=1.0).train()
    layer(features)  # momentum 1: the running buffers become the batch's statistics
    assert torch.allclose(feature_statistics(features), torch.stack([layer.running_mean, layer.running_var]), atol=1e-5)


def test_grad_inversion_refuses_what_it_cannot_use(digits: TensorData) -> None:
    attack = GradInversion(GradInversion.Params(iterations=1), seed=0)
    target, _ = one_step(resnet("group"), digits)
    with pytest.raises(UserError, match="no BatchNorm layer"):
        attack.reconstruct(target)
    model = resnet()
    x, y = digits.x[:2], digits.y[:2]
    gradient = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    with pytest.raises(UserError, match="bn_statistics: running"):
        attack.reconstruct(from_gradient(model, list(gradient), 2, SHAPE, 10))
    plain = GradInversion(GradInversion.Params(iterations=1, bn=0.0), seed=0).reconstruct(from_gradient(model, list(gradient), 2, SHAPE, 10))
    assert plain.details["bn_statistics"] == "off"


def test_grad_inversion_runs_from_a_scenario(tmp_path) -> None:
    assert ATTACKS.get("grad_inversion") is GradInversion
    spec = {
        "name": "gi",
        "data": {"dataset": "digits", "num_clients": 4, "val_fraction": 0.0},
        "model": {"name": "resnet20", "norm": "batch"},
        "training": {"batch_size": 4, "local_steps": 1},
        "federation": {"rounds": 1},
        "observer": {"rounds": [1], "clients": [0]},
        "attacks": [{"name": "grad_inversion", "iterations": 20, "restarts": 2}],
    }
    run = fedsim.run(spec, tmp_path / "run")
    scores = run.scores
    assert len(scores) == 1 and 0 <= scores["label_accuracy"][0] <= 1
    assert scores["psnr"][0] > 0
