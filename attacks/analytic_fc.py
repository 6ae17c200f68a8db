"""Analytic recovery of a fully-connected layer's input from its gradient (Phong et al. 2017;
Geiping et al. 2020, sec. 3).

Threat model: the honest-but-curious server (one client's update, the weights sent); the model
begins with a linear layer with bias on the flattened image (`mlp`, or any model whose first
`nn.Linear` takes the whole image). No optimisation, no prior.

For z = W x + b and one example, dL/dW_i = (dL/dz_i) x and dL/db_i = dL/dz_i, so every row i
with a nonzero bias gradient gives x = (dL/dW_i) / (dL/db_i) exactly. For a batch the ratio is
a mix, sum_b g_bi x_b / sum_b g_bi with g_bi = dL/dz_bi of the example b, which is one example
exactly wherever only that example reached row i (after a ReLU: the others were inactive, so
their g_bi = 0). Rows that agree with each other therefore mark single examples: the attack
clusters the rows' candidates (max-abs distance below `tolerance`) and returns the `images`
largest clusters. This is what is cheap and exact; `spear` (Dimitrov et al. 2024,
attacks/spear.py) recovers whole batches from the low rank and sparsity of dL/dW. The update is used as is: the
ratio is blind to lr and scale, exact for one SGD step, approximate after several.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from fedsim.attacks.gradient_matching import mean_step_gradient
from fedsim.attacks.label_inference import infer_labels
from fedsim.core.attack import GradientAttack, GradientTarget, Reconstruction
from fedsim.core.errors import UserError
from fedsim.core.registry import ATTACKS
from fedsim.core.seeding import torch_generator


def input_layer(model: nn.Module, input_shape: tuple[int, ...], attack: str) -> str:
    """The name of the first `nn.Linear` with bias that takes the flattened image, or a UserError."""
    features = math.prod(input_shape)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.in_features == features and module.bias is not None:
            return name
    raise UserError(
        f"attack '{attack}': the model has no linear layer with bias on the flattened "
        f"{tuple(input_shape)} input; use model 'mlp' (or a model whose first layer is one)"
    )


def row_candidates(weight_grad: Tensor, bias_grad: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """(dL/dW_i) / (dL/db_i) for the rows with |dL/db_i| > threshold * max |dL/db|, and those rows."""
    rows = (bias_grad.abs() > threshold * bias_grad.abs().max().clamp_min(1e-30)).nonzero().flatten()
    return weight_grad[rows] / bias_grad[rows, None], rows


def largest_clusters(candidates: Tensor, count: int, tolerance: float) -> tuple[Tensor, Tensor]:
    """Up to `count` representatives of the largest groups of near-equal candidates (greedy:
    the candidate with most neighbours within `tolerance` (max abs), its group removed, repeat),
    each the mean of its group, and the group sizes."""
    close = torch.cdist(candidates, candidates, p=math.inf) <= tolerance
    left = torch.ones(len(candidates), dtype=torch.bool)
    found, sizes = [], []
    while left.any() and len(found) < count:
        support = (close & left[None, :] & left[:, None]).sum(1)
        best = int(support.argmax())
        members = close[best] & left
        found.append(candidates[members].mean(0))
        sizes.append(int(members.sum()))
        left &= ~members
    return torch.stack(found), torch.tensor(sizes)


def exact_reconstruction(
    attack: GradientAttack, target: GradientTarget, images: Tensor, details: dict[str, object]
) -> Reconstruction:
    """The Reconstruction of an analytic attack: recovered rows as images plus inferred labels.

    Shared by `analytic_fc` and `imprint` so both seed label inference and report it the same way.
    """
    images = images.float().reshape(-1, *target.input_shape)
    generator = torch_generator(attack.seed, "label-inference", target.server_round, target.client)
    labels, method = infer_labels(target, mean_step_gradient(target), len(images), generator, attack.name)
    return Reconstruction(
        images=images.clamp(0, 1),
        labels=labels,
        attack_loss=0.0,
        details={**details, "labels": method, "objective_evaluations": 0},
    )


class AnalyticParams(BaseModel):
    """Settings of the analytic recovery."""

    model_config = ConfigDict(extra="forbid")

    images: int | None = Field(
        None, ge=1, description="examples to recover; default: min(num_examples, local_steps * batch_size)"
    )
    threshold: float = Field(
        1e-6, ge=0, lt=1, description="rows with |bias gradient| below this share of the largest are skipped"
    )
    tolerance: float = Field(
        1e-3, gt=0, description="max abs pixel difference under which two rows' candidates are one example"
    )


@ATTACKS.register("analytic_fc")
class AnalyticFC(GradientAttack):
    """Exact input of the first linear layer: the rows' dL/dW_i / dL/db_i, clustered."""

    Params = AnalyticParams
    params: AnalyticParams
    needs_classes = True
    threat_model = "honest-but-curious server (one client's update, the weights sent); model starts with a linear layer"

    def reconstruct(self, target: GradientTarget) -> Reconstruction:
        layer = input_layer(target.model, target.input_shape, self.name)
        update = target.update
        weight_grad, bias_grad = -update[f"{layer}.weight"].double(), -update[f"{layer}.bias"].double()
        candidates, rows = row_candidates(weight_grad, bias_grad, self.params.threshold)
        if len(rows) == 0:
            raise UserError(f"attack '{self.name}': the update of layer '{layer}' is zero; nothing to recover")
        count = self.params.images or max(1, min(target.num_examples, target.local_steps * target.batch_size))
        found, sizes = largest_clusters(candidates, count, self.params.tolerance)
        details = {"layer": layer, "rows_used": len(rows), "cluster_sizes": sizes.tolist()}
        return exact_reconstruction(self, target, found, details)
