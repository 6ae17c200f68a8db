"""The membership seam: what a membership attacker is given and what it must return.

Threat model 5 (DESIGN.md): decide whether examples (or a data source) took part in training.
A `MembershipAttack` is registered in `fedsim.core.registry.ATTACKS` like every attack; its
`granted` says which of three attackers it is:

- "model": a model holder (threat model 3). The target holds the final global model, the
  candidate examples and population examples it knows are not members, and can ask for
  reference models: federations trained like the target on known parts of the population
  (LiRA's shadows, RMIA's reference models; `fedsim.pipeline.shadows`).
- "update": the honest-but-curious server (threat model 1). The target additionally holds one
  recorded client update (`GradientTarget`), and membership means "in that client's data
  that round".
- "canaries": an auditor (threat model 5) who planted canaries (`data.canaries`): the
  candidates are the canaries, and the stage turns the scores into an epsilon lower bound.
  The auditor knows which client each canary was designated to (`canary_clients`), not
  whether it was included; a white-box auditor also sees every recorded update (`updates`).

`score` returns one number per candidate (higher = more likely a member), or, when the target
groups candidates into `sources` (client-level inference: "did this client hold data of this
person?"), one per source in ascending source id. Membership itself never enters a target:
the membership stage (`fedsim.pipeline.membership`) scores afterwards.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from fedsim.core.attack import Attack, GradientTarget


@dataclass(frozen=True)
class ReferenceModel:
    """A final model trained like the target; `includes[i]`: it trained on candidate i,
    `includes_population[j]`: on population example j."""

    model: nn.Module
    includes: np.ndarray
    includes_population: np.ndarray


@dataclass(frozen=True)
class MembershipTarget:
    """What a membership attacker holds (see the module doc); never who is a member.

    `x`, `y`: the candidates; `population_x`, `population_y`: examples known not to be members
    (the server's held-out test data; RMIA's z). `reference_models(k)` trains, or loads once
    trained, k reference federations and returns their models (expensive: call it once).
    `update` is set for the curious server's attacks; `sources` (one id per candidate) for
    client-level inference; `canary_clients` and `updates` for audits.
    """

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    population_x: torch.Tensor
    population_y: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int
    reference_models: Callable[[int], list[ReferenceModel]]
    update: GradientTarget | None = None
    sources: np.ndarray | None = None
    canary_clients: np.ndarray | None = None
    updates: tuple[GradientTarget, ...] = ()
    canary_coordinates: np.ndarray | None = None  # gradient canaries: flat parameter indices


class MembershipAttack(Attack):
    """Base of membership attacks: `granted` says what the attacker holds (the final model,
    one recorded update, or the canaries for an audit); `score` returns one score per candidate."""

    granted: ClassVar[Literal["model", "update", "canaries"]] = "model"
    sees_updates: ClassVar[bool] = False  # an audit that also gets every recorded update

    @classmethod
    def check_scenario(cls, params: BaseModel, scenario: Any) -> None:
        """Update attacks need recorded updates, audits canaries; model-holder attacks run anywhere."""
        if cls.granted == "update" or cls.sees_updates:
            if scenario.observer.rounds == "none":
                raise ValueError(
                    f"attack '{cls.registered_name}' scores recorded client updates; set observer.rounds"
                )
        if cls.granted == "canaries" and scenario.data.canaries.count == 0:
            raise ValueError(f"attack '{cls.registered_name}' audits canaries; set data.canaries.count")

    @abstractmethod
    def score(self, target: MembershipTarget) -> np.ndarray:
        """Membership scores: one per candidate, or one per source when `target.sources` is set."""
