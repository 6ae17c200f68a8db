"""`simulation.engine: vectorized`: a Grid that trains a round's cohort as one computation.

It wraps the inline engine's Grid (`InlineGrid`: node contexts, the ClientApp) and takes the
train messages the strategy sends together and trains them as one shard
(`fedsim.federation.cohort.plan.train_shard`: chunks of at most `max_clients_per_batch`, or
what fits the GPU, each one `fedsim.federation.cohort.executor.train_cohort`), and every client gets the
ordinary reply the ClientApp would give (`fedsim.federation.client.train_reply`: update-time
defenses, metrics, truth record), so the observer, strategies and attacks see what they see
under the inline engine. Each client's batches still come from its own secret generator.
Everything else (queries, evaluation, client actions, scenarios it cannot vectorise) goes to
the inline Grid, with a one-line notice naming why. A train-time defense runs here only
through its `private_steps` (DP-SGD: Poisson batches, per-example clipping, noise from the
client's secret generator, the same accountant history in the node's state); any other, or
more than one, trains inline. With `simulation.ray_workers` the cohort is split into one shard
per Ray actor (`fedsim.federation.cohort.ray_workers`); the replies are built here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from functools import lru_cache
from uuid import uuid4

import torch
from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedsim.core.seeding import node_secret
from fedsim.federation.client import defense_state, partition_id, store_defense_state, train_reply
from fedsim.federation.client_call import ClientSetup, client_setup
from fedsim.federation.cohort.executor import CohortResult
from fedsim.federation.cohort.plan import CohortPlan, ShardRequest, plan_cohort, train_shard
from fedsim.federation.cohort.ray_workers import RayCohortWorkers
from fedsim.federation.grid_view import GridView
from fedsim.federation.protocol import SCENARIO_KEY
from fedsim.federation.training import LocalHyperParams, LocalResult

log = logging.getLogger("fedsim")


@lru_cache(maxsize=8)
def fallback_reason(scenario_yaml: str) -> str | None:
    """Why this scenario's local training cannot be vectorised (None: it can)."""
    setup = client_setup(scenario_yaml)
    scenario = setup.scenario
    if len(setup.train_defenses) > 1:
        names = ", ".join(type(d).__name__ for d in setup.train_defenses)
        return f"train-time defenses ({names}) compose only in the inline training loop"
    for defense in setup.train_defenses:
        if (refusal := defense.vectorized_refusal()) is not None:
            return refusal
    if setup.train_defenses and setup.data.canaries is not None and setup.data.canaries.kind == "gradient":
        return "white-box gradient canaries are added inside Opacus's optimizer"
    if setup.client_mods:
        return "the scenario's defenses run Flower client mods around each client"
    if any(d.name == "secagg_plus" for d in scenario.defenses):
        return "SecAgg+ runs its own per-client protocol"
    if scenario.faults.rate > 0:
        return "faults are injected per client call"
    model = setup.new_model()
    if list(model.buffers()):
        return f"model '{scenario.model.name}' keeps buffers (e.g. batch-norm statistics)"
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return f"model '{scenario.model.name}' draws dropout noise"
    plain = ("torch.", "fedsim.models.classical", *(type(d).__module__ for d in setup.train_defenses))
    if not all(type(m).__module__.startswith(plain) for m in model.modules()):
        return f"model '{scenario.model.name}' is not a plain torch model"
    return None


def broadcast_starts(messages: list[Message]) -> list[dict[str, torch.Tensor]]:
    """Each message's start parameters. A strategy broadcasts one ArrayRecord to the cohort:
    it is decoded once, and the clients share the (read-only) tensors, which Ray then also
    serialises once per shard."""
    decoded: dict[int, dict[str, torch.Tensor]] = {}
    for message in messages:
        record = message.content["arrays"]
        if id(record) not in decoded:
            decoded[id(record)] = record.to_torch_state_dict()
    return [decoded[id(m.content["arrays"])] for m in messages]


class VectorizedGrid(GridView):
    """Trains the train messages of one push together; forwards everything else.

    Each push's cohort is one shard (trained in memory-bounded chunks, `train_shard`), or with
    `workers` (Ray actors, `simulation.ray_workers`) one shard per worker, trained concurrently
    there, each worker bounding its own chunks."""

    def __init__(self, inner: Grid, workers: RayCohortWorkers | None = None) -> None:
        super().__init__(inner)
        self.workers = workers
        self.replies: dict[str, Message] = {}
        self._noticed: set[str] = set()

    def _vectorisable(self, message: Message) -> bool:
        if message.metadata.message_type != MessageType.TRAIN:
            return False
        config = message.content.config_records.get("config")
        if config is None or SCENARIO_KEY not in config:
            return False
        reason = fallback_reason(str(config[SCENARIO_KEY]))
        if reason is not None and reason not in self._noticed:
            self._noticed.add(reason)
            log.warning("engine vectorized: local training runs inline: %s", reason)
        return reason is None

    def push_messages(self, messages: Iterable[Message], timeout: float | None = None) -> Iterable[str]:
        ids, batch = [], []
        for message in messages:
            if self._vectorisable(message):
                message_id = str(uuid4())
                message.metadata.__dict__["_message_id"] = message_id
                batch.append(message)
                ids.append(message_id)
            else:
                ids.extend(self.inner.push_messages([message], timeout))
        groups: dict[tuple[str, str], list[Message]] = {}
        for message in batch:
            config = message.content["config"]
            hp = LocalHyperParams.from_config(config)
            groups.setdefault((str(config[SCENARIO_KEY]), repr(hp)), []).append(message)
        for (scenario_yaml, _), group in groups.items():
            shards = 1 if self.workers is None else len(self.workers.actors)
            size = math.ceil(len(group) / shards)
            chunks = [group[start : start + size] for start in range(0, len(group), size)]
            self._train(scenario_yaml, client_setup(scenario_yaml), chunks)
        return ids

    def _train(self, scenario_yaml: str, setup: ClientSetup, chunks: list[list[Message]]) -> None:
        requests = [self._request(chunk) for chunk in chunks]
        if self.workers is None:
            for chunk, request in zip(chunks, requests):
                self._reply(setup, chunk, request, *train_shard(setup, request))
            return
        plans = [plan_cohort(setup, setup.new_model(), request) for request in requests]  # checks data first
        for chunk, request, plan, done in zip(chunks, requests, plans, self.workers.train(scenario_yaml, requests)):
            self._reply(setup, chunk, request, plan, done)

    def _request(self, messages: list[Message]) -> ShardRequest:
        contexts = [self.inner.contexts[m.metadata.dst_node_id] for m in messages]
        config = messages[0].content["config"]
        return ShardRequest(
            pids=[partition_id(c) for c in contexts],
            secrets=[node_secret(c) for c in contexts],
            starts=broadcast_starts(messages),
            hp=LocalHyperParams.from_config(config),
            server_round=int(config["server-round"]),
        )

    def _reply(
        self, setup: ClientSetup, messages: list[Message], request: ShardRequest, plan: CohortPlan, done: CohortResult
    ) -> None:
        """Each client's ordinary train reply, its DP-SGD steps accounted in its node state."""
        for c, message in enumerate(messages):
            context = self.inner.contexts[message.metadata.dst_node_id]
            start, schedule = request.starts[c], plan.schedules[c]
            trained = {**start, **done.client_params(c)}  # the model's order: no buffers (fallback_reason)
            metrics: dict[str, float] = {}
            if plan.private is not None:
                state = defense_state(context, 0)
                metrics = plan.private[c].record(state)
                store_defense_state(context, 0, state)
            if plan.extra is not None:
                metrics = plan.extra[c].metrics(done.term_means[c])
            result = LocalResult(
                num_examples=len(plan.datas[c]),
                steps=len(schedule),
                mean_loss=done.mean_losses[c],
                metrics=metrics,
                batches=[b.tolist() for b in schedule],
            )
            self.replies[message.metadata.message_id] = train_reply(
                message, setup, trained, start, result, request.pids[c], request.secrets[c]
            )

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for message_id in message_ids:
            if message_id in self.replies:
                replies.append(self.replies.pop(message_id))
            else:
                replies.extend(self.inner.pull_messages([message_id]))
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages, timeout))
