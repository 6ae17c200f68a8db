"""Norm clipping of the update: scale it down to an L2 norm of at most `max_norm`.

u -> u * min(1, C / ||u||), over the whole update flattened into one vector (as Flower's
central-DP clipping and McMahan et al.'s DP-FedAvg do) or over each tensor separately.
Clipping alone bounds a client's influence but adds no noise, so it reports no epsilon.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedsim.core.defense import UpdateTimeDefense
from fedsim.core.registry import DEFENSES


@DEFENSES.register("norm_clip")
class NormClip(UpdateTimeDefense):
    """Scale the update down to an L2 norm of at most max_norm (whole update or per tensor)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        max_norm: float = Field(1.0, gt=0, description="L2 norm bound C")
        scope: Literal["global", "per_tensor"] = Field(
            "global", description="one norm over the whole update, or one per tensor"
        )

    params: Params

    def transform(
        self, update: dict[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        floats = [name for name, t in update.items() if t.is_floating_point()]
        if not floats:
            return dict(update)
        if self.params.scope == "per_tensor":
            factors = {name: self._factor(update[name].norm()) for name in floats}
        else:
            total = torch.linalg.vector_norm(torch.stack([update[n].norm() for n in floats]))
            factors = dict.fromkeys(floats, self._factor(total))
        return {name: t * factors[name] if name in factors else t for name, t in update.items()}

    def _factor(self, norm: torch.Tensor) -> torch.Tensor:
        """min(1, C / norm); 1 for a zero update."""
        return torch.clamp(self.params.max_norm / norm.clamp(min=1e-12), max=1.0)
