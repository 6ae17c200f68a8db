"""Seeded client faults (the scenario's `faults:` section): a test tool for failure handling.

`fault_mod` is the outermost Flower mod of fedsim's train handler, so a fault happens inside
the ClientApp, the same under the inline engine, Flower's Ray simulation and `flwr run`:

- `raise`: the client raises; the runtime turns that into an error reply;
- `hang`: the client sleeps `federation.round_timeout` + `HANG_GRACE_S`, so the server's
  per-round timeout has dropped it when it then gives up (it never trains, so it spends no
  privacy that the server's records would miss);
- `drop`: the client drops out: an error reply with Flower's `NODE_UNAVAILABLE` code, the one
  a SuperLink gives for a node that went away (no update, no training);
- `nan`: the client trains, then returns NaN weights.

Whether a client fails in a round is drawn from the public seed the message carries, the round
and the partition id (`fault_strikes`), so every engine and every rerun fails the same clients.
"""

from __future__ import annotations

import math
import time

from flwr.app import ArrayRecord, Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from fedsim.core.config import FaultsConfig, Scenario
from fedsim.core.seeding import numpy_rng
from fedsim.federation.client_call import client_setup
from fedsim.federation.protocol import SCENARIO_KEY

HANG_GRACE_S = 1.0
"""How far past the round timeout a hanging client sleeps."""

FAULT_REASON = "fedsim fault"
"""The start of every error reason a fault produces (the observer names the kind from it)."""


def fault_strikes(faults: FaultsConfig, seed: int, server_round: int, partition_id: int) -> bool:
    """Whether `partition_id` fails in `server_round`: one seeded draw per (round, client)."""
    if faults.rate == 0 or server_round < faults.from_round:
        return False
    if faults.clients is not None and partition_id not in faults.clients:
        return False
    return bool(numpy_rng(seed, "fault", server_round, partition_id).random() < faults.rate)


def _nan_weights(arrays: ArrayRecord) -> ArrayRecord:
    state = arrays.to_torch_state_dict()
    return ArrayRecord({k: v.new_full(v.shape, math.nan) if v.is_floating_point() else v for k, v in state.items()})


def fault_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Fail this train call as the scenario's `faults` section says, else pass it on."""
    config = message.content.config_records.get("config")
    if config is None or SCENARIO_KEY not in config:  # e.g. a SecAgg+ stage: not a train call
        return call_next(message, context)
    scenario: Scenario = client_setup(str(config[SCENARIO_KEY])).scenario
    faults, server_round = scenario.faults, int(config["server-round"])
    pid = int(context.node_config["partition-id"])
    if not fault_strikes(faults, scenario.seed, server_round, pid):
        return call_next(message, context)
    reason = f"{FAULT_REASON}: {faults.kind} (client {pid}, round {server_round})"
    if faults.kind == "raise":
        raise RuntimeError(reason)
    if faults.kind == "drop":
        return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=reason), reply_to=message)
    if faults.kind == "hang":
        time.sleep(scenario.federation.round_timeout + HANG_GRACE_S)
        raise RuntimeError(reason)  # never trains: no privacy spent the server cannot see
    reply = call_next(message, context)
    if not reply.has_error():
        reply.content["arrays"] = _nan_weights(reply.content["arrays"])
    return reply
