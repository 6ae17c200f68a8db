"""Inverting Gradients (Geiping et al. 2020): cosine matching + total variation, signed Adam.

    min_{x in [0, 1]}  1 - <grad_theta CE(f(x), y), g> / (||grad_theta CE(f(x), y)|| ||g||) + lambda TV(x)

with labels y inferred from the last layer (or known), g the client's mean step gradient.
The optimiser is the paper's: Adam on the *sign* of the gradient (`signed`), the images
projected back into the box [0, 1] after every step (`boxed`), the step size divided by 10
after 3/8, 5/8 and 7/8 of the iterations (`lr_decay`). R restarts per target run as one
stacked problem; each target keeps the restart whose final cosine distance (without TV, as
in the reference code) is lowest.

Published settings (invertinggradients' DEFAULT_CONFIG and breaching's
`attack/invertinggradients.yaml`): lr 0.1, TV 0.1 (breaching 0.2 with the mean of dx + dy,
the same TV as ours) on 32x32 CIFAR images, 1e-4 in the reference CLI, 1e-6 in its FedAvg
example; 4,800 iterations (breaching 24,000); 1 restart (8 in the FedAvg example). On 8x8
digits a TV weight of 0.1 smooths the strokes away: `ig` on batches of 4 scores 18.6 dB at
0.1, 35.3 at 0.01, 50.2 at 1e-3 and 55.1 at 1e-4 (`python benchmarks/ig_table.py --sections
tv`), while at 32x32 and 64x64 the best weight is 1e-3 to 0.1 (`--sections sizes`). So the
default, `tv: auto`, is the reference CLI's 1e-4 at 8x8 and grows with the image's side as
1e-4 (side / 8)^3 (6.4e-3 at 32x32, 0.05 at 64x64; docs/gradient_inversion.md has the
table). A number sets the weight at every size. Our default budget (1,000 steps) is smaller
so that a scenario runs in minutes on a laptop CPU; `iterations` restores the paper's.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor

from fedsim.attacks.gradient_matching import (
    DISTANCES,
    GradientInversion,
    InversionParams,
    LabelChoice,
    MatchingProblem,
    best_restarts,
    random_images,
    reconstructions,
    stack_labels,
    total_variation,
)
from fedsim.core.attack import GradientTarget, IterationCallback, Reconstruction
from fedsim.core.registry import ATTACKS

DECAY_POINTS = (3 / 8, 5 / 8, 7 / 8)
"""Fractions of the iterations after which the step size is divided by 10 (Geiping et al.)."""

AUTO_TV_AT_8 = 1e-4
"""`tv: auto`'s weight on 8x8 images (the reference CLI's 1e-4, best on native digits)."""
AUTO_TV_EXPONENT = 3
"""`tv: auto` grows as (side / 8)^3, which lands between the best measured weights at 32x32
(1e-3 to 0.1) and 64x64 (1e-2 to 0.1) of `benchmarks/ig_table.py --sections sizes`
(docs/gradient_inversion.md, "TV weight by image size")."""


def tv_weight(tv: float | Literal["auto"], image_shape: tuple[int, ...]) -> float:
    """The TV weight for images of `image_shape` (..., H, W): `tv` itself when a number; for
    `auto`, 1e-4 (sqrt(H W) / 8)^3, since larger images of the same content are smoother and
    their cosine term's gradient per pixel is smaller."""
    if tv != "auto":
        return tv
    side = (image_shape[-2] * image_shape[-1]) ** 0.5
    return AUTO_TV_AT_8 * (side / 8) ** AUTO_TV_EXPONENT


class AdamParams(InversionParams):
    """Settings of Inverting Gradients' optimisation, shared with `fedavg_inversion`."""

    iterations: int = Field(1000, ge=1, description="Adam steps (paper: 4,800 to 24,000)")
    lr: float = Field(0.1, gt=0, description="Adam step size (paper: 0.1)")
    tv: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="weight of the total-variation prior; auto: 1e-4 at 8x8, x (side / 8)^3 "
        "(6.4e-3 at 32x32); paper: 0.1-0.2 on 32x32 images",
    )
    distance: Literal["cosine", "l2"] = Field("cosine", description="gradient distance: cosine (IG) or l2 (DLG)")
    signed: bool = Field(True, description="step on the sign of the gradient (as in the paper)")
    boxed: bool = Field(True, description="project the images into [0, 1] after every step")
    lr_decay: bool = Field(True, description="divide the step size by 10 at 3/8, 5/8, 7/8 of the iterations")


def minimise_adam(
    problem: MatchingProblem,
    images: Tensor,
    settings: AdamParams,
    on_iteration: IterationCallback | None = None,
) -> tuple[Tensor, Tensor]:
    """Signed Adam with box projection and step decay on every row of `images` (T, R, ...).

    Returns the final images and their matching distances (T, R), after `iterations` + 1
    evaluations of the objective per row. A row whose objective is not finite gets a zero
    gradient for that step, so it cannot poison the others. `on_iteration(done, iterations)`
    is called after every step.
    """
    tv = tv_weight(settings.tv, tuple(images.shape))
    images = images.clone().requires_grad_()
    optimizer = torch.optim.Adam([images], lr=settings.lr)
    milestones = [int(settings.iterations * point) for point in DECAY_POINTS] if settings.lr_decay else []
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    for done in range(1, settings.iterations + 1):
        optimizer.zero_grad()
        objective = problem.matching(images) + tv * total_variation(images)
        finite = torch.isfinite(objective)
        objective.where(finite, 0.0).sum().backward()
        with torch.no_grad():
            grad = images.grad.where(finite[..., None, None, None, None], 0.0)
            images.grad = grad.nan_to_num(0.0).sign() if settings.signed else grad.nan_to_num(0.0)
        optimizer.step()
        schedule.step()
        if settings.boxed:
            with torch.no_grad():
                images.clamp_(0, 1)
        if on_iteration is not None:
            on_iteration(done, settings.iterations)
    images = images.detach()
    with torch.no_grad():
        return images, problem.matching(images)


@ATTACKS.register("ig")
class InvertingGradients(GradientInversion):
    """Inverting Gradients (Geiping et al. 2020): cosine distance + TV, signed Adam, box, lr decay.

    Matches the client's mean step gradient with one gradient of n dummy images under
    inferred (or known) labels; after several local steps this treats the update as one
    gradient over every example used (`fedavg_inversion` unrolls the steps instead).
    """

    Params = AdamParams
    params: AdamParams

    def solve(self, targets: list[GradientTarget], labels: list[LabelChoice]) -> list[Reconstruction]:
        device = next(targets[0].model.parameters()).device
        hard = stack_labels(labels, device)
        assert hard is not None  # IG always matches under hard labels
        observe, simulate = self.observation(targets)
        problem = MatchingProblem.build(targets, observe, hard, simulate, DISTANCES[self.params.distance])
        restarts = self.params.restarts
        start = random_images(targets, restarts, self.image_count(targets[0]), self.seed).to(device)
        images, losses = minimise_adam(problem, start, self.params, self.report_iteration)
        return self.best_of_restarts(images, losses, hard, labels, {})

    def best_of_restarts(
        self, images: Tensor, losses: Tensor, hard: Tensor, labels: list[LabelChoice], details: dict[str, object]
    ) -> list[Reconstruction]:
        """Each target's restart of lowest loss, reported with the settings and `details`."""
        chosen = best_restarts(losses)
        pick = torch.arange(len(images), device=images.device), chosen.to(images.device)
        return reconstructions(
            images[pick], hard, losses[pick], losses, labels,
            {"iterations": self.params.iterations, "restarts": self.params.restarts,
             "objective_evaluations": self.params.iterations + 1,
             "tv": tv_weight(self.params.tv, tuple(images.shape)), **details},
        )  # fmt: skip
