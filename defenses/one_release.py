"""What the one-release baselines (`ldp_sparse_regression`, `dp_kde`) share: each client is
asked for one DP message, once, and refuses a second request.

A client's epsilon covers a single release, so both halves are enforced: the server messages
only nodes it has not asked before (`OneReleaseServer.configure_train`), and the client marks
its release in its persistent node state before replying (`claim_release`), so even a server
that asks again gets no second message.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim.federation.client_call import ClientCall
from fedsim.federation.strategies import TAKE_ALL_NODES


class AlreadyReleased(RuntimeError):
    """A client asked for a second message: its epsilon covers one release only."""


def claim_release(call: ClientCall, state_key: str) -> None:
    """Record this node's one release in its state, or raise `AlreadyReleased` if it has one."""
    if state_key in call.state:
        raise AlreadyReleased(f"client {call.partition_id} has released its one message already")
    call.state[state_key] = ConfigRecord({"released": True})


class OneReleaseServer(FedAvg):
    """Sends `message_type` once to every node not asked yet; subclasses fold in the replies.

    With `sends_model` the train message carries the global model (the public maps clients
    must share); otherwise only the round config. `arrays` is the global model of the round.
    """

    message_type: ClassVar[str]
    sends_model: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__(**TAKE_ALL_NODES)
        self.asked: set[int] = set()
        self.cohort = 0  # nodes asked in the latest round (they release together)
        self.arrays: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        self.arrays = arrays
        nodes = [node for node in grid.get_node_ids() if node not in self.asked]
        self.asked.update(nodes)
        self.cohort = len(nodes)
        round_config = ConfigRecord({**config, "server-round": server_round, "release-cohort": len(nodes)})
        content = {"arrays": arrays, "config": round_config} if self.sends_model else {"config": round_config}
        return [
            Message(RecordDict(content), dst_node_id=node, message_type=self.message_type)
            for node in nodes
        ]

    def aggregate_train(
        self, server_round: int, replies: Any
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global model from this round's replies (none: no new model)."""
        replies = list(replies)
        if not replies:
            return None, None
        return self.fold(replies), None

    @abstractmethod
    def fold(self, replies: list[Message]) -> ArrayRecord:
        """Add the replies' releases to the running estimate; the global model it gives."""
