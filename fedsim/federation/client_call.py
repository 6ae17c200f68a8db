"""What a client builds per scenario, and the hook for client actions of plugins' own.

`ClientSetup`/`client_setup` is everything a client process builds once per scenario (data,
device, defenses) and reuses for every message. A strategy or defense whose clients must do
something other than fedsim's local training (DIFF2's private gradient release) registers a
`ClientAction` in `fedsim.core.registry.CLIENT_ACTIONS`:

    @CLIENT_ACTIONS.register("diff2")
    def release(content: RecordDict, call: ClientCall) -> RecordDict: ...

and its server sends `Message(content, dst_node_id=..., message_type="train.diff2")` with the
scenario and the round in the message's config record (as every fedsim train message carries
them: `fedsim.scenario`, `server-round`). fedsim's ClientApp routes each such message to the
action with a `ClientCall` and replies with the content it returns. Actions run without the
defenses' client mods (SecAgg+, client-side central DP): their reply is theirs alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import yaml
from flwr.app import ConfigRecord, RecordDict
from flwr.clientapp.typing import Mod

from fedsim.core.config import Scenario, build_scenario
from fedsim.core.defense import Defense, TrainTimeDefense, UpdateTimeDefense, build_defenses
from fedsim.core.device import resolve_device, set_threads
from fedsim.core.seeding import torch_generator
from fedsim.data.datasets import FederatedData, TensorData, federated_data
from fedsim.models import federated_model


@dataclass
class ClientSetup:
    """Everything a client process builds once per scenario and reuses for every call."""

    scenario: Scenario
    data: FederatedData
    device: torch.device
    train_defenses: list[TrainTimeDefense]
    update_defenses: list[UpdateTimeDefense]
    client_mods: list[Mod]
    accounted_metrics: frozenset[str] | None
    """The metric keys a client-side DP epsilon covers; None when no such defense runs."""

    def new_model(self) -> torch.nn.Module:
        return federated_model(self.scenario, self.data.input_shape, self.data.num_classes)


@lru_cache(maxsize=4)
def client_setup(scenario_yaml: str) -> ClientSetup:
    scenario = build_scenario(yaml.safe_load(scenario_yaml))
    set_threads(scenario.simulation.torch_threads)
    defenses = build_defenses(scenario.defenses)
    return ClientSetup(
        scenario=scenario,
        data=federated_data(scenario.data, scenario.seed),
        device=resolve_device(scenario.simulation.device),
        train_defenses=[d for d in defenses if isinstance(d, TrainTimeDefense)],
        update_defenses=[d for d in defenses if isinstance(d, UpdateTimeDefense)],
        client_mods=[mod for d in defenses if (mod := d.client_mod()) is not None],
        accounted_metrics=_client_side_dp_metrics(defenses),
    )


def hides_example_counts(scenario: Scenario) -> bool:
    """True when replies carry a placeholder count (`num-examples` = 1, see `dp_reply_metrics`):
    a client-side DP defense runs and `training.clear_text_metrics` is off."""
    accounted = _client_side_dp_metrics(build_defenses(scenario.defenses))
    return accounted is not None and not scenario.training.clear_text_metrics


def _client_side_dp_metrics(defenses: list[Defense]) -> frozenset[str] | None:
    """The epsilon keys of the client-side DP defenses (train/update time: dp_sgd, local_dp);
    None if there is none. Server-time defenses (central DP) trust the server with metrics."""
    units = [u for d in defenses if d.stage != "server" and (u := d.privacy_unit()) is not None]
    return frozenset(u.metric for u in units) if units else None


PUBLIC_METRICS = frozenset({"unit-weight", "partition-id", "local-steps"})
"""Bookkeeping a reply may carry under DP: fixed by the server's plan, not by the data."""


def dp_reply_metrics(
    metrics: dict[str, Any], accounted: frozenset[str] | None, clear_text: bool
) -> dict[str, Any]:
    """What a client may send beside its private release.

    Under client-side DP (`accounted` not None) only the accounted epsilons and public
    bookkeeping leave: the mean loss of a private batch (train-loss), a defense's batch
    statistic (mid_kl) and the true example count (which tells add/remove neighbours apart)
    are outside every epsilon, so they are dropped and `num-examples` becomes 1 (FedAvg then
    weighs clients uniformly). `training.clear_text_metrics` keeps them; the privacy record
    then says the epsilon does not cover them (`PrivacyUnit.with_clear_text_metrics`).
    """
    if accounted is None or clear_text:
        return metrics
    kept = {k: v for k, v in metrics.items() if k in accounted or k in PUBLIC_METRICS}
    return {**kept, "num-examples": 1}


@dataclass(frozen=True)
class ClientCall:
    """One train message as a client action sees it."""

    setup: ClientSetup  # .scenario (public scenario), .data (FederatedData), .device, .new_model()
    partition_id: int
    secret: int  # the node's secret seed (never sent): the root of every client-side draw
    server_round: int
    config: ConfigRecord  # the message's config record
    state: RecordDict  # Flower's context.state: persists on this node across rounds

    def train_data(self) -> TensorData:
        """This node's training partition."""
        return self.setup.data.client(self.partition_id)[0]

    def generator(self, purpose: str) -> torch.Generator:
        """A generator private to this node, `purpose` and round (see `fedsim.core.seeding`)."""
        return torch_generator(self.secret, purpose, self.server_round)

    def private_metrics(self, metrics: dict[str, Any], accounted: frozenset[str]) -> dict[str, Any]:
        """`metrics` as a DP release may send them: the `accounted` epsilons and public
        bookkeeping only, unless the scenario sends clear-text metrics (`dp_reply_metrics`)."""
        return dp_reply_metrics(metrics, accounted, self.setup.scenario.training.clear_text_metrics)


ClientAction = Callable[[RecordDict, ClientCall], RecordDict]
"""A client-side handler of `train.<name>` messages: message content -> reply content."""
