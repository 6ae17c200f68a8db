"""Magnitude pruning of the update: keep the largest entries, zero the rest.

Zhu et al. (DLG, 2019) found gradient pruning above ~20% sparsity to be the defense that
stopped their attack (shared/PAPERS.md). Only floating-point tensors are pruned; integer
buffers (e.g. a step counter) pass through unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedsim.core.defense import UpdateTimeDefense
from fedsim.core.registry import DEFENSES


@DEFENSES.register("topk")
class TopK(UpdateTimeDefense):
    """Keep only the largest-magnitude entries of the update (gradient pruning)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        keep_fraction: float = Field(
            0.1, gt=0, le=1, description="fraction of entries kept (at least one)"
        )
        scope: Literal["per_tensor", "global"] = Field(
            "per_tensor",
            description="rank entries within each tensor, or across the whole update",
        )

    params: Params

    def transform(
        self, update: dict[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Zero all but round(keep_fraction * n) entries; deterministic (ties: torch.topk)."""
        floats = {name: t for name, t in update.items() if t.is_floating_point()}
        if not floats:
            return dict(update)
        if self.params.scope == "per_tensor":
            masks = {name: self._keep_mask(t) for name, t in floats.items()}
        else:
            flat = self._keep_mask(torch.cat([t.flatten() for t in floats.values()]))
            pieces = flat.split([t.numel() for t in floats.values()])
            masks = {name: m.view_as(t) for (name, t), m in zip(floats.items(), pieces)}
        return {
            name: torch.where(masks[name], t, torch.zeros_like(t)) if name in masks else t
            for name, t in update.items()
        }

    def _keep_mask(self, tensor: torch.Tensor) -> torch.Tensor:
        """True at the round(keep_fraction * n) (at least 1) largest |entries| of `tensor`."""
        n = tensor.numel()
        k = min(n, max(1, round(self.params.keep_fraction * n)))
        mask = torch.zeros(n, dtype=torch.bool, device=tensor.device)
        mask[tensor.detach().flatten().abs().topk(k).indices] = True
        return mask.view_as(tensor)
