"""GradInversion (Yin et al., CVPR 2021, "See through Gradients"): gradient matching with a
BatchNorm-statistics prior, image priors and group consistency, for models with BatchNorm.

    min_x  D(grad_theta CE(f(x), y), g)                                        fidelity
         + a_bn sum_l ||mu_l(x) - mu_l*||_2 + ||sigma2_l(x) - sigma2_l*||_2       BN prior
         + a_tv TV(x) + a_l2 mean (x - 1/2)^2                                     image priors
         + a_group mean (x_r - mean_r' x_r')^2                                    group consistency

over x in [0, 1]^(n x C x H x W), with mu_l(x), sigma2_l(x) the per-channel mean and
(unbiased) variance of the dummy batch's features entering BatchNorm layer l, D Inverting
Gradients' cosine distance (Yin et al. use the l2 distance: `distance: l2`), Inverting
Gradients' optimiser (signed Adam, box, step decay; `fedsim.attacks.inverting_gradients`).

Threat model: the honest-but-curious server sees one client's update and knows the model it
sent, BatchNorm buffers included. **Which statistics mu*, sigma2* the attacker matches**
(`bn_statistics`):
- `update` (default): the batch's own statistics, read from the update. A client training in
  train mode normalises with its batch's statistics and moves each running buffer as
  m <- (1 - a) m + a mu_batch (a the layer's momentum); FedAvg sends the buffers back with the
  weights, so after T local steps mu = m_0 + (m_T - m_0) / (1 - (1 - a)^T), and the same for
  the variance. Exact after one step on one batch: the prior is then zero at the true batch
  (`tests/test_grad_inversion.py`); after several steps it is the steps' weighted mean of
  statistics that drift with the weights (and, when n > batch size, of per-batch variances):
  an estimate. This is the "exact BN statistics" setting of Huang et al. (NeurIPS 2021).
- `running`: the running statistics of the model that was sent, Yin et al.'s prior (their
  model was trained on the population, so its buffers describe the data). In a federation
  these are the buffers FedAvg averaged over earlier rounds; at round 1 they are the
  initialisation (mean 0, variance 1) and describe nothing.

Labels come from the last layer's gradient: iDLG for one image and, for a batch, the
mean-softmax label counts of `fedsim.attacks.label_inference`, which unlike Yin et al.'s
batch label restoration (the classes of the most negative rows, each at most once) also
recovers repeated labels. Group consistency (Yin et al. sec. 3.3): the R restarts of a target
are the group; every step pulls each towards the group's pixel mean (detached, recomputed
every step; Yin et al. register the restarts to one another first, which we do not: with the
labels sorted, slot i of every restart holds the same class). The output per target is the
restart with the lowest fidelity + BN objective. Default BN weight 0.1: better than 0.01 in
every cell of `python benchmarks/ig_table.py --sections bn` (docs/gradient_inversion.md,
"GradInversion"), where at 500 iterations on an untrained BN ResNet-20 no attack recovers the
images (all below 10 dB) and the prior adds 0.3-2.4 dB over `ig`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.func import grad
from torch.nn.modules.batchnorm import _BatchNorm

from fedsim.attacks.gradient_matching import (
    DISTANCES,
    Distance,
    FunctionalModel,
    LabelChoice,
    MatchingProblem,
    Weights,
    label_loss,
    mean_step_gradient,
    random_images,
    stack_labels,
)
from fedsim.attacks.inverting_gradients import AdamParams, InvertingGradients, minimise_adam
from fedsim.core.attack import GradientTarget, Reconstruction
from fedsim.core.errors import UserError
from fedsim.core.registry import ATTACKS

Statistics = Literal["update", "running"]


def batch_norm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """The model's BatchNorm layers by module name, in definition order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, _BatchNorm)}


def feature_statistics(features: Tensor) -> Tensor:
    """(2, C): per-channel mean and unbiased variance of (N, C, ...) features, as BatchNorm
    computes them in train mode (the variance its running buffer averages)."""
    dims = [0, *range(2, features.dim())]
    return torch.stack([features.mean(dims), features.var(dims, correction=1)])


def observed_statistics(target: GradientTarget, source: Statistics, attack: str) -> list[Tensor]:
    """mu*, sigma2* per BatchNorm layer of the target's model, (2, C) each: from the buffers'
    update (`update`, the client's batch) or the sent buffers (`running`); see the module doc."""
    layers = batch_norm_layers(target.model)
    if not layers:
        raise UserError(
            f"attack '{attack}': the model has no BatchNorm layer, so there is no BN prior; "
            "use a model with BatchNorm (e.g. resnet20 with norm: batch) or attack 'ig'"
        )
    statistics, moved_any = [], False
    for name, layer in layers.items():
        sent = torch.stack([layer.running_mean, layer.running_var]).detach()
        if source == "running":
            statistics.append(sent)
            continue
        moved = [target.update.get(f"{name}.running_{kind}") for kind in ("mean", "var")]
        if moved[0] is None or moved[1] is None or layer.momentum is None:
            raise UserError(
                f"attack '{attack}': bn_statistics: update needs the update of '{name}''s running "
                "mean and variance with a fixed momentum; set bn_statistics: running"
            )
        delta = torch.stack(moved).to(sent)
        moved_any = moved_any or bool(delta.ne(0).any())
        statistics.append(sent + delta / (1 - (1 - layer.momentum) ** target.local_steps))
    if source == "update" and not moved_any:
        raise UserError(
            f"attack '{attack}': the update leaves every BatchNorm buffer unchanged (a bare "
            "gradient, e.g. from_gradient), so it holds no batch statistics; pass the client's "
            "returned buffers (targets.from_local_training) or set bn_statistics: running"
        )
    return statistics


@dataclass(frozen=True)
class GradientAndStatistics:
    """The simulation: the dummy batch's gradient (parameter order) followed by each BatchNorm
    layer's feature statistics (2, C), read by pre-forward hooks within the same pass."""

    layers: tuple[str, ...]

    def __call__(self, model: FunctionalModel, params: Weights, images: Tensor, labels: Tensor) -> list[Tensor]:
        modules = dict(model.module.named_modules())
        features: dict[str, Tensor] = {}
        hooks = [
            modules[name].register_forward_pre_hook(lambda _, args, name=name: features.__setitem__(name, args[0]))
            for name in self.layers
        ]

        def loss(p: Weights) -> tuple[Tensor, list[Tensor]]:
            value = label_loss(model(p, images), labels)
            return value, [feature_statistics(features[name]) for name in self.layers]

        try:
            gradient, statistics = grad(loss, has_aux=True)(params)
        finally:
            for hook in hooks:
                hook.remove()
        return [*gradient.values(), *statistics]


def statistics_distance(dummy: list[Tensor], observed: list[Tensor]) -> Tensor:
    """sum_l ||mu_l - mu_l*||_2 + ||sigma2_l - sigma2_l*||_2 (Yin et al.'s R_BN); 0 exactly at
    the observed statistics."""
    return sum(torch.linalg.vector_norm(a - b, dim=-1).sum() for a, b in zip(dummy, observed, strict=True))


@dataclass(frozen=True)
class WithStatistics:
    """D on the first `parameters` entries (the gradient) + `weight` x the BN distance on the rest."""

    distance: Distance
    parameters: int
    weight: float

    def __call__(self, dummy: list[Tensor], observed: list[Tensor]) -> Tensor:
        cut = self.parameters
        fidelity = self.distance(dummy[:cut], observed[:cut])
        return fidelity + self.weight * statistics_distance(dummy[cut:], observed[cut:])


@dataclass(frozen=True)
class GroupProblem(MatchingProblem):
    """The objective the optimiser sees: `matching` adds the l2 prior and group consistency
    to the fidelity + BN distance of every row (T, R); `priors` is that addition alone."""

    l2: float = 0.0
    group: float = 0.0

    def priors(self, images: Tensor) -> Tensor:
        """a_l2 mean (x - 1/2)^2 + a_group mean (x - consensus)^2 per row, images (T, R, n, C, H, W);
        the consensus, each target's mean over restarts, is a constant (no gradient between rows)."""
        terms = self.l2 * (images - 0.5).pow(2).flatten(2).mean(-1)
        if self.group and images.shape[1] > 1:
            consensus = images.detach().mean(1, keepdim=True)
            terms = terms + self.group * (images - consensus).pow(2).flatten(2).mean(-1)
        return terms

    def matching(self, images: Tensor, label_logits: Tensor | None = None) -> Tensor:
        return super().matching(images, label_logits) + self.priors(images)


class GradInversionParams(AdamParams):
    """Inverting Gradients' settings plus GradInversion's priors."""

    bn: float = Field(0.1, ge=0, description="weight of the BatchNorm-statistics prior (0: off, plain ig + priors)")
    bn_statistics: Statistics = Field(
        "update",
        description="update: the client's batch statistics, read from its buffers' update; "
        "running: the sent model's running statistics (Yin et al.; uninformative at round 1)",
    )
    l2: float = Field(0.0, ge=0, description="weight of the l2 image prior mean (x - 1/2)^2")
    group: float = Field(
        0.01, ge=0, description="group-consistency weight: pull each restart towards the restarts' mean"
    )
    restarts: int = Field(2, ge=1, description="the group: random starts per target, optimised together")


@ATTACKS.register("grad_inversion")
class GradInversion(InvertingGradients):
    """GradInversion (Yin et al. 2021): IG's objective + BatchNorm-statistics prior, l2 prior
    and group consistency over restarts; for models with BatchNorm layers."""

    Params = GradInversionParams
    params: GradInversionParams

    @property
    def threat_model(self) -> str:  # type: ignore[override]
        seen = {
            "update": "the client's BatchNorm batch statistics, read from its buffers' update",
            "running": "the sent model's BatchNorm running statistics",
        }[self.params.bn_statistics]
        return f"{super().threat_model} + {seen}"

    def solve(self, targets: list[GradientTarget], labels: list[LabelChoice]) -> list[Reconstruction]:
        device = next(targets[0].model.parameters()).device
        hard = stack_labels(labels, device)
        assert hard is not None  # matched under hard labels, inferred or known
        source = self.params.bn_statistics
        layers = tuple(batch_norm_layers(targets[0].model)) if self.params.bn else ()

        def observe(target: GradientTarget) -> list[Tensor]:
            extra = observed_statistics(target, source, self.name) if self.params.bn else []
            return [*mean_step_gradient(target), *extra]

        distance = WithStatistics(
            DISTANCES[self.params.distance], len(list(targets[0].model.parameters())), self.params.bn
        )
        problem = GroupProblem.build(targets, observe, hard, GradientAndStatistics(layers), distance)
        problem = replace(problem, l2=self.params.l2, group=self.params.group)
        start = random_images(targets, self.params.restarts, self.image_count(targets[0]), self.seed).to(device)
        images, objective = minimise_adam(problem, start, self.params, self.report_iteration)
        details = {"bn": self.params.bn, "bn_statistics": source if layers else "off",
                   "l2": self.params.l2, "group": self.params.group}  # fmt: skip
        return self.best_of_restarts(images, objective - problem.priors(images), hard, labels, details)

