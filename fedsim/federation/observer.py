"""What an honest-but-curious server sees, recorded to disk.

`ObservingGrid` wraps the Grid the ServerApp is given. Every message the strategy sends and
every reply it gets passes through it, so it records exactly what the server saw,
whichever strategy or server-time defense is in use:

- the global weights sent in a round,
- each observed client's returned weights, example count and the hyper-parameters the
  server sent it (lr, local epochs/steps, batch size, optimizer).

It also learns which partition each (randomly numbered) node holds, orders replies by
partition id so aggregation is deterministic, and strips the simulation-only ground-truth
record from replies before anyone else sees them.

Under secure aggregation (`secagg_plus`) the server never sees a client's update: a round's
train exchange yields one reply that stands for the whole cohort, marked by the ConfigRecord
`AGGREGATE_KEY` (the clients' scalar metrics, which SecAgg+ leaves in the clear). The observer
records it as an aggregate-only observation (`client` = -1, `aggregate_of` = the cohort's
partition ids) in every observed round in which an observed client took part.

Replies to a custom train action (`train.<action>`, e.g. DIFF2's noised gradient releases) are
not weights: the observer keeps only their metrics (for metrics.jsonl) and records no
observation.

On disk (safetensors: tensors plus a JSON header, nothing executable is ever unpickled):

    observations/round_0001/global.safetensors        weights the server sent
    observations/round_0001/client_0003.safetensors   weights client 3 returned; its header
                                                      key "fedsim" holds the JSON metadata
    observations/round_0001/aggregate.safetensors     under secure aggregation, instead: the
                                                      cohort's aggregate ("aggregate_only": true)
    ground_truth/round_0001/client_0003.json          example indices (scoring only)
    ground_truth/round_0001/aggregate.json            {partition id: example indices}

`load_observations(run_dir)` reads them back as `Observation` objects.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode, SType
from flwr.serverapp import Grid
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from fedsim.core.config import Scenario
from fedsim.core.errors import UserError
from fedsim.federation.grid_view import GridView
from fedsim.federation.protocol import AGGREGATE_KEY, TRUTH_KEY
from fedsim.core.results import (
    RETRAIN,
    RunDirectory,
    atomic_write_bytes,
    atomic_write_json,
    damaged,
    read_record,
)
from fedsim.federation.training import LocalHyperParams

class RoundFailed(RuntimeError):
    """A round had too few usable replies under the scenario's failure policy; `diverged`
    when every failure was a non-finite update (the clients' training diverged)."""

    def __init__(self, message: str, diverged: bool = False) -> None:
        super().__init__(message)
        self.diverged = diverged


def _finite(arrays: ArrayRecord) -> bool:
    """No NaN or infinity in any floating-point array of `arrays`.

    Each array is read in place: Flower stores it as an .npy file, whose raw data are its last
    `size * itemsize` bytes (after the header; element order does not matter here), so the
    check costs no decoding (np.load parses every header: a third of a 100-client round)."""
    for array in arrays.values():
        if array.stype != SType.NUMPY:
            array.numpy()  # raises Flower's error for the unsupported serialisation
        dtype = np.dtype(array.dtype)
        if dtype.kind not in "fc":
            continue
        size = math.prod(array.shape)
        values = np.frombuffer(array.data, dtype, count=size, offset=len(array.data) - size * dtype.itemsize)
        if not np.isfinite(values).all():
            return False
    return True


DISCOVERY_BASE_S, DISCOVERY_PER_CLIENT_S = 60.0, 2.0


def discovery_timeout(scenario: Scenario) -> float:
    """How long the server waits for every client node to connect: the setting, else a base
    plus a share per client (a loaded machine starts 100 Ray workers far slower than 10)."""
    configured = scenario.simulation.ray_discovery_timeout
    return configured or DISCOVERY_BASE_S + DISCOVERY_PER_CLIENT_S * scenario.data.num_clients


AGGREGATE_CLIENT = -1
"""The `client` of an aggregate-only observation."""


@dataclass
class Observation:
    """One client's contribution to one round, as the server saw it, or the cohort's aggregate.

    An aggregate (`aggregate_of` non-empty, `client` = -1) holds the example-weighted average
    of the cohort's returned weights; `num_examples` is their total.
    """

    server_round: int
    client: int
    global_state: dict[str, torch.Tensor]
    client_state: dict[str, torch.Tensor]
    num_examples: int
    hyperparams: LocalHyperParams
    local_steps: int
    aggregate_of: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        """Whose update this is, for people: `client 3`, or `aggregate` (never `client -1`)."""
        return "aggregate" if self.aggregate_of else f"client {self.client}"

    @property
    def stem(self) -> str:
        """File stem naming this observation, e.g. `round_0001_client_0003`."""
        who = "aggregate" if self.aggregate_of else f"client_{self.client:04d}"
        return f"round_{self.server_round:04d}_{who}"

    @property
    def batch_size(self) -> int:
        """Examples behind one step of the update.

        An aggregate of K clients that each took one SGD step on a batch of b examples is one
        step on their K*b examples together (exactly so when their example counts are equal),
        so an attack on it searches for K*b examples.
        """
        return self.hyperparams.batch_size * max(1, len(self.aggregate_of))

    @property
    def update(self) -> dict[str, torch.Tensor]:
        """Returned weights minus sent weights, for every floating-point tensor."""
        return {
            k: self.client_state[k] - self.global_state[k]
            for k in self.client_state
            if self.client_state[k].is_floating_point()
        }


def _round_dir(root: Path, server_round: int) -> Path:
    return root / f"round_{server_round:04d}"


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    header = {"fedsim": json.dumps(metadata)} if metadata is not None else None
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(contiguous, metadata=header))


def load_observations(run_dir: Path | str) -> list[Observation]:
    """Every observation recorded in `run_dir`, ordered by round then client."""
    run = RunDirectory(run_dir).require()
    observations = []
    paths = [*run.observations_dir.glob("round_*/client_*.safetensors")]
    paths += run.observations_dir.glob("round_*/aggregate.safetensors")
    for path in paths:
        observations.append(_read_observation(path))
    return sorted(observations, key=lambda o: (o.server_round, o.client))


def _read_observation(path: Path) -> Observation:
    """One recorded observation, or a one-line UserError naming the damaged file."""
    global_path = path.parent / "global.safetensors"
    try:
        global_state = load_file(str(global_path))
    except (OSError, SafetensorError) as err:
        raise damaged(global_path, str(err), RETRAIN) from None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["fedsim"])
        observation = Observation(
            server_round=int(meta["server_round"]),
            client=int(meta["client"]),
            global_state=global_state,
            client_state=load_file(str(path)),
            num_examples=int(meta["num_examples"]),
            hyperparams=LocalHyperParams(**meta["hyperparams"]),
            local_steps=int(meta["local_steps"]),
            aggregate_of=tuple(map(int, meta.get("aggregate_of", ()))),
        )
    except KeyError as err:
        raise damaged(path, f"its fedsim metadata lacks {err}", RETRAIN) from None
    except (OSError, SafetensorError, ValueError, TypeError) as err:
        raise damaged(path, f"{type(err).__name__}: {err}", RETRAIN) from None
    return observation


def load_ground_truth(run_dir: Path | str, server_round: int, client: int) -> list[list[int]]:
    """The batches (example indices into the client's training split) a client trained on."""
    path = _round_dir(RunDirectory(run_dir).ground_truth_dir, server_round) / f"client_{client:04d}.json"
    if not path.is_file():
        raise UserError(f"no ground truth for round {server_round}, client {client} in '{run_dir}'")
    return read_record(path, "batches", fix=RETRAIN)["batches"]


def observed_batches(run_dir: Path | str, observation: Observation) -> dict[int, list[list[int]]]:
    """Partition id -> the batches behind `observation` (every cohort client's, for an aggregate)."""
    if not observation.aggregate_of:
        return {observation.client: load_ground_truth(run_dir, observation.server_round, observation.client)}
    path = _round_dir(RunDirectory(run_dir).ground_truth_dir, observation.server_round) / "aggregate.json"
    if not path.is_file():
        raise UserError(f"no ground truth for the aggregate of round {observation.server_round} in '{run_dir}'")
    return {int(pid): batches for pid, batches in read_record(path, "clients", fix=RETRAIN)["clients"].items()}


class ObservingGrid(GridView):
    """A Grid that records what the server sees and reports replies in partition order."""

    def __init__(self, grid: Grid, scenario: Scenario, run: RunDirectory) -> None:
        super().__init__(grid)
        self.scenario = scenario
        self.run_dir = run
        self.round_client_metrics: dict[int, list[dict[str, Any]]] = {}
        self.round_client_evaluation: dict[int, list[dict[str, Any]]] = {}
        # round -> failure kind -> partition ids (see `_drop_failures`)
        self.round_failures: dict[int, dict[str, list[int]]] = {}
        self.round_evaluate_failures: dict[int, dict[str, list[int]]] = {}
        self.round_errors: dict[int, list[str]] = {}
        self.partition_of = self._discover_partitions()
        self.node_of = {pid: node for node, pid in self.partition_of.items()}

    def get_node_ids(self) -> Iterable[int]:
        return [self.node_of[pid] for pid in sorted(self.node_of)]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        replies.sort(key=lambda m: self.partition_of.get(m.metadata.src_node_id, -1))
        kind = messages[0].metadata.message_type if messages else None
        if kind == MessageType.TRAIN:  # what the server saw, non-finite updates included
            self._record_train_round(messages[0].content, [r for r in replies if not r.has_error()])
        replies = self._drop_failures(kind, messages, replies)
        if kind is not None and kind.startswith(f"{MessageType.TRAIN}."):  # e.g. DIFF2's releases
            server_round = int(messages[0].content["config"]["server-round"])
            self.round_client_metrics[server_round] = [dict(r.content["metrics"]) for r in replies]
        elif kind == MessageType.EVALUATE:
            server_round = int(messages[0].content["config"]["server-round"])
            self.round_client_evaluation[server_round] = [dict(r.content["metrics"]) for r in replies]
        return replies

    def _drop_failures(self, kind: str | None, messages: list[Message], replies: list[Message]) -> list[Message]:
        """The replies the strategy may use; failures are recorded per round and left out.

        A failure is an error reply (`error`; `dropped` for a node that went away), a message
        with no reply within the round timeout (`timeout`), or a train reply with a NaN or
        infinite weight (`non_finite`, which would poison the average; it is still recorded as
        an observation, which attacks skip, and its metrics, so the privacy its client spent
        is still reported). Fewer than
        `federation.min_replies` usable train replies, or any failure without
        `federation.accept_failures`, fails the run with a `RoundFailed` naming the clients.
        """
        if kind is None or not kind.startswith(MessageType.TRAIN) and kind != MessageType.EVALUATE:
            return replies
        server_round = int(messages[0].content["config"]["server-round"])
        failures: dict[str, list[int]] = {}
        kept = []
        answered = {r.metadata.src_node_id for r in replies}
        for message in messages:
            if message.metadata.dst_node_id not in answered:
                failures.setdefault("timeout", []).append(self.partition_of.get(message.metadata.dst_node_id, -1))
        for reply in replies:
            pid = self.partition_of.get(reply.metadata.src_node_id, -1)
            if reply.has_error():
                dropped = reply.error.code == ErrorCode.NODE_UNAVAILABLE
                failures.setdefault("dropped" if dropped else "error", []).append(pid)
                self.round_errors.setdefault(server_round, []).append(f"client {pid}: {reply.error.reason}")
            elif kind == MessageType.TRAIN and "arrays" in reply.content and not _finite(reply.content["arrays"]):
                failures.setdefault("non_finite", []).append(pid)
            else:
                kept.append(reply)
        if failures:
            failures = {k: sorted(v) for k, v in failures.items()}
            (self.round_evaluate_failures if kind == MessageType.EVALUATE else self.round_failures)[server_round] = failures
            if kind != MessageType.EVALUATE:
                atomic_write_json(
                    _round_dir(self.run_dir.observations_dir, server_round) / "failures.json",
                    {"server_round": server_round, "sent": len(messages), "failures": failures},
                )
        if kind == MessageType.EVALUATE:
            return kept
        policy = self.scenario.federation
        if len(kept) < policy.min_replies or failures and not policy.accept_failures:
            detail = "; ".join(self.round_errors.get(server_round, [])[:3])
            raise RoundFailed(
                f"round {server_round}: {len(kept)} usable replies of {len(messages)} "
                f"(federation.min_replies={policy.min_replies}, "
                f"accept_failures={str(policy.accept_failures).lower()}); failed: "
                + ", ".join(f"{k} {v}" for k, v in failures.items())
                + (f" ({detail})" if detail else ""),
                diverged=set(failures) == {"non_finite"},
            )
        return kept

    def _discover_partitions(self) -> dict[int, int]:
        """Ask every node which partition it holds, once all of them have connected (within
        `simulation.ray_discovery_timeout`, by default in proportion to the federation)."""
        expected = self.scenario.data.num_clients
        wait_s = discovery_timeout(self.scenario)
        deadline = time.monotonic() + wait_s
        mapping: dict[int, int] = {}
        while len(mapping) < expected:
            nodes = [n for n in self.inner.get_node_ids() if n not in mapping]
            queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
            for reply in self.inner.send_and_receive(queries, timeout=wait_s):
                identity = reply.content["identity"]
                if int(identity["num-partitions"]) != expected:
                    raise UserError(
                        f"the federation has {identity['num-partitions']} client nodes but "
                        f"data.num_clients={expected}; make them equal (under `flwr run`: "
                        f"flwr federation simulation-config ... --num-supernodes {expected})"
                    )
                mapping[reply.metadata.src_node_id] = int(identity["partition-id"])
            if len(mapping) < expected and time.monotonic() > deadline:
                raise UserError(
                    f"only {len(mapping)} of {expected} client nodes connected within {wait_s:g} s; "
                    "raise simulation.ray_discovery_timeout (or give Ray more CPUs per client)"
                )
            if len(mapping) < expected:
                time.sleep(0.2)
        return mapping

    def _record_train_round(self, sent: RecordDict, replies: list[Message]) -> None:
        config = sent["config"]
        server_round = int(config["server-round"])
        hyperparams = LocalHyperParams.from_config(config)
        global_state = sent["arrays"].to_torch_state_dict()
        observed_any = False
        client_metrics = []
        for reply in replies:
            truth = reply.content.pop(TRUTH_KEY, None)
            if AGGREGATE_KEY in reply.content:
                client_metrics += self._record_aggregate(reply, truth, server_round, hyperparams, global_state)
                continue
            pid = self.partition_of[reply.metadata.src_node_id]
            metrics = dict(reply.content["metrics"])
            client_metrics.append(metrics)
            if not self.scenario.observes(server_round, pid):
                continue
            if not observed_any:
                save_tensors(
                    _round_dir(self.run_dir.observations_dir, server_round) / "global.safetensors",
                    global_state,
                )
                observed_any = True
            meta = {
                "server_round": server_round,
                "client": pid,
                "num_examples": int(metrics["num-examples"]),
                "local_steps": int(metrics["local-steps"]),
                "hyperparams": hyperparams.__dict__,
            }
            save_tensors(
                _round_dir(self.run_dir.observations_dir, server_round) / f"client_{pid:04d}.safetensors",
                reply.content["arrays"].to_torch_state_dict(),
                meta,
            )
            if truth is not None:
                atomic_write_json(
                    _round_dir(self.run_dir.ground_truth_dir, server_round) / f"client_{pid:04d}.json",
                    {"batches": json.loads(truth["batches"])},
                )
        self.round_client_metrics[server_round] = client_metrics

    def _record_aggregate(
        self,
        reply: Message,
        truth: ConfigRecord | None,
        server_round: int,
        hyperparams: LocalHyperParams,
        global_state: dict[str, torch.Tensor],
    ) -> list[dict[str, Any]]:
        """Record a cohort's aggregate if an observed client is in it; return the clients' metrics."""
        client_metrics = json.loads(reply.content[AGGREGATE_KEY]["clients"])
        cohort = sorted(int(m["partition-id"]) for m in client_metrics)
        if not any(self.scenario.observes(server_round, pid) for pid in cohort):
            return client_metrics
        directory = _round_dir(self.run_dir.observations_dir, server_round)
        save_tensors(directory / "global.safetensors", global_state)
        meta = {
            "server_round": server_round,
            "client": AGGREGATE_CLIENT,
            "aggregate_only": True,
            "aggregate_of": cohort,
            "num_examples": int(sum(m["num-examples"] for m in client_metrics)),
            "local_steps": int(max(m["local-steps"] for m in client_metrics)),
            "hyperparams": hyperparams.__dict__,
        }
        save_tensors(directory / "aggregate.safetensors", reply.content["arrays"].to_torch_state_dict(), meta)
        if truth is not None:
            atomic_write_json(
                _round_dir(self.run_dir.ground_truth_dir, server_round) / "aggregate.json",
                {"clients": json.loads(truth["clients"])},
            )
        return client_metrics

