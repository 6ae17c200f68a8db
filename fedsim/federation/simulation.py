"""How a federation is executed: the one module that knows Flower's engines.

Three engines run the same ServerApp (`fedsim.federation.server`) and ClientApp (`fedsim.federation.client`):

- `inline`: `InlineGrid` calls the ClientApp directly in this process, node after node.
  No Ray start-up and no serialisation, so small studies and tests run in seconds; client
  exceptions surface with their own traceback.
- `vectorized`: the inline engine's nodes, each round's train messages trained together
  (`fedsim.federation.cohort`), in this process or in shards on `ray_workers` Ray actors.
- `ray`: Flower's simulation engine (`flwr.simulation.run_simulation`, Ray backend) with
  `client_cpus` / fractional `client_gpus` per ClientApp, on a local Ray instance or an
  existing cluster (`ray_address`).

Both give every simulated node its secret (`SecretNodes`): the one value, never sent, from
which the node draws all its randomness (see `fedsim.core.seeding`). The server gets the scenario
and keeps only its public part.

The deployment engine needs nothing here: `flwr run .` loads `fedsim.federation.server:app` and
`fedsim.federation.client:app` as declared in pyproject.toml (a node's secret is then its operator's
`fedsim-secret` node config, or OS entropy). When Flower changes its engine API, this is the
file to update.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Iterable
from copy import deepcopy
from itertools import count
from typing import Any
from urllib.parse import urlsplit
from uuid import uuid4

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedsim.federation import client
from fedsim.core.config import Scenario
from fedsim.core.errors import UserError
from fedsim.core.results import RunDirectory
from fedsim.core.seeding import SECRET_KEY, client_secret
from fedsim.federation.faults import FAULT_REASON
from fedsim.federation.server import RoundCallback, make_server_app, serve
from fedsim.federation.cohort.engine import VectorizedGrid
from fedsim.federation.cohort.ray_workers import RayCohortWorkers

log = logging.getLogger("fedsim")


class SecretNodes(ClientApp):
    """A ClientApp that puts each simulated node's secret into its node config, then runs `app`.

    Flower's simulation sets only `partition-id` and `num-partitions` and takes no further
    node config, so the secret is filled in here, from `Scenario.client_secret_root` (the
    optional `simulation.secret_seed`, else the scenario seed) and the partition id:
    runs repeat, and no message carries anything it derives from.
    """

    def __init__(self, app: ClientApp, seed: int) -> None:
        super().__init__()
        self.app, self.seed = app, seed

    def __call__(self, message: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        context.node_config[SECRET_KEY] = client_secret(self.seed, partition)
        return self.app(message, context)


class InlineGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process (no SuperLink, no Ray).

    Each node keeps its own Flower `Context` (with `partition-id` in its node config and a
    persistent `state`), exactly as a simulated SuperNode would.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self.contexts = {
            node_id: Context(
                run_id=run_id,
                node_id=node_id,
                node_config={"partition-id": pid, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for pid, node_id in zip(range(num_nodes), count(start=1001))
        }
        self.replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message], timeout: float | None = None) -> Iterable[str]:
        """Run each node's ClientApp on its message, one after another.

        As in Flower's runtime, a ClientApp that raises answers with an error reply. The calls
        run in turn, not concurrently, so a hung call cannot be interrupted: each is timed
        alone, and a reply that took longer than `timeout` is dropped, as a server that
        waited `timeout` for concurrent replies would never have seen it.
        """
        ids = []
        for message in messages:
            message_id = str(uuid4())
            message.metadata.__dict__["_message_id"] = message_id  # as Flower's InMemoryGrid does
            node_id = message.metadata.dst_node_id
            TaskIdentity.node_id = node_id
            started = time.monotonic()
            try:
                # Deliver a copy, as a real transport would: a client may alter what it gets
                # (Flower's secaggplus_mod pops its stage key), and messages share content.
                reply = self.client_app(deepcopy(message), self.contexts[node_id])
            except UserError:  # a setting the client cannot work with: the user's error, as before
                raise
            except Exception as err:  # noqa: BLE001 - any client failure becomes its error reply
                log.debug("client node %s raised", node_id, exc_info=True)
                reason = f"{type(err).__name__}: {err}"
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
            finally:
                TaskIdentity.node_id = SUPERLINK_NODE_ID
            if timeout is None or time.monotonic() - started <= timeout:
                self.replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages, timeout))


def run_inline(scenario: Scenario, run: RunDirectory, on_round: RoundCallback | None = None) -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    grid = InlineGrid(SecretNodes(client.app, scenario.client_secret_root), scenario.data.num_clients)
    serve(grid, scenario, run, on_round)


def run_vectorized(scenario: Scenario, run: RunDirectory, on_round: RoundCallback | None = None) -> None:
    """The inline engine's nodes, with each round's train messages trained as one cohort (in
    shards on `simulation.ray_workers` Ray actors, started once for the run, if above 0)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    inline = InlineGrid(SecretNodes(client.app, scenario.client_secret_root), scenario.data.num_clients)
    workers = None
    if scenario.simulation.ray_workers:
        workers = RayCohortWorkers(
            scenario.simulation.ray_workers, scenario.public().to_yaml(), **ray_backend_config(scenario)
        )
    try:
        serve(VectorizedGrid(inline, workers), scenario, run, on_round)
    finally:
        if workers is not None:
            workers.close()


def ray_backend_config(scenario: Scenario) -> dict[str, Any]:
    """Flower's backend config: per-ClientApp resources and Ray init arguments."""
    sim = scenario.simulation
    gpus = sim.client_gpus
    if gpus > 0 and not torch.cuda.is_available() and sim.ray_address is None:
        log.warning(
            "simulation.client_gpus=%s but no CUDA GPU is visible; running clients on CPU "
            "(set client_gpus: 0 to silence this)", gpus,
        )
        gpus = 0.0
    init_args = {"address": sim.ray_address} if sim.ray_address else {"num_cpus": os.cpu_count() or 1}
    return {
        "client_resources": {"num_cpus": sim.client_cpus, "num_gpus": gpus},
        "init_args": init_args,
    }


RAY_CONNECT_S = 5.0


def uses_ray(scenario: Scenario) -> bool:
    """Flower's Ray engine, or the vectorised engine's Ray workers."""
    sim = scenario.simulation
    return sim.engine == "ray" or (sim.engine == "vectorized" and sim.ray_workers > 0)


def check_engine(scenario: Scenario) -> None:
    """Fail fast, naming the field, if `simulation.ray_address` names a cluster that does not
    answer (Ray itself retries for minutes). `auto` and `local` are Ray's to resolve."""
    address = scenario.simulation.ray_address
    if not uses_ray(scenario) or address in (None, "auto", "local"):
        return
    try:
        target = urlsplit(address if "://" in address else f"gcs://{address}")
        host, port = target.hostname, target.port or (10001 if target.scheme == "ray" else 6379)
        if not host:
            raise ValueError("no host")
        socket.create_connection((host, port), timeout=RAY_CONNECT_S).close()
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise UserError(
            f"simulation.ray_address: no Ray cluster answers at '{address}' ({reason}); "
            "start one (ray start --head) or set ray_address: null to start a local one"
        ) from None


def run_ray(scenario: Scenario, run: RunDirectory, on_round: RoundCallback | None = None) -> None:
    from flwr.simulation import run_simulation

    os.environ.setdefault("OMP_NUM_THREADS", str(scenario.simulation.torch_threads))
    run_simulation(
        server_app=make_server_app(scenario, run, on_round),
        client_app=SecretNodes(client.app, scenario.client_secret_root),
        num_supernodes=scenario.data.num_clients,
        backend_config=ray_backend_config(scenario),
    )
    if not run.training_done:
        raise RuntimeError(
            "the Flower simulation ended without finishing training; see the log above"
        )


FLOWER_GENERIC_ERROR = "An exception was raised when processing a message by"
FAULT_LINE = re.compile(re.escape(FAULT_REASON) + r": \w+ \(client \d+, round \d+\)")


class OneLineFaults(logging.Filter):
    """A seeded `raise` fault as one line naming its client and round, not Flower's flood.

    Flower's Ray engine logs every exception a ClientApp raises three times (a generic line,
    the Ray task error and the driver's traceback: about 45 lines a client). For a fault, which
    the scenario asked for, the traceback says nothing: the line "client failed: fedsim fault:
    raise (client C, round R)" is kept and the rest dropped. A real client error keeps its
    traceback (the generic line, which always precedes it, is dropped).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text.startswith(FLOWER_GENERIC_ERROR):
            return False
        fault = FAULT_LINE.search(text)
        if fault is None:
            return True
        if text.startswith("Traceback"):
            return False
        record.msg, record.args = f"client failed: {fault.group(0)}", ()
        return True


def quiet_flower() -> None:
    """Hand Flower's log records to Python logging, warnings and errors only.

    Flower logs every message at INFO through its own console handler (the whole scenario,
    each round, and once more through the root logger in a notebook); fedsim reports its own
    progress. Where the warnings go is then the application's logging configuration (the
    CLI's, a sweep cell's log file, or a notebook's). A fault's error is one line (`OneLineFaults`).
    """
    from flwr.common.logger import console_handler

    flower = logging.getLogger("flwr")
    flower.removeHandler(console_handler)
    flower.setLevel(logging.WARNING)
    flower.propagate = True
    if not any(isinstance(f, OneLineFaults) for f in flower.filters):
        flower.addFilter(OneLineFaults())


def run_federation(scenario: Scenario, run: RunDirectory, on_round: RoundCallback | None = None) -> None:
    """Train the federation of `scenario` with its configured engine."""
    quiet_flower()
    if scenario.simulation.engine == "ray":
        run_ray(scenario, run, on_round)
    elif scenario.simulation.engine == "vectorized":
        run_vectorized(scenario, run, on_round)
    else:
        run_inline(scenario, run, on_round)
