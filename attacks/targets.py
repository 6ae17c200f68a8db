"""Attack targets from plain Python, without a federation run.

`from_gradient` (defined with `GradientTarget` in `fedsim.core.attack`, re-exported here) wraps a
(model, gradient, metadata) triple as the one-step update a server would have seen;
`from_local_training` runs fedsim's own client loop (`train_locally`, the
code every ClientApp runs) on a copy of the model and returns what the server would observe,
plus the examples the client actually used (for scoring only, never for the attack).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from fedsim.core.attack import GradientTarget, from_gradient
from fedsim.data.datasets import TensorData
from fedsim.core.defense import LocalTraining
from fedsim.federation.training import LocalHyperParams, train_locally

__all__ = ["from_gradient", "from_local_training"]


def from_local_training(
    model: nn.Module, data: TensorData, hp: LocalHyperParams, seed: int = 0, client: int = 0
) -> tuple[GradientTarget, TensorData]:
    """Train a copy of `model` on `data` with fedsim's client loop; return the server's view
    (sent weights, update, the hyper-parameters sent) and the examples the client used."""
    trained = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    training = LocalTraining(
        num_examples=len(data),
        batch_size=hp.batch_size,
        local_epochs=hp.local_epochs,
        local_steps=hp.local_steps or None,
        total_rounds=1,
        server_round=1,
        seed=seed,
    )
    result = train_locally(trained, data, hp, training, generator)
    sent, returned = model.state_dict(), trained.state_dict()
    update = {k: returned[k] - sent[k] for k in sent if sent[k].is_floating_point()}
    used = list(dict.fromkeys(i for batch in result.batches for i in batch))
    target = GradientTarget(
        model=copy.deepcopy(model),
        update=update,
        num_examples=result.num_examples,
        lr=hp.lr,
        local_steps=result.steps,
        batch_size=hp.batch_size,
        input_shape=tuple(data.input_shape),
        num_classes=data.num_classes,
        server_round=1,
        client=client,
        optimizer=hp.optimizer,
        momentum=hp.momentum,
        weight_decay=hp.weight_decay,
        proximal_mu=hp.proximal_mu,
    )
    return target, data.subset(used)

