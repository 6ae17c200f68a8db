"""The attack seam: what an attacker is given and what it must return.

An attack is one class registered in `fedsim.registry.ATTACKS`. It receives only what its
threat model grants (for gradient inversion: what the honest-but-curious server observed,
as a `GradientTarget`) and returns a `Reconstruction`. Ground truth never enters an attack:
the runner scores the reconstruction afterwards.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn


@dataclass(frozen=True)
class GradientTarget:
    """One client's update in one round, as the honest-but-curious server saw it.

    `model` is a fresh copy of the architecture loaded with the global weights that were
    sent; `update` is (returned weights - sent weights) for every parameter and buffer.
    The hyper-parameters are those the server sent (threat model 1 in DESIGN.md).
    Images live in [0, 1] with shape `input_shape` (C, H, W).
    """

    model: nn.Module
    update: dict[str, torch.Tensor]
    num_examples: int
    lr: float
    local_steps: int
    batch_size: int
    input_shape: tuple[int, ...]
    num_classes: int
    server_round: int
    client: int
    known_labels: torch.Tensor | None = None

    def parameter_update(self) -> list[torch.Tensor]:
        """The update restricted to trainable parameters, in `model.parameters()` order."""
        return [self.update[name] for name, _ in self.model.named_parameters()]

    def single_step_gradient(self) -> list[torch.Tensor]:
        """The gradient of the one SGD step that produced the update: -update / lr.

        Exact when the client took one plain SGD step; an approximation otherwise.
        """
        return [-u / self.lr for u in self.parameter_update()]


@dataclass
class Reconstruction:
    """An attack's output: images in [0, 1] (B, C, H, W), labels (B,), and its own loss."""

    images: torch.Tensor
    labels: torch.Tensor
    attack_loss: float
    details: dict[str, Any] = field(default_factory=dict)


class Attack(ABC):
    """Base of every attack; subclasses state their threat model in `threat_model`."""

    threat_model: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    def __init__(self, params: BaseModel, seed: int = 0) -> None:
        self.params = params
        self.seed = seed

    @abstractmethod
    def reconstruct(self, target: GradientTarget) -> Reconstruction:
        """Reconstruct the client's training data from what the server saw."""
