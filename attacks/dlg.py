"""Gradient inversion by gradient matching: DLG (Zhu et al. 2019) and iDLG (Zhao et al. 2020).

The server saw the gradient g = (g_1, ..., g_L) of one client step, layer by layer, for the
model f_theta. Both attacks search for dummy data whose gradient looks the same:

    min_{x, y}  D(x, y) = sum_l || d loss(f_theta(x), y) / d theta_l  -  g_l ||_2^2

with L-BFGS, differentiating through the gradient itself (second-order autograd).

- `dlg` learns the images x and soft labels y = softmax(z) together from random starts.
- `idlg` (batch 1 only) first reads the label off the last layer's gradient, then learns x
  alone with that hard label, which is easier and makes the label always correct.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.func import functional_call

from fedsim.attack import Attack, GradientTarget, Reconstruction
from fedsim.errors import UserError
from fedsim.registry import ATTACKS

THREAT_MODEL = "honest-but-curious server (observes one client's update)"

LossOfOutputs = Callable[[Tensor], Tensor]
"""The client's training loss as a function of the model outputs on the dummy images."""


class GradientMatchingParams(BaseModel):
    """Settings of the L-BFGS gradient-matching loop, shared by `dlg` and `idlg`."""

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(300, ge=1, description="L-BFGS iterations per restart")
    lr: float = Field(1.0, gt=0, description="L-BFGS step size")
    history_size: int = Field(100, ge=1, description="L-BFGS curvature pairs kept")
    line_search_fn: Literal["strong_wolfe"] | None = Field(
        None, description="None: fixed steps of size lr (as in DLG); strong_wolfe: line search"
    )
    restarts: int = Field(
        1, ge=1, description="random starts; the one with the lowest gradient distance is kept"
    )
    clamp: bool = Field(True, description="clamp the returned images to [0, 1]")


@dataclass
class Match:
    """One gradient-matching run: the best point it visited, its distance, iterations run."""

    variables: list[Tensor]
    distance: float
    iterations: int


def soft_cross_entropy(outputs: Tensor, label_logits: Tensor) -> Tensor:
    """mean_b sum_k -softmax(z_b)_k log softmax(f(x_b))_k: cross-entropy against soft labels."""
    return (-label_logits.softmax(-1) * outputs.log_softmax(-1)).sum(-1).mean()


def gradient_distance(
    model: nn.Module, observed: list[Tensor], images: Tensor, loss_of: LossOfOutputs
) -> Tensor:
    """D = sum_l || d loss(f_theta(images)) / d theta_l - g_l ||^2, differentiable in the dummies.

    The weights are detached copies, so the target model is never modified and no gradient
    accumulates in it.
    """
    weights = {name: p.detach().requires_grad_() for name, p in model.named_parameters()}
    loss = loss_of(functional_call(model, weights, (images,)))
    dummy = torch.autograd.grad(loss, list(weights.values()), create_graph=True)
    return sum(((d - g) ** 2).sum() for d, g in zip(dummy, observed, strict=True))


def match_gradients(
    model: nn.Module,
    observed: list[Tensor],
    images: Tensor,
    loss_of: LossOfOutputs,
    variables: list[Tensor],
    settings: GradientMatchingParams,
) -> Match:
    """Minimise `gradient_distance` over `variables` (the dummy images, maybe label logits).

    Runs `settings.iterations` L-BFGS iterations and returns a copy of the variables at the
    lowest distance evaluated. A non-finite distance (the optimiser diverged) stops the run
    early; the best point so far is still returned.
    """
    optimizer = torch.optim.LBFGS(
        variables,
        lr=settings.lr,
        max_iter=1,  # one iteration per step(); the curvature history persists across steps
        history_size=settings.history_size,
        line_search_fn=settings.line_search_fn,
    )
    best = Match([v.detach().clone() for v in variables], math.inf, 0)
    last = math.inf

    def closure() -> Tensor:
        nonlocal last
        optimizer.zero_grad()
        distance = gradient_distance(model, observed, images, loss_of)
        distance.backward(inputs=variables)
        last = distance.item()
        if last < best.distance:
            best.variables = [v.detach().clone() for v in variables]
            best.distance = last
        return distance

    for iteration in range(1, settings.iterations + 1):
        optimizer.step(closure)
        best.iterations = iteration
        if not math.isfinite(last):
            break
    return best


def invert(
    target: GradientTarget,
    settings: GradientMatchingParams,
    seed: int,
    batch_size: int,
    labels: Tensor | None,
) -> Reconstruction:
    """Run `settings.restarts` gradient-matching runs and keep the lowest gradient distance.

    Dummy images start uniform in [0, 1] and label logits standard normal, drawn from one
    generator seeded with `seed`. With `labels` given, the images are matched under hard
    cross-entropy with those labels; otherwise soft labels are learned jointly (DLG).
    """
    reference = next(target.model.parameters())
    observed = [g.to(reference) for g in target.single_step_gradient()]
    generator = torch.Generator().manual_seed(seed)
    best: Match | None = None
    for _ in range(settings.restarts):
        images = torch.rand((batch_size, *target.input_shape), generator=generator)
        images = images.to(reference).requires_grad_()
        if labels is None:
            logits = torch.randn((batch_size, target.num_classes), generator=generator)
            logits = logits.to(reference).requires_grad_()
            variables = [images, logits]
            loss_of: LossOfOutputs = partial(soft_cross_entropy, label_logits=logits)
        else:
            variables = [images]
            loss_of = partial(F.cross_entropy, target=labels.to(reference.device))
        match = match_gradients(target.model, observed, images, loss_of, variables, settings)
        if best is None or match.distance < best.distance:
            best = match
    assert best is not None
    found = best.variables[0].clamp(0, 1) if settings.clamp else best.variables[0]
    found_labels = labels.cpu() if labels is not None else best.variables[1].argmax(-1).cpu()
    return Reconstruction(
        images=found.cpu(),
        labels=found_labels,
        attack_loss=best.distance,
        details={"iterations": best.iterations, "restarts": settings.restarts},
    )


@ATTACKS.register("dlg")
class DLG(Attack):
    """DLG (Zhu et al. 2019): learn dummy images and soft labels whose gradient matches.

    Objective: min_{x, z} sum_l || grad_theta_l CE(f(x), softmax(z)) - g_l ||^2 with
    CE(p, q) = mean_b sum_k -q_bk log softmax(p_b)_k, from x ~ U[0, 1], z ~ N(0, 1).
    Labels returned are argmax_k z_bk.
    """

    threat_model = THREAT_MODEL

    class Params(GradientMatchingParams):
        batch_size: int | None = Field(
            None,
            ge=1,
            description="dummy batch size; default min(client batch size, client examples)",
        )
        use_known_labels: bool = Field(
            False,
            description="match with the target's known labels (hard) instead of learning them",
        )

    params: Params

    def reconstruct(self, target: GradientTarget) -> Reconstruction:
        labels = None
        if self.params.use_known_labels:
            if target.known_labels is None:
                raise UserError(
                    "attack 'dlg': use_known_labels is true but the observation carries no "
                    "known labels; set use_known_labels: false"
                )
            labels = target.known_labels
        batch_size = (
            len(labels)
            if labels is not None
            else self.params.batch_size or min(target.batch_size, target.num_examples)
        )
        return invert(target, self.params, self.seed, batch_size, labels)


@ATTACKS.register("idlg")
class IDLG(Attack):
    """iDLG (Zhao et al. 2020): read the label off the last layer, then match images (batch 1).

    For one example with cross-entropy, the last linear layer W (rows = classes) has gradient
    dL/dW_k = (softmax(f(x))_k - [k = y]) h, with h >= 0 its input after a sigmoid or ReLU.
    Only the true class has a negative factor, so y = argmin_k sum_j dL/dW_kj. Then
    min_x sum_l || grad_theta_l CE(f(x), y) - g_l ||^2.
    """

    threat_model = THREAT_MODEL
    Params = GradientMatchingParams

    def reconstruct(self, target: GradientTarget) -> Reconstruction:
        if min(target.batch_size, target.num_examples) > 1:
            raise UserError(
                "attack 'idlg' needs batch size 1 (the observed client used "
                f"batch_size={target.batch_size}); use 'dlg' or label inference for batches"
            )
        label = last_layer_label(target)
        return invert(target, self.params, self.seed, 1, label.reshape(1))


def last_layer_label(target: GradientTarget) -> Tensor:
    """argmin_k of the row sums of the last 2-D parameter's gradient (iDLG's label rule)."""
    named = [name for name, _ in target.model.named_parameters()]
    gradients = dict(zip(named, target.single_step_gradient(), strict=True))
    matrices = [name for name in named if gradients[name].dim() == 2]
    if not matrices or gradients[matrices[-1]].shape[0] != target.num_classes:
        raise UserError(
            "attack 'idlg' needs a model ending in a linear layer with one row per class; "
            "use 'dlg' for this model"
        )
    return gradients[matrices[-1]].sum(dim=1).argmin().cpu()
