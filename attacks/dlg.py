"""Gradient inversion by L-BFGS gradient matching: DLG (Zhu et al. 2019) and iDLG (Zhao et al. 2020).

The server saw the client's mean step gradient g = (g_1, ..., g_L), layer by layer, for the
model f_theta. Both attacks search for dummy data whose gradient looks the same:

    min_{x, y}  D(x, y) = sum_l || d loss(f_theta(x), y) / d theta_l  -  g_l ||_2^2

with L-BFGS (fixed step, as in DLG), differentiating through the gradient itself. The budget
`iterations` counts L-BFGS steps, as DLG's code and breaching do (torch.optim.LBFGS.step,
up to `evaluations_per_step` = 20 objective evaluations each); every result also reports its
`objective_evaluations`, the unit in which the attacks' costs compare.

- `dlg` learns the images x and soft labels y = softmax(z) together from random starts
  (`labels: joint`, the paper's method), or matches under inferred or known hard labels.
- `idlg` (one image only) first reads the label off the last layer's gradient, then learns
  x alone with that hard label, which is easier and makes the label always correct.

Restarts and targets are one stacked problem (`fedsim.attacks.gradient_matching.MatchingProblem`)
run by a per-row L-BFGS (`fedsim.attacks.batched_lbfgs`); each target keeps the restart and the
iterate with the lowest distance D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from torch import Tensor

from fedsim.attacks.batched_lbfgs import TOLERANCE_CHANGE, BatchedLBFGS
from fedsim.attacks.gradient_matching import (
    GradientInversion,
    InversionParams,
    LabelChoice,
    MatchingProblem,
    best_restarts,
    l2_distance,
    random_images,
    random_label_logits,
    reconstructions,
    stack_labels,
)
from fedsim.core.attack import GradientTarget, IterationCallback, Reconstruction
from fedsim.core.errors import UserError
from fedsim.core.registry import ATTACKS

if TYPE_CHECKING:
    from fedsim.core.config import Scenario


class LBFGSParams(InversionParams):
    """Settings of the L-BFGS gradient-matching loop, shared by `dlg` and `idlg`."""

    iterations: int = Field(
        15,
        ge=1,
        description="L-BFGS steps, each up to `evaluations_per_step` objective evaluations "
        "(Zhu et al.'s DLG: 300 steps, breaching: 1,200; the default, 300 evaluations, fits a laptop)",
    )
    evaluations_per_step: int = Field(
        20, ge=1, description="objective evaluations per L-BFGS step (torch.optim.LBFGS max_iter; DLG: 20)"
    )
    lr: float = Field(1.0, gt=0, description="L-BFGS step size")
    history_size: int = Field(100, ge=1, description="L-BFGS curvature pairs kept")


@dataclass
class LBFGSResult:
    """Per row (T, R): the best point visited and its distance; L-BFGS steps begun and
    objective evaluations made (the same for every row)."""

    images: Tensor
    label_logits: Tensor | None
    losses: Tensor
    steps: int
    evaluations: int


def minimise_lbfgs(
    problem: MatchingProblem,
    images: Tensor,
    label_logits: Tensor | None,
    settings: LBFGSParams,
    on_iteration: IterationCallback | None = None,
) -> LBFGSResult:
    """Minimise `problem.matching` from the starts (T, R, ...) by one L-BFGS per row.

    The budget is `iterations` steps of `evaluations_per_step` evaluations each, counted as
    torch.optim.LBFGS(max_iter=evaluations_per_step) counts them when `step` is called
    `iterations` times: every evaluation is followed by one update, and the history carries
    over from step to step, so the iterates are those of one long run of steps x evaluations.
    Keeps each row's lowest distance and the point where it was evaluated. A row whose
    distance turns non-finite (diverged) or changes by less than 1e-9 from one evaluation to
    the next (converged: where torch ends a step early, `tolerance_change`) is frozen; when
    every row is, the loop stops, so `evaluations` counts those made.
    `on_iteration(done, iterations)` is called after every step.
    """
    rows = images.shape[0] * images.shape[1]
    variables = [images] + ([label_logits] if label_logits is not None else [])
    sizes = [v[0, 0].numel() for v in variables]
    flat = torch.cat([v.reshape(rows, -1) for v in variables], dim=1)
    best_flat, best = flat.clone(), torch.full((rows,), math.inf, device=flat.device)
    active = torch.ones(rows, dtype=torch.bool, device=flat.device)
    optimizer = BatchedLBFGS(settings.lr, settings.history_size)
    per_step = settings.evaluations_per_step
    budget = settings.iterations * per_step
    previous = torch.full((rows,), math.inf, device=flat.device)
    evaluations = reported = 0
    for evaluations in range(1, budget + 1):
        point = flat.detach().requires_grad_()
        parts = [part.reshape(v.shape) for part, v in zip(point.split(sizes, dim=1), variables, strict=True)]
        loss = problem.matching(*parts).reshape(rows)
        (gradient,) = torch.autograd.grad(loss.sum(), point)
        loss = loss.detach()
        finite = torch.isfinite(loss)
        improved = finite & (loss < best)
        best = torch.where(improved, loss, best)
        best_flat = torch.where(improved[:, None], flat, best_flat)
        converged = (loss - previous).abs() < TOLERANCE_CHANGE
        active &= finite & ~converged
        previous = loss
        if not active.any():
            break
        if evaluations < budget:  # the last update would never be evaluated
            flat = flat + optimizer.step(gradient, active)
        if evaluations % per_step == 0:
            reported = evaluations // per_step
            if on_iteration is not None:
                on_iteration(reported, settings.iterations)
    if on_iteration is not None:  # stopped early (every row frozen): the budget's remaining steps are done
        for step in range(reported + 1, settings.iterations + 1):
            on_iteration(step, settings.iterations)
    found = [part.reshape(v.shape) for part, v in zip(best_flat.split(sizes, dim=1), variables, strict=True)]
    return LBFGSResult(
        images=found[0],
        label_logits=found[1] if label_logits is not None else None,
        losses=best.reshape(images.shape[:2]),
        steps=math.ceil(evaluations / per_step),
        evaluations=evaluations,
    )


class LBFGSInversion(GradientInversion):
    """DLG's solver: squared gradient distance, L-BFGS, best iterate of the best restart."""

    params: LBFGSParams

    def solve(self, targets: list[GradientTarget], labels: list[LabelChoice]) -> list[Reconstruction]:
        device = next(targets[0].model.parameters()).device
        hard = stack_labels(labels, device)
        observe, simulate = self.observation(targets)
        problem = MatchingProblem.build(targets, observe, hard, simulate, l2_distance)
        count, restarts = self.image_count(targets[0]), self.params.restarts
        images = random_images(targets, restarts, count, self.seed).to(device)
        logits = None if hard is not None else random_label_logits(targets, restarts, count, self.seed).to(device)
        result = minimise_lbfgs(problem, images, logits, self.params, self.report_iteration)
        chosen = best_restarts(result.losses)
        pick = torch.arange(len(targets), device=device), chosen.to(device)
        found_labels = hard if result.label_logits is None else result.label_logits[pick].argmax(-1)
        return reconstructions(
            result.images[pick],
            found_labels,
            result.losses[pick],
            result.losses,
            labels,
            {"iterations": result.steps, "evaluations_per_step": self.params.evaluations_per_step,
             "restarts": restarts, "objective_evaluations": result.evaluations},
        )


@ATTACKS.register("dlg")
class DLG(LBFGSInversion):
    """DLG (Zhu et al. 2019): learn dummy images and soft labels whose gradient matches.

    Objective: min_{x, z} sum_l || grad_theta_l CE(f(x), softmax(z)) - g_l ||^2 with
    CE(p, q) = mean_b sum_k -q_bk log softmax(p_b)_k, from x ~ U[0, 1], z ~ N(0, 1).
    Labels returned are argmax_k z_bk (`labels: joint`); `inferred` or `known` fix them.
    """

    class Params(LBFGSParams):
        labels: Literal["joint", "inferred", "known"] = Field(  # type: ignore[assignment]
            "joint",
            description="joint: soft labels optimised with the images (DLG); inferred: from "
            "the last layer's gradient; known: the client's true labels (stronger threat model)",
        )

    def choose_labels(self, target: GradientTarget) -> LabelChoice:
        if self.params.labels == "joint":
            return LabelChoice(None, "joint")
        return super().choose_labels(target)


@ATTACKS.register("idlg")
class IDLG(LBFGSInversion):
    """iDLG (Zhao et al. 2020): read the label off the last layer, then match images (batch 1).

    For one example with cross-entropy, the last linear layer W (rows = classes) has gradient
    dL/dW_k = (softmax(f(x))_k - [k = y]) h, with h >= 0 its input after a sigmoid or ReLU.
    Only the true class has a negative factor, so y = argmin_k sum_j dL/dW_kj. Then
    min_x sum_l || grad_theta_l CE(f(x), y) - g_l ||^2.
    """

    Params = LBFGSParams

    @classmethod
    def check_scenario(cls, params: LBFGSParams, scenario: Scenario) -> None:
        if (params.images or scenario.training.batch_size) > 1:
            raise ValueError(
                f"attack 'idlg' needs batch size 1 (training.batch_size={scenario.training.batch_size}"
                + (f", images={params.images}" if params.images else "")
                + "); use 'dlg' or 'ig', which infer a batch's labels"
            )

    def choose_labels(self, target: GradientTarget) -> LabelChoice:
        if self.image_count(target) > 1:
            raise UserError(
                "attack 'idlg' needs batch size 1 (the observed client used "
                f"batch_size={target.batch_size}); use 'dlg' or 'ig', which infer a batch's labels"
            )
        return super().choose_labels(target)
