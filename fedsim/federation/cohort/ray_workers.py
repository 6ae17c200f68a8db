"""`simulation.ray_workers`: the vectorised engine's chunks trained on Ray actors.

Flower's Ray engine runs one ClientApp call per message on a pool of actors, each call
rebuilding nothing but paying a task, a (de)serialised message and a model per client. Here
`ray_workers` long-lived actors each hold the scenario's `ClientSetup` (data, defenses, model
factory: built on the first shard and cached, so the scenario is not re-imported per message)
and train whole shards of the cohort with the vectorised executor. An actor gets the shard's
partition ids, node secrets, start parameters and hyper-parameters (`ShardRequest`) and returns
only the trained parameters and losses; the driver derives the same plan to build the
ordinary Flower replies, so the observer, SecAgg+, central DP and attacks see what they see
under the in-process vectorised engine. The actors are started, and build the scenario's
setup, once per run, concurrently: that start-up is logged apart from the rounds.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fedsim.federation.client_call import client_setup
from fedsim.federation.cohort.executor import CohortResult, warm_up
from fedsim.federation.cohort.plan import ShardRequest, train_shard

log = logging.getLogger("fedsim")


class CohortWorker:
    """One Ray actor: trains the shards it is sent with the vectorised executor."""

    def prepare(self, scenario_yaml: str) -> None:
        """Build the scenario's `ClientSetup` (data, defenses) and warm torch.func up before
        the first round."""
        client_setup(scenario_yaml)
        warm_up()

    def train(self, scenario_yaml: str, request: ShardRequest) -> CohortResult:
        return train_shard(client_setup(scenario_yaml), request)[1]


class RayCohortWorkers:
    """`count` CohortWorker actors, each with `client_resources` (Ray's num_cpus / num_gpus),
    on the Ray instance `init_args` starts or joins (the one already running, if any), each
    prepared for the public scenario `scenario_yaml` (what train messages carry)."""

    def __init__(
        self, count: int, scenario_yaml: str, client_resources: dict[str, float], init_args: dict[str, Any]
    ) -> None:
        import ray

        started = time.monotonic()
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            ray.init(**init_args, include_dashboard=False, logging_level=logging.WARNING)
        actor = ray.remote(**client_resources)(CohortWorker)
        self.actors = [actor.remote() for _ in range(count)]
        ray.get([a.prepare.remote(scenario_yaml) for a in self.actors])
        self.startup_s = time.monotonic() - started
        log.info("engine vectorized: %d Ray workers started in %.1f s", count, self.startup_s)

    def train(self, scenario_yaml: str, requests: list[ShardRequest]) -> list[CohortResult]:
        """Each shard's result, in order; shards go to the actors in turn, all at once."""
        import ray

        futures = [
            self.actors[i % len(self.actors)].train.remote(scenario_yaml, request)
            for i, request in enumerate(requests)
        ]
        return ray.get(futures)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        if self.owns_ray:
            ray.shutdown()
