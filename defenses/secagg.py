"""Secure aggregation with Flower's SecAgg+: the server learns only each round's aggregate.

SecAgg+ (Bell et al. 2020; Flower's `SecAggPlusWorkflow` + `secaggplus_mod`): each client
quantises its weights, scaled by its share r = num_examples / max_weight, to integers in
[0, quantization_range), adds a private mask and pairwise masks agreed with its neighbours
(num_shares of them; Shamir shares of the mask seeds let the server remove the masks of
dropped clients once reconstruction_threshold neighbours answer) and sends the result modulo
modulus_range. The masks cancel in the sum, so the server recovers sum_k r_k w_k / sum_k r_k,
the example-weighted average of the cohort's weights (FedAvg's aggregate), and nothing else.

How fedsim runs it: `transport` puts a `SecAggPlusGrid` under the observer. A round's train
messages, as the strategy built them, go through Flower's workflow (four exchanges with the
clients), and the strategy gets back one reply holding the aggregate, with num-examples the
cohort's total. The strategy is unchanged: FedAvg, FedProx, FedAdam and FedAvgM all average
their replies by num-examples (one reply: the aggregate itself) and then apply their own server
update, exactly as they would to the individual replies. The clients' scalar metrics (example
counts, losses, DP-SGD epsilons) travel in the clear in Flower's protocol and are reported.

Error: quantisation rounds each client's r_k w_k stochastically to a grid of step
2*clipping_range/quantization_range, and r_k to a grid of step 1/quantization_range, so each
aggregated weight is within K * (step + spread / quantization_range) / sum_k r_k of the exact
average (K clients, spread = the largest distance of a client's weight from the average);
tests/test_secagg.py checks this bound.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from flwr.app import (
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import Mod
from flwr.common import FitIns, FitRes, parameters_to_ndarrays
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server import LegacyContext
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from pydantic import BaseModel, ConfigDict, Field

from fedsim.federation.protocol import AGGREGATE_KEY, TRUTH_KEY
from fedsim.core.config import Scenario
from fedsim.core.defense import ServerTimeDefense
from fedsim.core.errors import UserError
from fedsim.federation.grid_view import GridView
from fedsim.core.registry import DEFENSES
from fedsim.federation.secure_aggregation import named_arrays, secaggplus_when_requested, to_fitins
from fedsim.core.seeding import derive_seed

AVERAGING_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedavgm")
"""Strategies that aggregate by FedAvg's example-weighted average: what SecAgg+ computes."""


@DEFENSES.register("secagg_plus")
class SecAggPlus(ServerTimeDefense):
    """Secure aggregation (Flower's SecAgg+): the server sees only each round's aggregate."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        num_shares: int | float = Field(
            3, gt=0, description="neighbours each client secret-shares with (a float: fraction of the cohort)"
        )
        reconstruction_threshold: int | float = Field(
            2, gt=0, description="shares needed to unmask a client (a float: fraction of num_shares)"
        )
        max_weight: float = Field(
            1000.0, gt=0, description="largest example count of a client (its weight share is n/max_weight)"
        )
        clipping_range: float = Field(
            8.0, gt=0, description="weights times their share are clipped to +-clipping_range before quantising"
        )
        quantization_range: int = Field(2**22, gt=0, description="integer levels of the quantiser")
        modulus_range: int = Field(2**32, gt=0, description="masking modulus (a power of 2 above quantization_range)")
        timeout: float | None = Field(None, gt=0, description="seconds to wait for each stage's replies (None: all)")

    params: Params

    @classmethod
    def transport_mod(cls) -> Mod:
        """Flower's SecAgg+ client mod for SecAgg+ messages (any other passes untouched)."""
        return secaggplus_when_requested

    def wrap(self, strategy: Strategy, cohort_size: int, total_rounds: int) -> Strategy:
        """Unchanged: the aggregation happens in `transport`; the strategy averages its one reply."""
        return strategy

    @classmethod
    def check_scenario(cls, params: Params, scenario: Scenario) -> None:
        """Refuse what SecAgg+ cannot protect, when the scenario is validated."""
        strategy = scenario.federation.strategy.name
        if strategy not in AVERAGING_STRATEGIES:
            raise ValueError(
                f"defenses.secagg_plus: strategy '{strategy}' does not aggregate by FedAvg's "
                f"weighted average; use one of {', '.join(AVERAGING_STRATEGIES)}"
            )
        others = [d.name for d in scenario.defenses if d.name != "secagg_plus" and DEFENSES.get(d.name).stage == "server"]
        if others:
            raise ValueError(
                f"defenses.secagg_plus cannot be combined with {', '.join(others)}: server-time "
                "defenses need each client's update, which secure aggregation hides"
            )
        if scenario.cohort_size < 2:
            raise ValueError("defenses.secagg_plus needs at least 2 clients per round (federation.clients_per_round)")
        threshold = params.reconstruction_threshold
        if isinstance(threshold, int) and threshold > scenario.cohort_size:
            raise ValueError(
                f"defenses.secagg_plus.reconstruction_threshold={threshold} exceeds the "
                f"{scenario.cohort_size} clients per round"
            )

    def transport(self, grid: Grid, scenario: Scenario) -> Grid:
        """A grid that runs every train round through SecAgg+."""
        try:
            workflow = SecAggPlusWorkflow(**self.params.model_dump())
        except (TypeError, ValueError) as err:
            raise UserError(f"defenses.secagg_plus: {err}") from None
        return SecAggPlusGrid(grid, workflow, scenario.seed)


class SecAggPlusGrid(GridView):
    """A Grid on which a round's train messages run through SecAgg+ and yield one aggregate reply.

    Every other message (partition discovery, evaluation) passes through unchanged.
    """

    def __init__(self, inner: Grid, workflow: SecAggPlusWorkflow, seed: int) -> None:
        super().__init__(inner)
        self.workflow = workflow
        self.seed = seed

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return self.inner.send_and_receive(messages, timeout=timeout)
        return [self._secure_round(messages)]

    def _secure_round(self, messages: list[Message]) -> Message:
        """Run Flower's workflow for one round's train messages; the aggregate as one reply."""
        sent = messages[0].content
        server_round = int(sent["config"]["server-round"])
        round_ = SecureRound(self.inner, messages, derive_seed(self.seed, "secagg-rounding", server_round))
        context = LegacyContext(
            Context(run_id=self.run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config={}),
            strategy=round_,  # type: ignore[arg-type]  # the two calls the workflow makes
        )
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
        context.state.array_records[MAIN_PARAMS_RECORD] = sent["arrays"]
        self.workflow(round_, context)
        if round_.results is None:
            raise RuntimeError(
                f"SecAgg+ halted in round {server_round} (see Flower's log): fewer clients "
                "answered than defenses.secagg_plus.reconstruction_threshold needs"
            )
        return round_.reply(sent)


class SecureRound(GridView):
    """One round of SecAgg+: the grid the workflow talks through and its legacy strategy.

    As a grid it fails on any client error (as the observer would) and keeps the
    simulation-only ground-truth record of each reply away from Flower's server code. As a
    strategy it provides the two calls `SecAggPlusWorkflow` makes: `configure_fit` (the
    round's train messages as FitIns) and `aggregate_fit` (receives the unmasked aggregate).
    """

    def __init__(self, inner: Grid, messages: list[Message], rounding_seed: int) -> None:
        super().__init__(inner)
        self.messages = messages
        self.rounding_seed = rounding_seed
        self.truth: dict[int, list[list[int]]] = {}
        self.results: list[tuple[ClientProxy, FitRes]] | None = None

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"client node {reply.metadata.src_node_id} failed in SecAgg+: {reply.error.reason}")
            truth = reply.content.pop(TRUTH_KEY, None)
            if truth is not None:
                self.truth[reply.metadata.src_node_id] = json.loads(truth["batches"])
        return replies

    def configure_fit(
        self, server_round: int, parameters: Any, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Each train message as the FitIns the workflow sends in its masking stage."""
        return [
            (
                GridClientProxy(m.metadata.dst_node_id, self.inner, self.run.run_id),
                to_fitins(m.content, self.rounding_seed),
            )
            for m in self.messages
        ]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[None, dict[str, Any]]:
        """Keep the results: every FitRes now carries the unmasked aggregate as its parameters."""
        self.results = results
        return None, {}

    def reply(self, sent: RecordDict) -> Message:
        """The strategy's one train reply: the aggregate, with the cohort's total example count."""
        fitres = [f for _, f in self.results]
        aggregate = parameters_to_ndarrays(fitres[0].parameters)
        arrays = sent["arrays"]
        metrics = sorted((dict(f.metrics) for f in fitres), key=lambda m: m["partition-id"])
        truth = {
            int(f.metrics["partition-id"]): self.truth[proxy.node_id]
            for proxy, f in self.results
            if proxy.node_id in self.truth
        }
        content = RecordDict(
            {
                "arrays": named_arrays(list(arrays.keys()), aggregate, like=arrays),
                "metrics": MetricRecord({"num-examples": sum(f.num_examples for f in fitres)}),
                AGGREGATE_KEY: ConfigRecord({"clients": json.dumps(metrics)}),
                TRUTH_KEY: ConfigRecord({"clients": json.dumps(truth)}),
            }
        )
        return Message(content, reply_to=self.messages[0])
