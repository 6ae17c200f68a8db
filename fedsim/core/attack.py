"""The attack seam: what an attacker is given and what it must return.

An attack is one class registered in `fedsim.core.registry.ATTACKS`. Its base says what its
threat model grants: a `GradientAttack` gets what the honest-but-curious server observed of
one client (a `GradientTarget`); a `ModelAttack` gets what a model holder has (a
`ModelTarget`: the final global model plus public auxiliary data). Each returns a
`Reconstruction`. Ground truth never enters an attack: the runner scores afterwards.
"""

from __future__ import annotations

import copy
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import torch
from pydantic import BaseModel
from torch import Tensor, nn

if TYPE_CHECKING:
    from rich.console import Console


@dataclass(frozen=True)
class GradientTarget:
    """One client's update in one round, as the honest-but-curious server saw it.

    `model` is a fresh copy of the architecture loaded with the global weights that were
    sent; `update` is (returned weights - sent weights) for every parameter and buffer.
    The hyper-parameters are those the server sent (threat model 1 in DESIGN.md), with
    `local_steps` the steps the client reported taking. Images live in [0, 1] with shape
    `input_shape` (C, H, W). `known_labels` is empty unless the attack asked for the
    stronger threat model in which the server also knows the client's labels (`labels: known`).
    `start` optionally fixes where an image-space attack begins: images (n, C, H, W) in [0, 1]
    used as its first restart (the other restarts stay random); None: every restart random.
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
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    proximal_mu: float = 0.0  # FedProx's proximal term, sent with the other settings
    start: torch.Tensor | None = None

    def parameter_update(self) -> list[torch.Tensor]:
        """The update restricted to trainable parameters, in `model.parameters()` order."""
        return [self.update[name] for name, _ in self.model.named_parameters()]

    def single_step_gradient(self) -> list[torch.Tensor]:
        """The gradient of the one SGD step that produced the update: -update / lr.

        Exact when the client took one plain SGD step; an approximation otherwise.
        """
        return [-u / self.lr for u in self.parameter_update()]


@dataclass(frozen=True)
class ModelTarget:
    """What a model holder has (threat model 3): the final global model and public data.

    `model` is the trained global model (white-box; a black-box attack must only call it);
    `public_x`/`public_y` are auxiliary examples of classes other than `target_classes`.
    """

    model: nn.Module
    input_shape: tuple[int, ...]
    num_classes: int
    target_classes: list[int]
    public_x: torch.Tensor
    public_y: torch.Tensor


@dataclass(frozen=True)
class AuxiliaryData:
    """What the honest-but-curious server holds besides the updates: a gradient attack's
    `prepare` gets it to learn a prior once per run (e.g. a GAN, `fedsim.attacks.generator`).

    `test_x`/`test_y` is the global test set the server evaluates on (the federation's
    classes, examples no client trains on); `public_x`/`public_y` the public classes
    (`data.public_classes`, never in the federation; empty when none). `seed` is derived from
    the scenario seed and equal for every attack of a run, so attacks that learn the same
    prior from the same data share one cached copy.
    """

    test_x: torch.Tensor
    test_y: torch.Tensor
    public_x: torch.Tensor
    public_y: torch.Tensor
    seed: int


@dataclass
class Reconstruction:
    """An attack's output: images in [0, 1] (B, C, H, W), labels (B,), and its own loss."""

    images: torch.Tensor
    labels: torch.Tensor
    attack_loss: float
    details: dict[str, Any] = field(default_factory=dict)


IterationCallback = Callable[[int, int], None]
"""`on_iteration(done, total)`: an attack finished `done` of the `total` iterations of its work."""

TargetT = TypeVar("TargetT", GradientTarget, ModelTarget)
GivenT = TypeVar("GivenT", AuxiliaryData, ModelTarget)


class Attack(ABC):
    """Base of every attack; subclass `GradientAttack`, `ModelAttack` or
    `fedsim.core.membership.MembershipAttack`, not this class.

    `threat_model` states what the attacker is granted (a class attribute, or a property
    when it depends on the params). `registered_name` is set by `ATTACKS.register`: the
    name the attack runs and reports under.
    """

    threat_model: ClassVar[str]
    registered_name: ClassVar[str | None] = None
    Params: ClassVar[type[BaseModel]]
    needs_classes: ClassVar[bool] = False
    """True for an attack that needs class labels (recovers them, per-class data, or scores a
    class probability): no regression task."""

    def __init__(self, params: BaseModel, seed: int = 0) -> None:
        self.params = params
        self.seed = seed

    @classmethod
    def check_scenario(cls, params: BaseModel, scenario: Any) -> None:
        """Raise ValueError if the attack cannot work in `scenario` (a `Scenario`, which this
        module cannot import: the config imports it through the registry). Called when the
        scenario is validated, so a bad combination fails before training; default: it can."""

    @property
    def name(self) -> str:
        """The registered name, or the class name of an attack used without the registry."""
        return self.registered_name or type(self).__name__


class ReconstructionAttack(Attack, Generic[TargetT, GivenT]):
    """An attack that reconstructs private data: the base of `GradientAttack` and `ModelAttack`.

    `on_iteration` is set by whoever shows progress (the runner's bar; None: nobody): an
    attack that iterates calls `report_iteration` after each iteration of its optimisation.
    """

    on_iteration: IterationCallback | None = None

    def report_iteration(self, done: int, total: int) -> None:
        """Tell `on_iteration`, if set, that `done` of `total` iterations are finished."""
        if self.on_iteration is not None:
            self.on_iteration(done, total)

    def prepare(self, given: GivenT, workspace: Path, console: Console) -> None:
        """Learn what the attack needs once, before any `reconstruct` (e.g. a GAN on the
        public data), caching it under `workspace` (per run); default: nothing. A gradient
        attack is given the server's `AuxiliaryData`, a model attack its `ModelTarget`."""

    @abstractmethod
    def reconstruct(self, target: TargetT) -> Reconstruction:
        """Reconstruct private data from what the threat model grants."""

    def reconstruct_many(self, targets: list[TargetT]) -> list[Reconstruction]:
        """Reconstruct several targets; attacks that vectorise over targets override this."""
        return [self.reconstruct(target) for target in targets]

    @property
    def wants_known_labels(self) -> bool:
        """True when the attack's params ask for the stronger threat model `labels: known`:
        only then does the runner put the client's true labels in `GradientTarget.known_labels`."""
        return getattr(self.params, "labels", None) == "known"


class GradientAttack(ReconstructionAttack[GradientTarget, AuxiliaryData]):
    """An attack on one observed client update (threat models 1 and 2: the curious server)."""

    @abstractmethod
    def reconstruct(self, target: GradientTarget) -> Reconstruction:
        """Reconstruct the client's training examples from its update."""


class ModelAttack(ReconstructionAttack[ModelTarget, ModelTarget]):
    """An attack on the final global model plus public data (threat model 3: a model holder)."""

    needs_classes = True

    @abstractmethod
    def reconstruct(self, target: ModelTarget) -> Reconstruction:
        """Reconstruct representatives of the private classes the target names."""


def from_gradient(
    model: nn.Module,
    gradient: list[Tensor],
    batch_size: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    lr: float = 1.0,
    *,
    client: int | None = None,
    known_labels: Tensor | None = None,
    start: Tensor | None = None,
) -> GradientTarget:
    """The target of one SGD step of size `lr` that had `gradient` (in parameter order) on
    `batch_size` images of `input_shape`; the model is copied, never changed.

    `client` is the target's identity, which seeds an attack's random starts and label
    inference (with the attack's seed); None derives it from the gradient's values, so
    different gradients start differently and the same gradient repeats. `known_labels`
    (batch_size,) are the client's labels, used by attacks with `labels: known`. `start`
    (batch_size, C, H, W) in [0, 1] is where image-space gradient attacks begin their first
    restart (see `GradientTarget.start`).
    """
    named = [name for name, _ in model.named_parameters()]
    update = {name: -lr * g.detach() for name, g in zip(named, gradient, strict=True)}
    update |= {name: torch.zeros_like(b) for name, b in model.named_buffers() if b.is_floating_point()}
    return GradientTarget(
        model=copy.deepcopy(model),
        update=update,
        num_examples=batch_size,
        lr=lr,
        local_steps=1,
        batch_size=batch_size,
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        server_round=1,
        client=gradient_identity(gradient) if client is None else client,
        known_labels=known_labels,
        start=start,
    )


def gradient_identity(gradient: list[Tensor]) -> int:
    """A stable non-negative int from the gradient's values (31 bits of their SHA-256)."""
    digest = hashlib.sha256()
    for g in gradient:
        digest.update(g.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest()[:4], "little") >> 1
