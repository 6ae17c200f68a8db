"""Trap weights (Boenisch, Dziedzic, Schuster, Shamsabadi, Shumailov, Papernot, "When the
Curious Abandon Honesty: Federated Learning Is Not Private", EuroS&P 2023): a malicious
server's first layer on which each ReLU row fires for few examples, read back analytically.

Threat model: a MALICIOUS server. Before round 1 it overwrites the first linear layer of the
model it sends (the `mlp`'s first hidden layer, ReLU after it) with trap weights: row i is a
random non-negative vector whose entries on a random half N_i of the inputs are negated and
scaled by s_i, with zero bias,

    z_i(x) = sum_{j not in N_i} w_ij x_j  -  s_i sum_{j in N_i} w_ij x_j.

For non-negative inputs (pixels) row i fires iff r_i(x) = (sum_{j not in N_i} w_ij x_j) /
(sum_{j in N_i} w_ij x_j) > s_i. The paper scales the negative half so that most
pre-activations are negative; here s_i is calibrated on the server's own data (its test set,
`public_x`): the (1 - `activation`) quantile of r_i, so each row fires for that share of
such examples. In a batch of B examples a row then fires for exactly one of them with
probability B a (1 - a)^(B - 1), largest at a = 1/B (set `activation` near 1 / batch size).

Read-out: `analytic_fc`'s. dL/dW_i / dL/db_i is example b exactly when b alone activated row
i; rows that agree are clustered, and the largest clusters are the recovered examples. The
gradients add over examples and clients, so a SecAgg+ aggregate is read the same way (only
more examples compete for each row). What the server sent is on record
(observations/round_0001/global.safetensors and observations/malicious.json).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from fedsim.attacks.analytic_fc import AnalyticFC, AnalyticParams, input_layer
from fedsim.attacks.imprint import next_layer
from fedsim.core.errors import UserError
from fedsim.core.malicious import MaliciousServer
from fedsim.core.registry import ATTACKS
from fedsim.core.seeding import torch_generator


class TrapWeightsParams(AnalyticParams):
    """The analytic read-out's settings plus the trap's firing rate."""

    activation: float = Field(
        0.05, gt=0, lt=1, description="share of the server's examples each row fires for; best near 1 / client batch size"
    )
    gain: float = Field(
        100.0, gt=0, description="factor on the next layer's weights: larger first-layer gradients, so SecAgg+'s "
        "quantisation costs less precision (as imprint's gain)"
    )


def trap_rows(rows: int, features: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(positive part, negative part) of `rows` random trap rows, (rows, features) each: U(0, 1)
    magnitudes, every row's negative half a random half of the inputs."""
    magnitudes = torch.rand(rows, features, generator=generator, dtype=torch.double)
    order = torch.rand(rows, features, generator=generator).argsort(1)
    negative = torch.zeros(rows, features, dtype=torch.bool).scatter_(1, order[:, : features // 2], True)
    return magnitudes * ~negative, magnitudes * negative


def firing_scales(positive: Tensor, negative: Tensor, public_x: Tensor, activation: float) -> Tensor:
    """s_i: the (1 - activation) quantile of r_i(x) over the server's examples (see the module doc)."""
    flat = public_x.flatten(1).double()
    if (flat < 0).any():
        raise UserError("attack 'trap_weights': the inputs have negative values; trap rows need non-negative inputs (pixels in [0, 1])")
    ratio = (flat @ positive.T) / (flat @ negative.T).clamp_min(1e-12)  # (examples, rows)
    return torch.quantile(ratio, 1 - activation, dim=0)


@ATTACKS.register("trap_weights")
class TrapWeights(AnalyticFC, MaliciousServer):
    """A malicious server's trap weights (Boenisch et al. 2021) and the analytic read-out."""

    Params = TrapWeightsParams
    params: TrapWeightsParams
    threat_model = (
        "malicious server: sets the first layer of the round-1 model it sends to trap weights "
        "(recorded), then reads one client's update or the SecAgg+ aggregate"
    )

    def craft(self, model: nn.Module, input_shape: tuple[int, ...], public_x: Tensor) -> dict[str, Any]:
        name = input_layer(model, input_shape, self.name)
        first: nn.Linear = model.get_submodule(name)
        follow = next_layer(model, name)
        features = math.prod(input_shape)
        positive, negative = trap_rows(first.out_features, features, torch_generator(self.seed, "trap-weights"))
        scales = firing_scales(positive, negative, public_x, self.params.activation)
        with torch.no_grad():
            first.weight.copy_((positive - scales[:, None] * negative) / math.sqrt(features))
            first.bias.zero_()
            follow.weight.mul_(self.params.gain)
        return {
            "layer": name,
            "rows": first.out_features,
            "activation": self.params.activation,
            "next_layer_gain": self.params.gain,
            "negative_scales": [round(float(s), 6) for s in scales],
        }
