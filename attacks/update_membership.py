"""Membership of an example in one client's round data, from the update the client sent.

Threat model 1 (DESIGN.md), honest-but-curious server, white-box: it holds the global
weights theta_0 it sent, the client's returned weights theta_1 (update Delta = theta_1 - theta_0)
and candidate examples (x, y); it asks which of them the client trained on that round.

Local SGD moves the weights against the training examples' gradients,
Delta ~ -lr * sum_t sum_{i in B_t} grad L(theta_t; x_i) / |B_t|, so a member's own negative
gradient at theta_0 points along the update. Two scores (higher = member):

- `alignment`:  <Delta, -grad_theta L(theta_0; x, y)>, divided by ||grad|| (`normalise`, the
  default: the cosine up to the common factor ||Delta||, so examples with large gradients do not
  win on magnitude alone);
- `loss_drop`:  L(theta_0; x, y) - L(theta_1; x, y): how much the client's training lowered
  the example's loss (a loss-threshold attack calibrated by the example's loss before).

Exact for one full-batch step; under many local steps the gradients at theta_t drift from those
at theta_0 and the signal weakens (it is still the strongest first-order test). Batch-norm
statistics are read in eval mode (one example at a time).
"""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from fedsim.attacks.membership_signals import example_losses
from fedsim.core.attack import GradientTarget
from fedsim.core.membership import MembershipAttack, MembershipTarget
from fedsim.core.registry import ATTACKS

CHUNK = 128


def _loss(model: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
          x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # fmt: skip
    out = functional_call(model, (params, buffers), (x[None],))
    if y.is_floating_point():
        return (out.reshape(-1) - y.reshape(-1)).pow(2).sum()
    return F.cross_entropy(out, y[None])


def alignment_scores(
    target: GradientTarget, x: torch.Tensor, y: torch.Tensor, normalise: bool = True
) -> torch.Tensor:
    """<Delta, -grad L(theta_0; x_i, y_i)> (/ ||grad||) for every candidate (N,)."""
    model = target.model.eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    update = {name: target.update[name].to(p) for name, p in params.items()}
    per_example = vmap(grad(_loss, argnums=1), in_dims=(None, None, None, 0, 0))
    scores = []
    for start in range(0, len(x), CHUNK):
        grads = per_example(model, params, buffers, x[start : start + CHUNK], y[start : start + CHUNK])
        dot = sum((-g * update[name]).flatten(1).sum(1) for name, g in grads.items())
        if normalise:
            norm = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
            dot = dot / norm.clamp_min(1e-12)
        scores.append(dot.detach())
    return torch.cat(scores)


def loss_drop_scores(target: GradientTarget, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L(theta_0; x_i) - L(theta_1; x_i) for every candidate (N,), theta_1 = theta_0 + Delta."""
    after = copy.deepcopy(target.model)
    state = after.state_dict()
    after.load_state_dict(
        {name: value + target.update[name].to(value) if name in target.update else value
         for name, value in state.items()}  # fmt: skip
    )
    return example_losses(target.model, x, y) - example_losses(after, x, y)


def update_membership_scores(
    target: GradientTarget,
    x: torch.Tensor,
    y: torch.Tensor,
    score: Literal["alignment", "loss_drop"] = "alignment",
    normalise: bool = True,
) -> torch.Tensor:
    """The chosen score of every candidate (N,) against one recorded client update."""
    if score == "alignment":
        return alignment_scores(target, x, y, normalise)
    return loss_drop_scores(target, x, y)


class UpdateScoreParams(BaseModel):
    """Which update-based score to use (shared with client-level inference)."""

    model_config = ConfigDict(extra="forbid")

    score: Literal["alignment", "loss_drop"] = Field(
        "alignment", description="alignment: <update, -gradient>; loss_drop: loss before - after the update"
    )
    normalise: bool = Field(True, description="alignment divided by the example's gradient norm")


@ATTACKS.register("update_membership")
class UpdateMembership(MembershipAttack):
    """Which candidates a client trained on in a round, from its recorded update (curious server)."""

    threat_model = (
        "honest-but-curious server, white-box: the weights it sent, one client's returned "
        "weights, and candidate examples"
    )
    granted = "update"
    Params = UpdateScoreParams

    def score(self, target: MembershipTarget) -> np.ndarray:
        assert target.update is not None, "the membership stage gives update attacks an update"
        return update_membership_scores(
            target.update, target.x, target.y, self.params.score, self.params.normalise
        ).numpy()
