"""The three points where a defense can act, as small abstract hooks.

A defense is one class registered in `fedsim.core.registry.DEFENSES` that subclasses exactly one of:

- `TrainTimeDefense`: changes a client's local training (DP-SGD, MID's loss, ...);
- `UpdateTimeDefense`: transforms the update a client sends (pruning, noise, quantisation);
- `ServerTimeDefense`: changes aggregation by wrapping the Flower strategy (central DP, ...).

Defenses are built once per process from their validated `Params`; whatever must survive
between rounds of one client (an accountant's history) goes through the JSON-able `state`
dict the client keeps in Flower's `Context.state`.

Any defense may also return a Flower client mod from `client_mod` (the client half of
client-side central DP, ...). fedsim's ClientApp runs the mods of the scenario's defenses, in
scenario order, around its train handler, i.e. after every update-time `transform`; a scenario
without such a defense runs no mod at all. A defense that acts only through its mod (Flower's
`LocalDpMod`) subclasses `Defense` itself and names its `stage`.

A defense with a client-side protocol of its own (SecAgg+) provides its mod from the class
method `transport_mod` instead. Mods come in two layers, outermost first: every registered
defense class's transport mod (the protocol's messages need not carry the scenario, so it is
installed whether or not the scenario names the defense, and must pass every message it does
not recognise through untouched), then the scenario's `client_mod`s. A transport mod thus sees
the reply last, after every other mod (SecAgg+ masks what the others produced).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel
from torch import nn
from torch.utils.data import DataLoader

if TYPE_CHECKING:  # Flower in annotations only: validating a defense's Params needs no Flower
    from flwr.clientapp.typing import Mod
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy

    from fedsim.core.config import Scenario

Stage = Literal["train", "update", "server"]
Level = Literal["example", "client"]
Relation = Literal["add/remove", "replace-one", "zero-out"]


@dataclass(frozen=True)
class PrivacyUnit:
    """What one reported epsilon protects, so no figure is read without its unit.

    A mechanism is (epsilon, delta)-DP at `level` (one training example of a client, or one
    whole client) under `relation`: datasets that differ by adding/removing one unit,
    replacing one unit, or zeroing one unit out (the unit's contribution set to zero, the
    count unchanged). `metric` names the metric key whose value the guarantee is
    (a client metric such as "epsilon", or a server-time defense's round metric).
    `accountant` names the sound accountant that produced it; `not_covered` says in words
    what leaves the party outside this epsilon (empty when nothing does).
    """

    level: Level
    relation: Relation
    delta: float
    accountant: str
    metric: str = "epsilon"
    not_covered: str = ""

    def label(self) -> str:
        """A short human label, e.g. 'example-level, add/remove, delta=1e-05 (prv)'."""
        return f"{self.level}-level, {self.relation}, delta={self.delta:g} ({self.accountant})"

    def with_clear_text_metrics(self) -> PrivacyUnit:
        """This unit when `training.clear_text_metrics` sends the client's plain metrics too."""
        sent = "train-loss, defense statistics (mid_kl) and num-examples, sent in clear"
        return replace(self, not_covered="; ".join(filter(None, [self.not_covered, sent])))


@dataclass(frozen=True)
class LocalTraining:
    """What a train-time defense may need to know about the local training it changes."""

    num_examples: int
    batch_size: int
    local_epochs: int
    local_steps: int | None
    total_rounds: int
    server_round: int
    seed: int  # private to this client and round (from the node's secret)
    # flat indices into the parameters (`model.parameters()` order) of the Dirac gradient
    # canaries this client trains with (`data.canaries.kind: gradient`); a defense with
    # `takes_gradient_canaries` adds them
    gradient_canaries: tuple[int, ...] = ()


class Defense(ABC):
    """Base of every defense; `stage` says where it acts."""

    stage: ClassVar[Stage]
    Params: ClassVar[type[BaseModel]]

    def __init__(self, params: BaseModel) -> None:
        self.params = params

    @classmethod
    def check_scenario(cls, params: BaseModel, scenario: Scenario) -> None:
        """Raise ValueError if the defense cannot work in `scenario`. Called when the scenario
        is validated, so a bad combination fails before a run starts; default: it can."""

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Change the architecture every party builds (server, clients, attackers); default: none."""
        return model

    def client_mod(self) -> Mod | None:
        """A Flower client mod to run around the client's train handler; default: none."""
        return None

    @classmethod
    def transport_mod(cls) -> Mod | None:
        """A Flower client mod for this defense's own protocol, outside every `client_mod`
        (see the module docstring); default: none."""
        return None

    def privacy_unit(self) -> PrivacyUnit | None:
        """The unit of the epsilon this defense reports; None if it reports none (default)."""
        return None


class TrainTimeDefense(Defense):
    """Changes local training: gets the model, optimizer and loader before the first step."""

    stage: ClassVar[Stage] = "train"
    takes_gradient_canaries: ClassVar[bool] = False  # adds `LocalTraining.gradient_canaries`

    @abstractmethod
    def prepare(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader,
        training: LocalTraining,
        state: dict[str, Any],
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        """Return the (possibly wrapped) model, optimizer and loader to train with."""

    def criterion(self, loss_fn: nn.Module) -> Callable[[Any, torch.Tensor], Any]:
        """The task loss to train with, given the plain one (an `nn.CrossEntropyLoss`).

        Default: unchanged. Called after `prepare`. Opacus's ghost clipping needs it: its loss
        wrapper runs both of its backward passes inside `loss.backward()`.
        """
        return loss_fn

    def loss(self, model: nn.Module, output: Any, target: torch.Tensor) -> torch.Tensor | None:
        """An extra loss term added to the task loss, or None (the default)."""
        return None

    def finish(self, state: dict[str, Any]) -> dict[str, float]:
        """Called after local training; updates `state` and returns metrics to report."""
        return {}

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain model inside whatever `prepare` wrapped it in."""
        return model

    def vectorized_refusal(self) -> str | None:
        """Why an engine that trains a cohort as one computation cannot run this defense
        (None: it can, through `private_steps` or `batched_loss`). Default: the defense acts
        inside the inline training loop (its `prepare`, `loss` and `finish`), so that engine
        trains inline."""
        return f"{type(self).__name__} acts inside the inline training loop"

    def batched_loss(self, model: nn.Module, generator: torch.Generator) -> BatchedLoss | None:
        """This client's extra loss term for an engine that trains without `prepare` (the
        vectorised one), its noise drawn from the client's batch `generator` as `prepare`
        draws it, before the batches; None (the default): the defense adds no loss there."""
        return None

    def private_steps(
        self, training: LocalTraining, generator: torch.Generator, device: torch.device
    ) -> PrivateSteps | None:
        """This client's DP-SGD steps for an engine that trains without `prepare` (the
        vectorised one), drawn from the client's batch `generator` as `prepare`'s loader would
        draw them; None (the default): the steps are the plain ones."""
        return None


@dataclass(frozen=True)
class PrivateSteps:
    """DP-SGD's local steps as a batched engine runs them, without Opacus.

    Step s trains on the example indices `batches[s]` (Poisson-sampled); each example's
    gradient is clipped to norm `max_grad_norm`, the clipped sum gets Gaussian noise of std
    `noise_multiplier * max_grad_norm` drawn from `noise` (the client's secret stream, one
    `torch.normal` per parameter tensor, in `parameters()` order), and is divided by
    `expected_batch_size`. `record(state)` accounts the steps in the client's `state` once
    they ran and returns what `finish` reports (the epsilon so far).
    """

    batches: list[torch.Tensor]
    max_grad_norm: float
    noise_multiplier: float
    expected_batch_size: int
    noise: torch.Generator
    record: Callable[[dict[str, Any]], dict[str, float]]


@dataclass(frozen=True)
class BatchedLoss:
    """A train-time defense's loss term as a batched engine runs it (MID's KL), without Opacus
    or `prepare`.

    For each of its steps, in order, a client draws the noise its model's stochastic layers
    use with `draw(batch_size)` (the stream the inline forward draws from). The engine hands a
    step's noise to the model with `inject(model, noise)` before that step's forward (and
    `inject(model, None)` after), adds `weight * term(model)` (one value per example, weighted
    like the task loss) to the loss, and reports `metrics(step_means)`, from the batch mean of
    `term` at each step, as the inline `finish` would.
    """

    draw: Callable[[int], torch.Tensor]
    inject: Callable[[nn.Module, torch.Tensor | None], None]
    term: Callable[[nn.Module], torch.Tensor]
    weight: float
    metrics: Callable[[list[float]], dict[str, float]]


class UpdateTimeDefense(Defense):
    """Transforms the update (local weights minus global weights) a client sends."""

    stage: ClassVar[Stage] = "update"

    @abstractmethod
    def transform(
        self, update: dict[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Return the defended update; `generator` is the only source of randomness."""


class ServerTimeDefense(Defense):
    """Changes aggregation by wrapping the strategy."""

    stage: ClassVar[Stage] = "server"

    @abstractmethod
    def wrap(self, strategy: Strategy, cohort_size: int, total_rounds: int) -> Strategy:
        """Return a strategy that aggregates with this defense."""

    def transport(self, grid: Grid, scenario: Scenario) -> Grid:
        """The Grid the server reaches the clients through; default: `grid` unchanged.

        It sits below the observer, so what it hides from the strategy (secure aggregation:
        every individual update) is never recorded either.
        """
        return grid

    def round_metrics(self, server_round: int) -> dict[str, float]:
        """Privacy metrics after `server_round` (e.g. the central-DP epsilon)."""
        return {}


def build_defenses(specs: list[Any]) -> list[Defense]:
    """Instantiate the scenario's defense specs (name + validated params) in order."""
    from fedsim.core.registry import DEFENSES

    return [DEFENSES.get(spec.name)(spec.params) for spec in specs]
