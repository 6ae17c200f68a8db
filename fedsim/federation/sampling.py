"""Seeded client sampling by partition id.

Flower's strategies sample node ids with Python's `random`, and node ids are random per run,
so the same scenario would train different cohorts each time. `SeededCohorts` wraps any
strategy: each round it draws the cohort of partition ids from the scenario seed and shows
the inner strategy a Grid with only those nodes (the inner strategy is built to take every
node it sees). Everything else is delegated unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.federation.grid_view import GridView
from fedsim.federation.observer import ObservingGrid
from fedsim.core.seeding import numpy_rng


class CohortGrid(GridView):
    """A view of the observing Grid that lists only the cohort's nodes."""

    def __init__(self, grid: ObservingGrid, partitions: list[int]) -> None:
        super().__init__(grid)
        self.nodes = [grid.node_of[pid] for pid in partitions]

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)


def draw_cohort(seed: int, purpose: str, server_round: int, population: int, size: int) -> list[int]:
    """`size` distinct partition ids out of `population`, the same for the same seed."""
    if size >= population:
        return list(range(population))
    rng = numpy_rng(seed, "cohort", purpose, server_round)
    return sorted(int(i) for i in rng.choice(population, size=size, replace=False))


class SeededCohorts(Strategy):
    """Wraps a strategy so each round's train and evaluate cohorts come from the seed."""

    def __init__(self, inner: Strategy, seed: int, population: int, train_size: int, evaluate_size: int) -> None:
        self.inner = inner
        self.seed = seed
        self.population = population
        self.train_size = train_size
        self.evaluate_size = evaluate_size

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        cohort = draw_cohort(self.seed, "train", server_round, self.population, self.train_size)
        return self.inner.configure_train(server_round, arrays, config, CohortGrid(grid, cohort))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.evaluate_size == 0:
            return []
        cohort = draw_cohort(self.seed, "evaluate", server_round, self.population, self.evaluate_size)
        return self.inner.configure_evaluate(server_round, arrays, config, CohortGrid(grid, cohort))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()
