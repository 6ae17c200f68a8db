"""Client canaries: extra members of every round's cohort whose updates an auditor controls.

A client-level DP guarantee (server-side central DP, zero-out neighbours) caps how well any
test tells whether one client took part. The auditor's canary clients (`data.canaries.kind:
client`, `fedsim.data.canaries`) make that test as easy as it can be: canary i's update is
zero except on its own coordinate j_i of the flattened parameters, where it is the clipping
norm C when the canary is included, and the zero update (its zero-out neighbour) when it is
not. `CanaryClients` wraps the central-DP strategy and adds those K replies to each round's
real ones before clipping (every variant: norm C is what a client-side mod sends unclipped,
and under adaptive clipping C is the round's current norm); the central-DP wrapper is built for a cohort of m + K clients, so
the released average carries noise of std z C / (m + K), z C on the sum, exactly as for m + K
real clients. (Flower's accounted wrapper checks that it configured m + K clients: the
wrapper shows it a Grid with K placeholder nodes, `CanaryGrid`, and drops their train
messages before anything is sent.) The total change of coordinate j_i over the run is then C x (rounds, if in)
plus the noise plus the real clients' (small) pull on j_i: the audit's score
(`canary_client_audit`). The canaries are not Flower nodes: no client trains, and the
observer does not record them as clients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from fedsim.data.canaries import Canaries
from fedsim.federation.grid_view import GridView


def mean_metrics(replies: list[Message]) -> MetricRecord:
    """The real replies' metrics, each number averaged over them (lists: the first reply's)."""
    records = [next(iter(r.content.metric_records.values())) for r in replies if r.has_content()]
    first = records[0]
    return MetricRecord({
        key: sum(r[key] for r in records) / len(records) if isinstance(value, (int, float)) else value
        for key, value in first.items()
    })  # fmt: skip


PLACEHOLDER_NODES = 1 << 62
"""Node ids of the canaries' placeholders (no real node has one this large)."""


class CanaryGrid(GridView):
    """The cohort's Grid plus K placeholder node ids, one per canary client."""

    def __init__(self, inner: Grid, canaries: int) -> None:
        super().__init__(inner)
        self.placeholders = [PLACEHOLDER_NODES + i for i in range(canaries)]

    def get_node_ids(self) -> Iterable[int]:
        return [*self.inner.get_node_ids(), *self.placeholders]


class CanaryClients(Strategy):
    """Wraps a strategy so each round's replies include the K canary clients' updates."""

    def __init__(
        self, inner: Strategy, canaries: Canaries, clipping_norm: Callable[[], float], parameter_names: list[str]
    ) -> None:
        self.inner = inner
        self.canaries = canaries
        self.clipping_norm = clipping_norm  # read each round: adaptive clipping moves it
        self.parameter_names = parameter_names
        self.coordinates: np.ndarray | None = None  # set once the sizes are seen
        self.sent: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent = arrays
        messages = self.inner.configure_train(server_round, arrays, config, CanaryGrid(grid, len(self.canaries.included)))
        return [m for m in messages if m.metadata.dst_node_id < PLACEHOLDER_NODES]

    def canary_replies(self, metrics: MetricRecord) -> list[Message]:
        """One reply per canary: the sent arrays, plus this round's C on its coordinate when it
        is included, with `metrics` (the real replies' means: aggregated metrics stay as they
        were) and, under client-side adaptive clipping, the bit Flower's mod sends for an
        update of norm at most C (0: not clipped)."""
        assert self.sent is not None
        if KEY_NORM_BIT in metrics:
            metrics[KEY_NORM_BIT] = 0
        clipping_norm = self.clipping_norm()
        sent = {name: self.sent[name].numpy() for name in self.sent.keys()}
        sizes = [sent[name].size for name in self.parameter_names]
        if self.coordinates is None:
            self.coordinates = self.canaries.coordinates(sum(sizes))
        offsets = np.cumsum([0, *sizes])
        # every canary sends the sent arrays but (at most) one: those are shared, not copied K times
        unchanged = {name: self.sent[name] for name in self.sent.keys()}
        replies = []
        for coordinate, included in zip(self.coordinates, self.canaries.included, strict=True):
            arrays = dict(unchanged)
            if included:
                which = int(np.searchsorted(offsets, coordinate, side="right")) - 1
                name = self.parameter_names[which]
                moved = sent[name].copy()
                moved.reshape(-1)[coordinate - offsets[which]] += clipping_norm
                arrays[name] = Array(moved)
            content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(dict(metrics))})
            replies.append(Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN))
        return replies

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        real = list(replies)
        return self.inner.aggregate_train(server_round, [*real, *self.canary_replies(mean_metrics(real))])

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()
