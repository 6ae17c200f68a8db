"""Additive noise on the update: Gaussian or Laplacian, of a fixed scale.

Zhu et al. (DLG, 2019) report that Gaussian or Laplacian noise on the shared gradient stops
their attack only once its variance reaches about 1e-2, where accuracy already suffers
(shared/PAPERS.md). Without a bound on the update's norm these are perturbations, not a DP
mechanism, so they report no epsilon; `local_dp` (clip, then calibrated noise) does.

Every draw comes from the client's seeded update-defense generator, so runs repeat.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedsim.core.defense import UpdateTimeDefense
from fedsim.core.registry import DEFENSES


class AdditiveNoise(UpdateTimeDefense):
    """Adds independent zero-mean noise to every floating-point entry of the update."""

    def transform(
        self, update: dict[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        return {
            name: t + self.sample(t, generator).to(t.dtype) if t.is_floating_point() else t
            for name, t in update.items()
        }

    @abstractmethod
    def sample(self, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise shaped like `like`, drawn from `generator`."""


@DEFENSES.register("gaussian_noise")
class GaussianNoise(AdditiveNoise):
    """Gaussian noise N(0, std^2) on every entry of the update."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        std: float = Field(0.01, ge=0, description="standard deviation of the noise")

    params: Params

    def sample(self, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.params.std * torch.randn(like.shape, generator=generator)


@DEFENSES.register("laplace_noise")
class LaplaceNoise(AdditiveNoise):
    """Laplacian noise Lap(0, scale) on every entry of the update (std = sqrt(2) * scale)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        scale: float = Field(0.01, ge=0, description="Laplace scale b (std is sqrt(2) * b)")

    params: Params

    def sample(self, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """b * (E1 - E2) with E1, E2 ~ Exp(1) independent is Laplace(0, b)."""
        exponentials = torch.empty((2, *like.shape)).exponential_(generator=generator)
        return self.params.scale * (exponentials[0] - exponentials[1])
