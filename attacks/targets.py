"""Attack targets from plain Python, without a federation run.

`from_gradient` wraps a (model, gradient, metadata) triple as the one-step update a server
would have seen; `from_local_training` runs fedsim's own client loop (`train_locally`, the
code every ClientApp runs) on a copy of the model and returns what the server would observe,
plus the examples the client actually used (for scoring only, never for the attack).
"""

from __future__ import annotations

import copy
import hashlib

import torch
from torch import Tensor, nn

from fedsim.core.attack import GradientTarget
from fedsim.data.datasets import TensorData
from fedsim.core.defense import LocalTraining
from fedsim.federation.training import LocalHyperParams, train_locally


def from_gradient(
    model: nn.Module,
    gradient: list[Tensor],
    batch_size: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    lr: float = 1.0,
    *,
    client: int | None = None,
    known_labels: Tensor | None = None,
    start: Tensor | None = None,
) -> GradientTarget:
    """The target of one SGD step of size `lr` that had `gradient` (in parameter order) on
    `batch_size` images of `input_shape`; the model is copied, never changed.

    `client` is the target's identity, which seeds an attack's random starts and label
    inference (with the attack's seed); None derives it from the gradient's values, so
    different gradients start differently and the same gradient repeats. `known_labels`
    (batch_size,) are the client's labels, used by attacks with `labels: known`. `start`
    (batch_size, C, H, W) in [0, 1] is where image-space gradient attacks begin their first
    restart (see `GradientTarget.start`).
    """
    named = [name for name, _ in model.named_parameters()]
    update = {name: -lr * g.detach() for name, g in zip(named, gradient, strict=True)}
    update |= {name: torch.zeros_like(b) for name, b in model.named_buffers() if b.is_floating_point()}
    return GradientTarget(
        model=copy.deepcopy(model),
        update=update,
        num_examples=batch_size,
        lr=lr,
        local_steps=1,
        batch_size=batch_size,
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        server_round=1,
        client=gradient_identity(gradient) if client is None else client,
        known_labels=known_labels,
        start=start,
    )


def gradient_identity(gradient: list[Tensor]) -> int:
    """A stable non-negative int from the gradient's values (31 bits of their SHA-256)."""
    digest = hashlib.sha256()
    for g in gradient:
        digest.update(g.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest()[:4], "little") >> 1


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

