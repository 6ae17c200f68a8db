"""White-box model inversion by gradient ascent on the target class (MI-FACE).

Fredrikson, Jha, Ristenpart 2015 ("Model inversion attacks that exploit confidence
information"): whoever holds the model searches the input space for an image the model
assigns to class c with high confidence,

    min_{x in [0,1]^d}  L_c(f(x)) + lambda_tv * TV(x) + lambda_2 * ||x||^2 / d

with L_c = -log softmax(f(x))_c ("log_likelihood") or 1 - softmax(f(x))_c (the paper's
"probability" cost), TV(x) the mean absolute difference of neighbouring pixels (a smoothness
prior), and the box constraint kept by clamping after every Adam step. Every target class gets
`images_per_class` restarts from independent uniform noise, optimised together in one batch.

`ModelInversionParams` are the settings every model-inversion attack shares: which classes,
how many images, and the evaluation protocol the model stage scores them with.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from fedsim.evaluation.mi_evaluation import EvaluationParams
from fedsim.core.attack import ModelAttack, ModelTarget, Reconstruction
from fedsim.core.registry import ATTACKS
from fedsim.core.seeding import torch_generator

WHITE_BOX = "model holder, white-box: the final global model's weights and gradients"


class ModelInversionParams(BaseModel):
    """What every model-inversion attack is asked for, and how the model stage scores it."""

    model_config = ConfigDict(extra="forbid")

    images_per_class: int = Field(8, ge=1, description="reconstructions (restarts) per class")
    target_classes: list[int] | None = Field(
        None, description="private classes to attack; null = every private class"
    )
    evaluation: EvaluationParams = Field(
        default_factory=EvaluationParams,
        description="the independent evaluation classifier (never given to the attack)",
    )


def target_labels(target: ModelTarget, per_class: int) -> Tensor:
    """Each target class repeated `per_class` times: the labels of the batch to invert."""
    return torch.tensor(target.target_classes, dtype=torch.long).repeat_interleave(per_class)


def class_likelihood_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per image -log softmax(logits)_label: the identity loss of MI-FACE and GMI."""
    return F.cross_entropy(logits, labels, reduction="none")


def total_variation(images: Tensor) -> Tensor:
    """Per image: mean |x_{i+1,j} - x_{i,j}| + mean |x_{i,j+1} - x_{i,j}| over pixels."""
    vertical = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(1)
    horizontal = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).mean(1)
    return vertical + horizontal


@ATTACKS.register("mi_face")
class MiFace(ModelAttack):
    """MI-FACE (Fredrikson et al. 2015): gradient ascent on the class likelihood, TV/L2 priors."""

    threat_model = WHITE_BOX

    class Params(ModelInversionParams):
        iterations: int = Field(500, ge=1, description="Adam steps")
        lr: float = Field(0.05, gt=0, description="Adam learning rate on the pixels")
        objective: Literal["log_likelihood", "probability"] = Field(
            "log_likelihood",
            description="-log p(c|x), or the paper's 1 - p(c|x) (flat once p is near 0)",
        )
        tv_weight: float = Field(0.05, ge=0, description="weight of the total-variation prior")
        l2_weight: float = Field(0.0, ge=0, description="weight of the mean squared pixel value")

    params: Params

    def reconstruct(self, target: ModelTarget) -> Reconstruction:
        p = self.params
        labels = target_labels(target, p.images_per_class)
        generator = torch_generator(self.seed, "mi_face", *target.target_classes)
        images = torch.rand(len(labels), *target.input_shape, generator=generator)
        images.requires_grad_()
        optimizer = torch.optim.Adam([images], lr=p.lr)
        for done in range(1, p.iterations + 1):
            cost = self._cost(target, images, labels).sum()
            optimizer.zero_grad()
            cost.backward(inputs=[images])
            optimizer.step()
            with torch.no_grad():
                images.clamp_(0, 1)
            self.report_iteration(done, p.iterations)
        with torch.no_grad():
            final = self._cost(target, images, labels)
            confidence = target.model(images).softmax(-1).gather(1, labels[:, None])
        return Reconstruction(
            images=images.detach(),
            labels=labels,
            attack_loss=final.mean().item(),
            details={"target_confidence": confidence.mean().item()},
        )

    def _cost(self, target: ModelTarget, images: Tensor, labels: Tensor) -> Tensor:
        logits = target.model(images)
        if self.params.objective == "probability":
            fit = 1 - logits.softmax(-1).gather(1, labels[:, None]).squeeze(1)
        else:
            fit = class_likelihood_loss(logits, labels)
        prior = self.params.tv_weight * total_variation(images)
        return fit + prior + self.params.l2_weight * images.square().flatten(1).mean(1)
