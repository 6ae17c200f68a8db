"""GIFD (Fang et al., ICCV 2023): gradient inversion over a generator's feature domains.

A GAN prior makes reconstructions look real, but only images the GAN can make are
reachable: a digit written in another hand, or a class the GAN never saw, is not. GIFD
first searches the latent (stage 0, exactly `gan_latent`), then walks down the generator.
At stage k it takes the feature map that the previous stage's result produces at layer k,
h^0 = G_{0->k}(previous), as the new variable and solves

    min_h  D(grad_theta CE(f_theta(G_{k->out}(h)), y), g) + lambda TV(G_{k->out}(h))
    s.t.   ||h_i - h^0_i||_1 <= r_k        for every image i,

projecting h back onto the l1 ball around h^0 after every Adam step (Euclidean
projection, Duchi et al. 2008). The layers above k stay fixed. A deeper layer leaves
fewer generator layers to shape the image, so the ball keeps the search near what G makes;
the radii grow layer by layer (GIFD's configs: r_k = r_1 + (k - 1) delta). Every stage's final
images are candidates; each target keeps the (stage, restart) whose matching loss D is
lowest, GIFD's "best layer".

`radii` are per feature entry: stage k's ball has l1 radius radii[k-1] times the entries of
h_k per image, i.e. a mean absolute change per entry, comparable across layers of
different sizes. The generator is `fedsim.attacks.generator.Generator`, run layer by layer through
`LayeredGenerator`; its feature domains are the seed map after the projection and the
output of every upsampling block but the last (two for 8x8 or 28x28 images, three for 32x32).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor, nn

from fedsim.attacks.generative_inversion import (
    Candidates,
    GenerativeInversion,
    PriorParams,
    descend,
    keep_better,
    stacked,
)
from fedsim.attacks.generator import Generator
from fedsim.attacks.gradient_matching import MatchingProblem
from fedsim.core.errors import UserError
from fedsim.core.registry import ATTACKS


def project_l1_ball(v: Tensor, radius: float) -> Tensor:
    """Euclidean projection of every row v (last axis) onto {u : ||u||_1 <= radius}.

    Duchi et al. 2008: u = sign(v) max(|v| - theta, 0) with theta >= 0 the smallest value
    giving ||u||_1 <= radius. With mu the magnitudes sorted in decreasing order and c their
    cumulative sums, rho = #{j : mu_j > (c_j - radius) / j} and theta = (c_rho - radius) / rho.
    Rows already inside the ball are returned unchanged.
    """
    magnitude = v.abs()
    mu = magnitude.sort(dim=-1, descending=True).values
    cumulative = mu.cumsum(dim=-1)
    index = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = (mu * index > cumulative - radius).sum(dim=-1, keepdim=True).clamp_min(1)
    theta = (cumulative.gather(-1, rho - 1) - radius) / rho
    projected = v.sign() * (magnitude - theta).clamp_min(0)
    return torch.where(magnitude.sum(dim=-1, keepdim=True) <= radius, v, projected)


class L1Ball:
    """The constraint of one GIFD stage: ||h_i - c_i||_1 <= radius for every image i of a
    stack (T, R, n, ...). Calling it projects; it remembers the largest ratio
    ||h_i - c_i||_1 / radius among the tensors it returned (at most 1 up to rounding)."""

    def __init__(self, center: Tensor, radius: float) -> None:
        self.center = center.detach().clone()
        self.radius = radius
        self.max_ratio = 0.0

    def deviation_norms(self, h: Tensor) -> Tensor:
        """||h_i - c_i||_1 per image, (T, R, n)."""
        return (h - self.center).abs().flatten(3).sum(-1)

    def __call__(self, h: Tensor) -> Tensor:
        deviation = (h - self.center).flatten(3)
        projected = self.center + project_l1_ball(deviation, self.radius).unflatten(3, h.shape[3:])
        self.max_ratio = max(self.max_ratio, float(self.deviation_norms(projected).max()) / self.radius)
        return projected


class LayeredGenerator:
    """`fedsim.attacks.generator.Generator` as a chain z -> h_1 -> ... -> h_K -> image.

    Block 0 is the generator's projection reshaped to the seed map (h_1); every later block
    is one upsampling block of its body (transposed convolution, batch norm, ReLU), the last
    one ending in the image's sigmoid. The generator's own modules are reused, not copied.
    """

    def __init__(self, generator: Generator) -> None:
        self.blocks: list[nn.Module] = [nn.Sequential(generator.project, nn.Unflatten(1, generator.seed_shape))]
        block: list[nn.Module] = []
        for module in generator.body:
            block.append(module)
            if isinstance(module, nn.ReLU):
                self.blocks.append(nn.Sequential(*block))
                block = []
        self.blocks.append(nn.Sequential(*block))

    @property
    def depth(self) -> int:
        """Feature domains between the latent and the image."""
        return len(self.blocks) - 1

    def block(self, k: int) -> nn.Module:
        """h_k -> h_{k+1} (h_0 is the latent)."""
        return self.blocks[k]

    def tail(self, k: int) -> nn.Module:
        """h_k -> image."""
        return nn.Sequential(*self.blocks[k:])


class GifdParams(PriorParams):
    steps: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [400, 300, 300],
        min_length=1,
        description="Adam steps per stage: the latent, then each feature domain from the top (GIFD: 1000 each)",
    )
    radii: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [0.2, 0.4],
        description="l1 radius per feature entry of each feature stage (one per entry of steps after "
        "the first), growing layer by layer as in GIFD",
    )

    @field_validator("radii")
    @classmethod
    def _one_radius_per_feature_stage(cls, radii: list[float], info: ValidationInfo) -> list[float]:
        steps = info.data.get("steps")
        if steps is not None and len(radii) != len(steps) - 1:
            raise ValueError(
                f"give one radius per feature stage: steps has {len(steps)} entries "
                f"(the latent + {len(steps) - 1} layers), radii has {len(radii)}"
            )
        return radii


@ATTACKS.register("gifd")
class Gifd(GenerativeInversion):
    """GIFD (Fang et al. 2023): latent, then l1-bounded feature-map searches, layer by layer.

    Every stage's result is a candidate; the one with the lowest gradient loss wins."""

    Params = GifdParams
    params: GifdParams

    def search(self, problem: MatchingProblem, generator: Generator, start: Tensor) -> Candidates:
        layers = LayeredGenerator(generator)
        if len(self.params.steps) - 1 > layers.depth:
            raise UserError(
                f"attack 'gifd': steps asks for {len(self.params.steps) - 1} feature stages but the "
                f"generator has {layers.depth}; give at most {layers.depth + 1} steps and {layers.depth} radii"
            )
        variable, best, stage_losses, ratios = start, None, [], []
        for stage, steps in enumerate(self.params.steps):
            project = self.latent_projection()
            if stage > 0:  # the previous stage's result, carried down to this layer's feature map
                with torch.no_grad():
                    variable = stacked(layers.block(stage - 1))(variable)
                project = L1Ball(variable, self.params.radii[stage - 1] * variable[0, 0, 0].numel())
            render = stacked(layers.tail(stage))
            before = sum(self.params.steps[:stage])

            def progress(done: int, _: int, before: int = before) -> None:  # over every stage's steps
                self.report_iteration(before + done, sum(self.params.steps))

            variable, losses = descend(problem, variable, render, steps, self.params, project, progress)
            with torch.no_grad():
                best = keep_better(best, render(variable), losses, stage)
            stage_losses.append(best.stage_losses[:, -1])
            if isinstance(project, L1Ball):
                ratios.append(project.max_ratio)
        assert best is not None  # steps has at least one stage
        best.stage_losses = torch.stack(stage_losses, dim=1)
        best.details = {"steps": self.params.steps, "radii": self.params.radii, "l1_ratio_max": ratios}
        return best

