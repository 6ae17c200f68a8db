"""What a chunk of clients trains this round, derived from their secrets alone.

A `ShardRequest` names the clients (partition ids and node secrets), their start parameters
and the round's hyper-parameters; `plan_cohort` turns it into each client's data, batches and
defense steps exactly as the inline ClientApp would draw them (the batches from the client's
secret "batches" generator, a train-time defense's draws before them). Because the plan is a
function of the request, a Ray worker that trains a shard (`train_shard`) and the driver that
builds the replies derive the same one without sending generators or closures over the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedsim.core.defense import BatchedLoss, PrivateSteps
from fedsim.core.errors import UserError
from fedsim.core.seeding import torch_generator
from fedsim.data.datasets import TensorData
from fedsim.federation.client import local_training
from fedsim.federation.client_call import ClientSetup
from fedsim.federation.cohort.executor import CohortResult, batch_schedule, train_cohort
from fedsim.federation.training import LocalHyperParams


@dataclass(frozen=True)
class ShardRequest:
    """The clients of one chunk: partition ids, node secrets and start parameters (CPU)."""

    pids: list[int]
    secrets: list[int]
    starts: list[dict[str, torch.Tensor]]
    hp: LocalHyperParams
    server_round: int


@dataclass
class CohortPlan:
    """Per client: its training data, the example indices of each step, and the train-time
    defense's DP-SGD steps (`private`) or loss term (`extra`), None without one."""

    datas: list[TensorData]
    schedules: list[list[torch.Tensor]]
    private: list[PrivateSteps] | None
    extra: list[BatchedLoss] | None


def plan_cohort(setup: ClientSetup, model: nn.Module, request: ShardRequest) -> CohortPlan:
    """Each client's data, batches and defense steps for `request` (see the module docstring)."""
    datas = [setup.data.client(pid)[0] for pid in request.pids]
    if any(len(d) == 0 for d in datas):
        raise UserError("a client has no training examples; give every client data (data.partitioner) or use fewer clients")
    hp, server_round = request.hp, request.server_round
    generators = [torch_generator(secret, "batches", server_round) for secret in request.secrets]
    private, extra = None, None
    if setup.train_defenses:  # one, whose vectorized_refusal() is None (engine.fallback_reason)
        defense = setup.train_defenses[0]
        terms = [defense.batched_loss(model, g) for g in generators]  # drawn before the batches
        extra = None if None in terms else terms
        steps = [
            defense.private_steps(local_training(setup, hp, len(d), secret, server_round), g, setup.device)
            for d, secret, g in zip(datas, request.secrets, generators)
        ]
        private = None if None in steps else steps
    if private is None:
        schedules = [batch_schedule(len(d), hp, g) for d, g in zip(datas, generators)]
    else:
        schedules = [p.batches for p in private]
    return CohortPlan(datas, schedules, private, extra)


def train_shard(setup: ClientSetup, request: ShardRequest) -> tuple[CohortPlan, CohortResult]:
    """Plan and train one chunk of clients together on `setup.device`."""
    model = setup.new_model().to(setup.device)
    plan = plan_cohort(setup, model, request)
    done = train_cohort(model, request.starts, plan.datas, plan.schedules, request.hp, setup.device, plan.private, plan.extra)
    return plan, done
