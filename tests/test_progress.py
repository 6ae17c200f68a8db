"""Progress of long stages: an attack's iteration hook, and bars only on a live terminal."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from torch import nn

from fedsim.attacks.dlg import DLG
from fedsim.attacks.inverting_gradients import InvertingGradients
from fedsim.attacks.targets import from_gradient
from fedsim.core.attack import GradientTarget
from fedsim.pipeline.progress import attack_progress, progress_bar

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_targets(count: int) -> list[GradientTarget]:
    """`count` one-image targets of a 4x4 linear model's gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    targets = []
    for client in range(count):
        x, y = torch.rand(1, 1, 4, 4), torch.tensor([client % 3])
        gradient = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
        targets.append(from_gradient(model, list(gradient), 1, (1, 4, 4), 3, client=client))
    return targets


@pytest.mark.parametrize(
    ("attack", "per_problem"),
    [(DLG(DLG.Params(iterations=3, targets_per_batch=1)), 3),
     (InvertingGradients(InvertingGradients.Params(iterations=4, targets_per_batch=1)), 4)],
)  # fmt: skip
def test_attack_reports_every_iteration_over_all_its_problems(attack: DLG, per_problem: int) -> None:
    calls: list[tuple[int, int]] = []
    attack.on_iteration = lambda done, total: calls.append((done, total))
    attack.reconstruct_many(tiny_targets(2))  # two problems of one target each
    total = 2 * per_problem
    assert calls == [(done, total) for done in range(1, total + 1)]


def test_an_attack_without_a_listener_runs_as_before() -> None:
    (recon,) = DLG(DLG.Params(iterations=2)).reconstruct_many(tiny_targets(1))
    assert recon.images.shape == (1, 1, 4, 4)


def test_bars_show_only_on_a_terminal_that_is_not_quiet() -> None:
    for console in (Console(file=io.StringIO()), Console(file=io.StringIO(), force_terminal=True, quiet=True)):
        with progress_bar(console, "training", "rounds") as update:
            assert update is None
    out = io.StringIO()
    terminal = Console(file=out, force_terminal=True, width=100)
    attack = DLG(DLG.Params(iterations=2))
    with attack_progress(attack, terminal, "attack dlg, round 1"):
        assert attack.on_iteration is not None
        attack.reconstruct_many(tiny_targets(1))
    assert attack.on_iteration is None  # the bar's hook goes with the bar
    assert "attack dlg, round 1" in out.getvalue() and "iterations" in out.getvalue()
