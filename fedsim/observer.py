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

On disk (safetensors: tensors plus a JSON header, nothing executable is ever unpickled):

    observations/round_0001/global.safetensors        weights the server sent
    observations/round_0001/client_0003.safetensors   weights client 3 returned; its header
                                                      key "fedsim" holds the JSON metadata
    ground_truth/round_0001/client_0003.json          example indices (scoring only)

`load_observations(run_dir)` reads them back as `Observation` objects.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid
from safetensors.torch import load_file, safe_open, save

from fedsim.client import TRUTH_KEY
from fedsim.config import Scenario
from fedsim.errors import UserError
from fedsim.grid_view import GridView
from fedsim.results import RunDirectory, atomic_write_bytes, atomic_write_json
from fedsim.training import LocalHyperParams


@dataclass
class Observation:
    """One client's contribution to one round, as the server saw it."""

    server_round: int
    client: int
    global_state: dict[str, torch.Tensor]
    client_state: dict[str, torch.Tensor]
    num_examples: int
    hyperparams: LocalHyperParams
    local_steps: int

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
    for path in sorted(run.observations_dir.glob("round_*/client_*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["fedsim"])
        observations.append(
            Observation(
                server_round=meta["server_round"],
                client=meta["client"],
                global_state=load_file(str(path.parent / "global.safetensors")),
                client_state=load_file(str(path)),
                num_examples=meta["num_examples"],
                hyperparams=LocalHyperParams(**meta["hyperparams"]),
                local_steps=meta["local_steps"],
            )
        )
    return observations


def load_ground_truth(run_dir: Path | str, server_round: int, client: int) -> list[list[int]]:
    """The batches (example indices into the client's training split) a client trained on."""
    path = _round_dir(RunDirectory(run_dir).ground_truth_dir, server_round) / f"client_{client:04d}.json"
    if not path.is_file():
        raise UserError(f"no ground truth for round {server_round}, client {client} in '{run_dir}'")
    return json.loads(path.read_text())["batches"]


class ObservingGrid(GridView):
    """A Grid that records what the server sees and reports replies in partition order."""

    def __init__(self, grid: Grid, scenario: Scenario, run: RunDirectory) -> None:
        super().__init__(grid)
        self.scenario = scenario
        self.run_dir = run
        self.round_client_metrics: dict[int, list[dict[str, Any]]] = {}
        self.round_client_evaluation: dict[int, list[dict[str, Any]]] = {}
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
        for reply in replies:
            if reply.has_error():
                pid = self.partition_of.get(reply.metadata.src_node_id, "?")
                raise RuntimeError(f"client {pid} failed: {reply.error.reason}")
        kind = messages[0].metadata.message_type if messages else None
        if kind == MessageType.TRAIN:
            self._record_train_round(messages[0].content, replies)
        elif kind == MessageType.EVALUATE:
            server_round = int(messages[0].content["config"]["server-round"])
            self.round_client_evaluation[server_round] = [dict(r.content["metrics"]) for r in replies]
        return replies

    def _discover_partitions(self, wait_s: float = 120.0) -> dict[int, int]:
        """Ask every node which partition it holds, once all of them have connected."""
        expected = self.scenario.data.num_clients
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
                raise RuntimeError(f"only {len(mapping)} of {expected} client nodes connected")
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

