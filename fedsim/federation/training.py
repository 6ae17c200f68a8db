"""Local training and evaluation, shared by the ClientApp, the server's test evaluation and
tests that recompute a client's update.

The hyper-parameters come from what the server sent (`LocalHyperParams.from_config`), so an
observation records exactly what the honest-but-curious server knows. Every batch carries
its example indices, so the simulation can tell the scorer which examples a client trained
on without the attacker ever seeing them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsim.data.datasets import TensorData
from fedsim.core.defense import LocalTraining, TrainTimeDefense
from fedsim.core.errors import UserError


@dataclass(frozen=True)
class LocalHyperParams:
    """Local training settings as sent in the train message's ConfigRecord."""

    lr: float
    batch_size: int
    local_epochs: int
    local_steps: int  # 0 = run `local_epochs` epochs
    optimizer: str
    momentum: float
    weight_decay: float
    proximal_mu: float = 0.0

    def to_config(self) -> dict[str, Any]:
        return {f"fedsim.{k}": v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LocalHyperParams:
        values = {k: config[f"fedsim.{k}"] for k in cls.__dataclass_fields__ if f"fedsim.{k}" in config}
        if "proximal-mu" in config:  # sent by Flower's FedProx
            values["proximal_mu"] = float(config["proximal-mu"])
        return cls(**values)

    def steps_for(self, num_examples: int) -> int:
        """Local steps a client with `num_examples` examples takes (expected, under Poisson)."""
        if self.local_steps:
            return self.local_steps
        return self.local_epochs * max(1, -(-num_examples // self.batch_size))


class SquaredError(nn.MSELoss):
    """Mean squared error of a one-output model (B, 1) against float targets (B,)."""

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(output.reshape(target.shape), target)


def task_criterion(data: TensorData) -> nn.Module:
    """The task's loss, driven by the dataset: MSE for regression (float targets,
    num_classes 0), cross-entropy for class labels."""
    return SquaredError() if data.is_regression else nn.CrossEntropyLoss()


@dataclass
class LocalResult:
    """What local training produced, besides the weights."""

    num_examples: int
    steps: int
    mean_loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    batches: list[list[int]] = field(default_factory=list)


def make_optimizer(model: nn.Module, hp: LocalHyperParams) -> torch.optim.Optimizer:
    if hp.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
    )


def proximal_pull(optimizer: torch.optim.Optimizer, mu: float) -> Callable[..., None]:
    """FedProx's proximal term mu/2 ||w - w_global||^2, as a hook run before every step.

    The term reads no example, so its gradient mu (w - w_global) is added to the parameters'
    gradients just before the optimizer steps, after any train-time defense made the data
    gradient private: Opacus replaces the gradient with its clipped, noised sum, which would
    drop a term added to the loss, and adding it afterwards costs no privacy.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    anchor = [p.detach().clone() for p in params]

    @torch.no_grad()
    def pull(*_: Any) -> None:
        for param, start in zip(params, anchor):
            if param.grad is not None:
                param.grad.add_(param - start, alpha=mu)

    return pull


def make_loader(data: TensorData, batch_size: int, generator: torch.Generator) -> DataLoader:
    """Shuffled batches of (x, y, example index), reproducible from `generator`."""
    indices = torch.arange(len(data))
    dataset = TensorDataset(data.x, data.y, indices)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


def train_locally(
    model: nn.Module,
    data: TensorData,
    hp: LocalHyperParams,
    training: LocalTraining,
    generator: torch.Generator,
    defenses: list[TrainTimeDefense] = (),
    states: list[dict[str, Any]] = (),
    device: torch.device = torch.device("cpu"),
) -> LocalResult:
    """Train `model` in place on `data`; train-time defenses wrap the loop's parts first.

    A step is one update of the weights, counted by a hook on the plain optimizer: under
    Opacus's BatchMemoryManager several physical batches make one logical batch and only the
    last of them steps, so `steps` and the recorded `batches` are logical ones.
    """
    if len(data) == 0:
        raise UserError("a client has no training examples; give every client data (data.partitioner) or use fewer clients")
    model.to(device).train()
    optimizer = make_optimizer(model, hp)
    steps = 0

    def count_step(*_: Any) -> None:
        nonlocal steps
        steps += 1

    optimizer.register_step_post_hook(count_step)
    if hp.proximal_mu:
        optimizer.register_step_pre_hook(proximal_pull(optimizer, hp.proximal_mu))
    loader = make_loader(data, hp.batch_size, generator)
    for defense, state in zip(defenses, states, strict=True):
        model, optimizer, loader = defense.prepare(model, optimizer, loader, training, state)
    criterion: Callable[[Any, torch.Tensor], Any] = task_criterion(data)
    for defense in defenses:
        criterion = defense.criterion(criterion)

    total_steps = hp.steps_for(len(data))
    losses: list[float] = []
    batches: list[list[int]] = []
    logical_batch: list[int] = []
    while steps < total_steps:
        steps_before_pass = steps
        for x, y, idx in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            output = model(x)
            loss = criterion(output, y) if len(y) else output.sum() * 0.0
            for defense in defenses:
                extra = defense.loss(model, output, y)
                if extra is not None:
                    loss = loss + extra
            loss.backward()
            steps_before = steps
            optimizer.step()
            losses.append(float(loss.detach()))
            logical_batch.extend(idx.tolist())
            if steps > steps_before:
                batches.append(logical_batch)
                logical_batch = []
            if steps == total_steps:
                break
        if steps == steps_before_pass:
            raise UserError(no_step_message(len(data), defenses))

    metrics: dict[str, float] = {}
    for defense, state in zip(defenses, states, strict=True):
        metrics.update(defense.finish(state))
    return LocalResult(
        num_examples=len(data),
        steps=steps,
        mean_loss=sum(losses) / len(losses),
        metrics=metrics,
        batches=batches,
    )


def no_step_message(num_examples: int, defenses: list[TrainTimeDefense]) -> str:
    """Why a pass over the client's data counted no step (it would loop for ever)."""
    names = ", ".join(type(d).__name__ for d in defenses) or "none"
    return (
        f"local training counted no optimizer step in a whole pass over {num_examples} examples "
        f"(train-time defenses: {names}); a defense's `prepare` must return an optimizer that "
        "steps the one it was given (wrap it, as Opacus does), not a replacement"
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, data: TensorData, device: torch.device = torch.device("cpu")
) -> dict[str, float]:
    """Mean task loss and accuracy of `model` on `data`.

    For regression the loss is the MSE and "accuracy" is R^2 = 1 - MSE / Var(y) (1: perfect,
    0: no better than predicting the mean), so utility stays higher-is-better everywhere.
    """
    if len(data) == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "num-examples": 0}
    model.to(device).eval()
    criterion = task_criterion(data)
    criterion.reduction = "sum"
    loss, correct = 0.0, 0
    # A model that samples at prediction (MID) draws from a fixed seed, so the score depends
    # on the model and the data only, not on what ran before (e.g. the order clients trained).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        for start in range(0, len(data), 512):
            x = data.x[start : start + 512].to(device)
            y = data.y[start : start + 512].to(device)
            out = model(x)
            loss += float(criterion(out, y))
            if not data.is_regression:
                correct += int((out.argmax(1) == y).sum())
    mean_loss = loss / len(data)
    if data.is_regression:
        score = 1 - mean_loss / float(data.y.var(correction=0).clamp_min(1e-12))
    else:
        score = correct / len(data)
    return {"loss": mean_loss, "accuracy": score, "num-examples": len(data)}
