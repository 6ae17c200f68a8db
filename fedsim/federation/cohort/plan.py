"""What a chunk of clients trains this round, derived from their secrets alone.

A `ShardRequest` names the clients (partition ids and node secrets), their start parameters
and the round's hyper-parameters; `plan_cohort` turns it into each client's data, batches and
defense steps exactly as the inline ClientApp would draw them (the batches from the client's
secret "batches" generator, a train-time defense's draws before them). Because the plan is a
function of the request, a Ray worker that trains a shard (`train_shard`) and the driver that
builds the replies derive the same one without sending generators or closures over the wire.
`train_shard` trains a shard in chunks that fit the device (`chunk_size`).
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

CUDA_MEMORY_SHARE = 0.5  # of the free GPU memory a chunk may plan for


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


def chunk_size(setup: ClientSetup, sample: LocalHyperParams) -> int:
    """Clients per chunk: the scenario's `max_clients_per_batch`, else all on CPU, else what
    fits in a share of the free CUDA memory (parameters, gradients, two optimizer moments,
    anchor and padded data per client, plus a batch of activations guessed as 8x the input, and
    under DP-SGD per-example gradients for a Poisson batch of up to twice the batch size)."""
    limit = setup.scenario.simulation.max_clients_per_batch
    if limit is not None or setup.device.type != "cuda":
        return limit or 1 << 30
    params = sum(p.numel() for p in setup.new_model().parameters()) * 4
    data = setup.data.client(0)[0]
    example = data.x[0].numel() * data.x.element_size()
    per_client = 6 * params + 2 * len(data) * example + 8 * sample.batch_size * example
    if setup.train_defenses:
        per_client += 2 * sample.batch_size * params
    free, _ = torch.cuda.mem_get_info(setup.device)
    return max(1, int(free * CUDA_MEMORY_SHARE // per_client))


def train_shard(setup: ClientSetup, request: ShardRequest) -> tuple[CohortPlan, CohortResult]:
    """Plan the shard's clients and train them on `setup.device`, `chunk_size` at a time (on
    the machine that trains them: a Ray worker bounds its own GPU's memory)."""
    model = setup.new_model().to(setup.device)
    plan = plan_cohort(setup, model, request)
    size = chunk_size(setup, request.hp)
    parts = []
    for i in range(0, len(request.pids), size):
        part = slice(i, i + size)
        private = None if plan.private is None else plan.private[part]
        extra = None if plan.extra is None else plan.extra[part]
        parts.append(
            train_cohort(
                model, request.starts[part], plan.datas[part], plan.schedules[part], request.hp, setup.device, private, extra
            )
        )
    return plan, CohortResult.concatenate(parts)
