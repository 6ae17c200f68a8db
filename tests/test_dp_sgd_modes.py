"""DP-SGD's `auto` mode: which Opacus mode it picks, and that its step is exact per-example
clipping (against explicit per-example gradients), with the same epsilon as hooks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsim.core.defense import LocalTraining
from fedsim.defenses.dp_sgd import DpSgd, resolve_mode

N, BATCH = 64, 16


def conv_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def mlp_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))


@pytest.mark.parametrize(("build", "chosen"), [(mlp_model, "ghost"), (conv_model, "hooks")])
def test_auto_picks_ghost_for_linear_only_models(build, chosen: str) -> None:
    assert resolve_mode("auto", build()) == chosen
    assert resolve_mode("functorch", build()) == "functorch"  # an explicit choice is kept


def dp_step(build, mode: str, C: float = 0.5) -> tuple[list[torch.Tensor], nn.Module, tuple, float]:
    """One sigma = 0 step; returns the parameter gradients, the plain start model, the batch
    and the epsilon at sigma = 1 for the same plan."""
    torch.manual_seed(0)
    plain = build()
    reference = copy.deepcopy(plain)
    data = TensorDataset(20 * torch.randn(N, 1, 8, 8), torch.randint(0, 3, (N,)))
    loader = DataLoader(data, batch_size=BATCH, generator=torch.Generator().manual_seed(1))
    training = LocalTraining(N, BATCH, 1, None, 1, 1, 0)
    defense = DpSgd(DpSgd.Params(noise_multiplier=0.0, max_grad_norm=C, grad_sample_mode=mode))
    model, optimizer, loader = defense.prepare(plain, torch.optim.SGD(plain.parameters(), lr=1.0), loader, training, {})
    criterion = defense.criterion(nn.CrossEntropyLoss())
    x, y = next(iter(loader))
    optimizer.zero_grad()
    criterion(model(x), y).backward()
    optimizer.step()
    defense.finish({})
    noisy = DpSgd(DpSgd.Params(noise_multiplier=1.0, grad_sample_mode=mode))
    state = {"dp_sgd_history": [[1.0, BATCH / N, 4]]}
    plain2 = build()
    noisy.prepare(plain2, torch.optim.SGD(plain2.parameters(), lr=1.0), DataLoader(data, batch_size=BATCH), training, state)
    return [p.grad for p in plain.parameters()], reference, (x, y), noisy.finish(state)["epsilon"]


@pytest.mark.parametrize("build", [mlp_model, conv_model])
def test_auto_step_is_exact_per_example_clipping(build) -> None:
    C = 0.5
    grads, reference, (x, y), epsilon = dp_step(build, "auto", C)
    per_example = [
        torch.autograd.grad(nn.functional.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]), list(reference.parameters()))
        for i in range(len(x))
    ]
    norms = torch.stack([torch.cat([g.flatten() for g in gs]).norm() for gs in per_example])
    assert (norms > C).sum() >= len(x) // 2  # clipping is active
    factors = (C / (norms + 1e-6)).clamp(max=1.0)
    for j, grad in enumerate(grads):
        clipped_sum = sum(f * gs[j] for f, gs in zip(factors, per_example))
        torch.testing.assert_close(grad, clipped_sum / BATCH, rtol=1e-4, atol=1e-6)
    assert epsilon == dp_step(build, "hooks", C)[3]  # same accountant, same epsilon
    assert 0 < epsilon < float("inf")
