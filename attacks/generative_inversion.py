"""Generative gradient inversion: search a GAN's latent space instead of pixels.

The honest-but-curious server trains a generator G on data it holds (`fedsim.attacks.generator`),
then looks for latents whose images reproduce the client's gradient:

    min_z  D(grad_theta CE(f_theta(G(z)), y), g) + lambda TV(G(z)),   ||z_i||_2 = sqrt(m)

with D the suite's gradient distance (cosine by default, `fedsim.attacks.gradient_matching`),
labels y inferred from the last layer (or known), g the client's mean step gradient, and
every image's latent z_i kept on the sphere of radius sqrt(m) (m = latent size), where
N(0, I) latents concentrate, so G is only asked for images like those it learned (the
spherical projection of GIAS/GIFD's reference code). This is the latent stage of GIAS
(Jeon et al. 2021) and GIFD (Fang et al. 2023), and GGL's latent search (Li et al. 2022)
with Adam instead of CMA-ES; `gan_latent` is that search alone, `fedsim.attacks.gifd` continues it
into the generator's intermediate features.

Adam steps with GIFD's learning-rate ramp (linear warm-up over the first 5% of the steps,
cosine decay over the last 75%). R restarts per target run as one stacked problem; each
target keeps the restart with the lowest final matching loss D.

Where the prior comes from (`prior_data`): `test` trains G on the server's global test set
(the federation's classes, examples no client trains on: in distribution); `public` on
`data.public_classes`, classes the clients never had (out of distribution). `generator.path`
loads a user's generator instead. The GAN is cached per run, keyed by its data, settings and
the run's prior seed, so attacks with the same prior share one (`AuxiliaryData.seed`).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from rich.console import Console
from torch import Tensor, nn

from fedsim.attacks.generator import Generator, GeneratorParams, train_or_load_generator
from fedsim.attacks.gradient_matching import (
    DISTANCES,
    GradientInversion,
    InversionParams,
    LabelChoice,
    MatchingProblem,
    best_restarts,
    reconstructions,
    stack_labels,
    total_variation,
)
from fedsim.core.attack import AuxiliaryData, GradientTarget, IterationCallback, Reconstruction
from fedsim.core.errors import UserError
from fedsim.core.registry import ATTACKS
from fedsim.core.seeding import derive_seed, torch_generator

WARM_UP = 0.05
COOL_DOWN = 0.75
"""GIFD's learning-rate ramp: linear warm-up over the first 5% of a stage's steps, cosine
decay to zero over the last 75%."""

Render = Callable[[Tensor], Tensor]
"""Variable (T, R, n, ...) -> images (T, R, n, C, H, W) in [0, 1]."""
Projection = Callable[[Tensor], Tensor]
"""Variable -> the nearest allowed variable, applied after every step."""


class PriorParams(InversionParams):
    """Settings every generative inversion shares: the prior and the optimiser."""

    generator: GeneratorParams = Field(
        default_factory=GeneratorParams,
        description="the GAN prior: trained on prior_data (cached per run) or loaded from generator.path",
    )
    prior_data: Literal["test", "public"] = Field(
        "test",
        description="what G is trained on: test = the server's global test set (in distribution); "
        "public = data.public_classes, classes the clients never had (out of distribution)",
    )
    restarts: int = Field(4, ge=1, description="random latents per target, optimised together (GIFD: 4)")
    lr: float = Field(0.1, gt=0, description="Adam step size at the top of the ramp (GIFD: 0.1)")
    tv: float = Field(1e-4, ge=0, description="weight of the total-variation prior on G's images (GIFD: 1e-4)")
    distance: Literal["cosine", "l2"] = Field("cosine", description="gradient distance: cosine (GIFD) or l2")
    sphere: bool = Field(True, description="keep each latent on the sphere of radius sqrt(latent_dim)")


class LatentParams(PriorParams):
    iterations: int = Field(1000, ge=1, description="Adam steps on the latents (GIFD: 1000 per stage)")


def learning_rate_ramp(steps: int) -> Callable[[int], float]:
    """Step -> factor on the learning rate: GIFD's warm-up and cosine cool-down."""

    def factor(step: int) -> float:
        t = (step + 0.5) / steps  # the middle of the step: neither the first nor the last is lost
        return min(1.0, t / WARM_UP) * (0.5 - 0.5 * math.cos(min(1.0, (1 - t) / COOL_DOWN) * math.pi))

    return factor


def descend(
    problem: MatchingProblem,
    start: Tensor,
    render: Render,
    steps: int,
    settings: PriorParams,
    project: Projection,
    on_iteration: IterationCallback | None = None,
) -> tuple[Tensor, Tensor]:
    """Adam on every row of `start` (T, R, n, ...) against D(render(v)) + tv TV(render(v)),
    projected after every step. Returns the final variable and its matching losses (T, R).

    A row whose objective is not finite gets a zero gradient for that step, so it cannot
    poison the others. `on_iteration(done, steps)` is called after every step.
    """
    variable = start.clone().requires_grad_()
    optimizer = torch.optim.Adam([variable], lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_ramp(steps))
    for done in range(1, steps + 1):
        optimizer.zero_grad()
        images = render(variable)
        objective = problem.matching(images) + settings.tv * total_variation(images)
        finite = torch.isfinite(objective)
        objective.where(finite, 0.0).sum().backward()
        rows = finite.reshape(*finite.shape, *(1,) * (variable.dim() - finite.dim()))
        variable.grad = torch.where(rows, variable.grad.nan_to_num(0.0, 0.0, 0.0), 0.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            variable.copy_(project(variable))
        if on_iteration is not None:
            on_iteration(done, steps)
    variable = variable.detach()
    with torch.no_grad():
        return variable, problem.matching(render(variable))


def on_sphere(z: Tensor) -> Tensor:
    """Every latent (last axis) rescaled to norm sqrt(m), where N(0, I_m) concentrates."""
    return z * math.sqrt(z.shape[-1]) / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def random_latents(targets: list[GradientTarget], restarts: int, count: int, size: int, seed: int) -> Tensor:
    """Starting latents N(0, I), (T, R, n, size); each target's generator is seeded by
    (attack seed, round, client), so a target starts the same whichever others it is batched with."""
    return torch.stack([
        torch.randn((restarts, count, size), generator=torch_generator(seed, "latents", t.server_round, t.client))
        for t in targets
    ])  # fmt: skip


@dataclass
class Candidates:
    """What a search leaves, per target and restart: its best images (T, R, n, C, H, W), their
    matching losses (T, R) and the stage that made them (T, R; 0 = the latent stage); per
    target the lowest loss each stage reached (T, S); and details shared by the group."""

    images: Tensor
    losses: Tensor
    stages: Tensor
    stage_losses: Tensor
    details: dict[str, object]


def keep_better(best: Candidates | None, images: Tensor, losses: Tensor, stage: int) -> Candidates:
    """Per (target, restart), the better of the candidates so far and this stage's (a NaN loss
    counts as +inf; ties keep the earlier); `stage_losses` holds this stage's lowest loss per
    target, (T, 1)."""
    losses = losses.nan_to_num(nan=math.inf)
    stages = torch.full_like(losses, stage, dtype=torch.long)
    stage_best = losses.min(dim=1, keepdim=True).values
    if best is None:
        return Candidates(images, losses, stages, stage_best, {})
    better = losses < best.losses
    return Candidates(
        torch.where(better[..., None, None, None, None], images, best.images),
        torch.where(better, losses, best.losses),
        torch.where(better, stages, best.stages),
        stage_best,
        {},
    )


def stacked(module: nn.Module) -> Render:
    """Apply a per-image module to a (T, R, n, ...) stack, keeping the leading axes."""

    def apply(variable: Tensor) -> Tensor:
        out = module(variable.flatten(0, 2))
        return out.unflatten(0, variable.shape[:3])

    return apply


class GenerativeInversion(GradientInversion):
    """Gradient inversion through a generator prior learned in `prepare` (see module docstring).

    Subclasses implement `search`: the optimisation from the starting latents.
    """

    params: PriorParams

    def __init__(self, params: PriorParams, seed: int = 0) -> None:
        super().__init__(params, seed)
        self.generator: Generator | None = None

    @property
    def threat_model(self) -> str:  # type: ignore[override]
        holds = {"test": "its global test set", "public": "public images of other classes"}
        return f"{super().threat_model} + a GAN trained on {holds[self.params.prior_data]}"

    def prepare(self, target: AuxiliaryData, workspace: Path, console: Console) -> None:
        """Train (or load the cached, or the user's) generator on the chosen prior data."""
        prior = self.params.prior_data
        images = target.test_x if prior == "test" else target.public_x
        if self.params.generator.path is None and len(images) < 2:
            fix = (
                "raise data.test_fraction"
                if prior == "test"
                else "set data.public_classes (classes kept out of the federation) or use prior_data: test"
            )
            raise UserError(
                f"attack '{self.name}': prior_data: {prior} holds {len(images)} images, too few to "
                f"train a GAN on; {fix}"
            )
        seed = derive_seed(target.seed, "gan", self.params.prior_data)
        self.generator, _ = train_or_load_generator(images, self.params.generator, workspace, seed, console)

    def solve(self, targets: list[GradientTarget], labels: list[LabelChoice]) -> list[Reconstruction]:
        if self.generator is None:
            raise RuntimeError(f"{type(self).__name__}.prepare must run before reconstruct")
        device = next(targets[0].model.parameters()).device
        generator = self.generator.to(device)
        hard = stack_labels(labels, device)
        assert hard is not None  # generative attacks match under hard labels
        observe, simulate = self.observation(targets)
        problem = MatchingProblem.build(targets, observe, hard, simulate, DISTANCES[self.params.distance])
        start = random_latents(
            targets, self.params.restarts, self.image_count(targets[0]), generator.latent_dim, self.seed
        ).to(device)
        start = on_sphere(start) if self.params.sphere else start
        found = self.search(problem, generator, start)
        pick = torch.arange(len(targets), device=device), best_restarts(found.losses).to(device)
        details = found.details | {"restarts": self.params.restarts, "prior_data": self.params.prior_data}
        results = reconstructions(found.images[pick], hard, found.losses[pick], found.losses, labels, details)
        for result, stage, stage_losses in zip(results, found.stages[pick], found.stage_losses, strict=True):
            result.details |= {"stage": int(stage), "stage_losses": stage_losses.tolist()}
        return results

    def latent_projection(self) -> Projection:
        return on_sphere if self.params.sphere else (lambda z: z)

    @abstractmethod
    def search(self, problem: MatchingProblem, generator: Generator, start: Tensor) -> Candidates:
        """The candidates found from the starting latents (T, R, n, m)."""


@ATTACKS.register("gan_latent")
class LatentInversion(GenerativeInversion):
    """Latent-only GAN inversion (GIAS/GGL-style): search a server-trained GAN's latent.

    GIAS's latent stage, or GGL with Adam instead of CMA-ES, under the suite's gradient loss."""

    Params = LatentParams
    params: LatentParams

    def search(self, problem: MatchingProblem, generator: Generator, start: Tensor) -> Candidates:
        render = stacked(generator)
        z, losses = descend(
            problem, start, render, self.params.iterations, self.params, self.latent_projection(), self.report_iteration
        )
        with torch.no_grad():
            found = keep_better(None, render(z), losses, stage=0)
        found.details = {"iterations": self.params.iterations}
        return found
