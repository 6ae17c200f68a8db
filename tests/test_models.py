"""Tests for the classical models: shapes, sizes, DLG's init, norms, determinism, training."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from fedsim.core.config import build_scenario
from fedsim.core.errors import UserError
from fedsim.core.registry import MODELS

torch.set_num_threads(1)

CLASSICAL = ["convnet", "lenet", "mlp", "resnet18", "resnet20"]
IMAGE_SHAPES = [(1, 8, 8), (3, 32, 32)]

# Parameter counts for 10 classes: (low, high) bounds, exact where the architecture is fixed.
PARAM_RANGES = {
    ("mlp", (1, 8, 8)): (17_226, 17_226),  # 64*128+128 + 128*64+64 + 64*10+10
    ("convnet", (1, 8, 8)): (50_000, 80_000),
    ("convnet", (3, 32, 32)): (50_000, 80_000),
    ("resnet18", (3, 32, 32)): (11_000_000, 11_300_000),
    ("resnet20", (3, 32, 32)): (260_000, 280_000),
}


def build(name: str, input_shape: Sequence[int], num_classes: int = 10, **params) -> nn.Module:
    cls = MODELS.get(name)
    return cls(cls.Params(**params), tuple(input_shape), num_classes)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_all_classical_models_registered() -> None:
    assert set(CLASSICAL) <= set(MODELS.names())


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@pytest.mark.parametrize("name", CLASSICAL)
def test_output_shape_on_images(name: str, shape: tuple[int, ...]) -> None:
    model = build(name, shape).eval()
    with torch.no_grad():
        logits = model(torch.rand(3, *shape))
    assert logits.shape == (3, 10)
    assert torch.isfinite(logits).all()


def test_lenet_on_28x28_mnist_shape() -> None:
    assert build("lenet", (1, 28, 28), num_classes=7)(torch.rand(2, 1, 28, 28)).shape == (2, 7)


def test_mlp_on_feature_vectors() -> None:
    assert build("mlp", (20,), num_classes=3)(torch.rand(4, 20)).shape == (4, 3)


@pytest.mark.parametrize("name", ["lenet", "convnet", "resnet20"])
def test_conv_models_reject_feature_vectors(name: str) -> None:
    with pytest.raises(UserError, match="mlp"):
        build(name, (20,))


@pytest.mark.parametrize(("name", "shape"), list(PARAM_RANGES))
def test_parameter_counts(name: str, shape: tuple[int, ...]) -> None:
    low, high = PARAM_RANGES[(name, shape)]
    assert low <= count(build(name, shape)) <= high


def test_lenet_exact_parameter_count() -> None:
    # 8x8 -> 4x4 -> 2x2 -> 2x2 with 12 channels: 48 features for the linear layer.
    conv1 = 1 * 12 * 5 * 5 + 12
    conv23 = 2 * (12 * 12 * 5 * 5 + 12)
    fc = 12 * 2 * 2 * 10 + 10
    assert count(build("lenet", (1, 8, 8))) == conv1 + conv23 + fc == 8026


def test_lenet_dlg_uniform_init() -> None:
    torch.manual_seed(0)
    model = build("lenet", (3, 32, 32))
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert flat.min() >= -0.5 and flat.max() <= 0.5
    assert abs(flat.std().item() - 1 / math.sqrt(12)) < 0.03
    assert any(isinstance(m, nn.Sigmoid) for m in model.modules())


def test_lenet_options() -> None:
    torch.manual_seed(0)
    model = build("lenet", (3, 32, 32), activation="relu", init="default")
    assert any(isinstance(m, nn.ReLU) for m in model.modules())
    assert not any(isinstance(m, nn.Sigmoid) for m in model.modules())
    assert max(p.detach().abs().max().item() for p in model.parameters()) < 0.5


@pytest.mark.parametrize("name", ["resnet18", "resnet20"])
def test_resnet_norms_and_opacus(name: str) -> None:
    group = build(name, (3, 32, 32), norm="group")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in group.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in group.modules())
    assert ModuleValidator.validate(group, strict=False) == []

    batch = build(name, (3, 32, 32), norm="batch")
    assert any(isinstance(m, nn.BatchNorm2d) for m in batch.modules())
    assert ModuleValidator.validate(batch, strict=False) != []


def test_group_norm_groups_divide_channels() -> None:
    # 12 channels do not split into 8 groups; gcd(8, 12) = 4 groups are used instead.
    model = build("convnet", (1, 8, 8), norm="group", groups=8, width=12)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert {m.num_groups for m in norms} == {4, 8}
    assert all(m.num_channels % m.num_groups == 0 for m in norms)


def test_convnet_group_norm_option() -> None:
    model = build("convnet", (1, 8, 8), norm="group", width=8)
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []


def test_resnet20_width_multiplier() -> None:
    assert build("resnet20", (3, 32, 32), width=2).fc.in_features == 128


@pytest.mark.parametrize("name", CLASSICAL)
def test_same_seed_same_parameters(name: str) -> None:
    torch.manual_seed(123)
    first = build(name, (1, 8, 8)).state_dict()
    torch.manual_seed(123)
    second = build(name, (1, 8, 8)).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("name", ["mlp", "convnet"])
def test_fits_a_tiny_batch(name: str) -> None:
    torch.manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 4
    model = build(name, (1, 8, 8), num_classes=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9


def test_bad_activation_is_a_user_error() -> None:
    with pytest.raises(UserError, match="activation"):
        build_scenario({"model": {"name": "lenet", "activation": "softmaxx"}})


def test_unknown_model_param_is_a_user_error() -> None:
    with pytest.raises(UserError, match="allowed"):
        build_scenario({"model": {"name": "resnet18", "width": 2}})


def test_model_params_from_scenario() -> None:
    scenario = build_scenario({"model": {"name": "mlp", "hidden": [8]}})
    assert scenario.model.params.hidden == [8]
    with pytest.raises(UserError, match="hidden"):
        build_scenario({"model": {"name": "mlp", "hidden": [0]}})
