"""Robbing the Fed (Fowl et al. 2022): a malicious server's imprint block, read back exactly.

Threat model: a MALICIOUS server. Before round 1 it overwrites the first linear layer of the
global model it sends (the `mlp`'s first hidden layer, ReLU after it) with an imprint block:
`bins` rows that all measure one feature of the flattened image, its mean brightness
h(x) = mean(x), against increasing thresholds t_0 < ... < t_{k-1} (z_i = h(x) - t_i), and
sets the next layer's columns of those rows equal, so that every row an example activates
passes it the same gradient c_b. The thresholds are quantiles of h on data the server holds
(its test set), so each bin between two thresholds catches about the same share of examples.

Row i is active for the examples with h(x) > t_i, so dL/dW_i - dL/dW_{i+1} = sum over the
examples in bin [t_i, t_{i+1}) of c_b x_b, and the bias gradients give sum c_b: their ratio is
the example exactly when it is alone in its bin. The gradients add over examples and clients,
so this works just as well on a SecAgg+ aggregate (the sum over the cohort): secure
aggregation hides who sent what, not what was sent. What the server sent is on record
(observations/round_0001/global.safetensors and observations/malicious.json). The crafted
round sacrifices the model's accuracy for that round; the attack reads round 1 only.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from fedsim.attacks.analytic_fc import exact_reconstruction, input_layer
from fedsim.core.attack import GradientAttack, GradientTarget, Reconstruction
from fedsim.core.errors import UserError
from fedsim.core.malicious import MaliciousServer
from fedsim.core.registry import ATTACKS
from fedsim.core.seeding import torch_generator


class ImprintParams(BaseModel):
    """Settings of the imprint block."""

    model_config = ConfigDict(extra="forbid")

    bins: int = Field(
        64, ge=2, description="rows of the imprint block (<= the first hidden layer's width); more bins, fewer collisions"
    )
    feature: Literal["brightness", "random"] = Field(
        "random",
        description="what the rows measure: mean brightness, or one seeded random direction "
        "(continuous values on quantised pixels, so fewer examples share a bin)",
    )
    gain: float = Field(
        100.0,
        gt=0,
        description="factor on the next layer's tied columns: larger gradients on the imprint rows, "
        "so SecAgg+'s quantisation (step 2*clipping_range/quantization_range) costs less precision",
    )
    threshold: float = Field(
        1e-3, ge=0, lt=1, description="bins whose bias-gradient difference is below this share of the largest are empty"
    )


def next_layer(model: nn.Module, first: str) -> nn.Linear:
    """The linear layer that reads the first layer's output (the next `nn.Linear` in order)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    following = names[names.index(first) + 1 :]
    if not following:
        raise UserError("attack 'imprint': the model needs a linear layer after its first one; use model 'mlp'")
    return model.get_submodule(following[0])


@ATTACKS.register("imprint")
class Imprint(GradientAttack, MaliciousServer):
    """A malicious server's imprint block (Fowl et al. 2022) and its exact read-out."""

    Params = ImprintParams
    params: ImprintParams
    needs_classes = True
    threat_model = (
        "malicious server: crafts the first layer of the round-1 model it sends (recorded), "
        "then reads one client's update or the SecAgg+ aggregate"
    )

    def craft(self, model: nn.Module, input_shape: tuple[int, ...], public_x: Tensor) -> dict[str, Any]:
        first_name = input_layer(model, input_shape, self.name)
        first = model.get_submodule(first_name)
        bins = self.params.bins
        if first.out_features < bins:
            raise UserError(
                f"attack 'imprint': bins={bins} but the first layer has {first.out_features} rows; "
                f"lower bins or widen the model (mlp hidden[0] >= {bins})"
            )
        direction = self.direction(math.prod(input_shape))
        feature = public_x.flatten(1).double() @ direction
        thresholds = torch.quantile(feature, torch.arange(bins, dtype=torch.double) / bins)
        thresholds[0] = feature.min() - 1.0  # the lowest bin catches everything below t_1
        follow = next_layer(model, first_name)
        with torch.no_grad():
            first.weight[:bins] = direction.float()
            first.bias[:bins] = -thresholds.float()
            follow.weight[:, :bins] = self.params.gain * follow.weight[:, :1]
        return {
            "layer": first_name,
            "rows": bins,
            "feature": self.params.feature,
            "gain": self.params.gain,
            "thresholds": thresholds.tolist(),
            "next_layer_columns_tied": bins,
        }

    def direction(self, features: int) -> Tensor:
        """The unit-free feature the rows measure: the mean, or a seeded N(0, 1/features) direction."""
        if self.params.feature == "brightness":
            return torch.full((features,), 1.0 / features, dtype=torch.double)
        generator = torch_generator(self.seed, "imprint-direction")
        return torch.randn(features, generator=generator, dtype=torch.double) / math.sqrt(features)

    def reconstruct(self, target: GradientTarget) -> Reconstruction:
        layer = input_layer(target.model, target.input_shape, self.name)
        bins = self.params.bins
        weight_grad = -target.update[f"{layer}.weight"][:bins].double()
        bias_grad = -target.update[f"{layer}.bias"][:bins].double()
        zero = torch.zeros_like(weight_grad[:1])
        weight_diff = weight_grad - torch.cat([weight_grad[1:], zero])
        bias_diff = bias_grad - torch.cat([bias_grad[1:], zero[:, 0]])
        full = bias_diff.abs() > self.params.threshold * bias_diff.abs().max().clamp_min(1e-30)
        if not full.any():
            raise UserError(f"attack '{self.name}': no bin of layer '{layer}' has a gradient; was the model crafted?")
        images = weight_diff[full] / bias_diff[full, None]
        details = {"layer": layer, "bins": bins, "bins_filled": int(full.sum())}
        return exact_reconstruction(self, target, images, details)
