"""Kumar et al.'s quantum setting as small reusable cases: the model, an example, and what the
server sees after a client trains on it. Shared by tests/test_quantum.py and the quantum
benchmarks (which put tests/ on their path)."""

from __future__ import annotations

import copy

import torch

from fedsim.core.attack import GradientTarget
from fedsim.core.defense import LocalTraining
from fedsim.data.datasets import TensorData
from fedsim.federation.training import LocalHyperParams, train_locally
from fedsim.models.quantum import VQC


def kumar_params(m: int, layers: int, **changes: object) -> VQC.Params:
    """Kumar et al.'s circuit: each feature on m qubits (Fourier tower, one upload), L
    hardware-efficient layers, tensor-Z readout."""
    return VQC.Params(
        encoding="fourier", qubits_per_feature=m, reupload=False, layers=layers, observable="tensor_z", **changes
    )


def fourier_vqc(m: int, layers: int, seed: int = 0, features: int = 1, **changes: object) -> VQC:
    """Kumar et al.'s model (regression) with weights drawn from torch's seed `seed`."""
    torch.manual_seed(seed)
    return VQC(kumar_params(m, layers, **changes), (features,), 1)


def random_example(seed: int, features: int = 1, examples: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ U[0, 1)^(n, F), y ~ U[-1, 1)^n."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(examples, features, generator=generator)
    return x, torch.rand(examples, generator=generator) * 2 - 1


def trained_target(
    model: VQC,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float = 0.1,
    batch_size: int = 1,
    local_steps: int = 1,
    seed: int = 0,
) -> tuple[GradientTarget, torch.Tensor]:
    """What the server sees after a client runs fedsim's local training (plain SGD, MSE) on
    (x, y) from `model`'s weights, labels included, and the examples in the order the client
    first trained on them (the order of the target's labels). `model` is left unchanged."""
    client = copy.deepcopy(model)
    hp = LocalHyperParams(
        lr=lr, batch_size=batch_size, local_epochs=1, local_steps=local_steps,
        optimizer="sgd", momentum=0.0, weight_decay=0.0,
    )  # fmt: skip
    training = LocalTraining(
        num_examples=len(y), batch_size=batch_size, local_epochs=1, local_steps=local_steps,
        total_rounds=1, server_round=1, seed=seed,
    )  # fmt: skip
    result = train_locally(client, TensorData(x, y, 0), hp, training, torch.Generator().manual_seed(seed))
    order = list(dict.fromkeys(i for batch in result.batches for i in batch))
    update = {"quantum.weights": (client.quantum.weights - model.quantum.weights).detach().clone()}
    target = GradientTarget(
        model=model, update=update, num_examples=len(y), lr=lr, local_steps=result.steps,
        batch_size=batch_size, input_shape=tuple(x.shape[1:]), num_classes=0, server_round=1,
        client=0, known_labels=y[order],
    )  # fmt: skip
    return target, x[order]


def observed_target(model: VQC, x: torch.Tensor, y: torch.Tensor, lr: float = 0.1) -> GradientTarget:
    """What the server sees after one SGD step of `model` on one example (x, y), label included."""
    return trained_target(model, x, y, lr)[0]
