"""Local training and evaluation, shared by the ClientApp, the server's test evaluation and
tests that recompute a client's update.

The hyper-parameters come from what the server sent (`LocalHyperParams.from_config`), so an
observation records exactly what the honest-but-curious server knows. Every batch carries
its example indices, so the simulation can tell the scorer which examples a client trained
on without the attacker ever seeing them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from fedsim.data import TensorData
from fedsim.defense import LocalTraining, TrainTimeDefense


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
    """Train `model` in place on `data`; train-time defenses wrap the loop's parts first."""
    model.to(device).train()
    optimizer = make_optimizer(model, hp)
    loader = make_loader(data, hp.batch_size, generator)
    for defense, state in zip(defenses, states, strict=True):
        model, optimizer, loader = defense.prepare(model, optimizer, loader, training, state)
    anchor = [p.detach().clone() for p in model.parameters()] if hp.proximal_mu else []

    total_steps = hp.steps_for(len(data))
    losses: list[float] = []
    batches: list[list[int]] = []
    while len(losses) < total_steps:
        for x, y, idx in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            output = model(x)
            loss = F.cross_entropy(output, y) if len(y) else output.sum() * 0.0
            for defense in defenses:
                extra = defense.loss(model, output, y)
                if extra is not None:
                    loss = loss + extra
            if anchor:
                loss = loss + hp.proximal_mu / 2 * sum(
                    (p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor)
                )
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            batches.append(idx.tolist())
            if len(losses) == total_steps:
                break

    metrics: dict[str, float] = {}
    for defense, state in zip(defenses, states, strict=True):
        metrics.update(defense.finish(state))
    return LocalResult(
        num_examples=len(data),
        steps=len(losses),
        mean_loss=sum(losses) / len(losses),
        metrics=metrics,
        batches=batches,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, data: TensorData, device: torch.device = torch.device("cpu")
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of `model` on `data`."""
    if len(data) == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "num-examples": 0}
    model.to(device).eval()
    loss, correct = 0.0, 0
    for start in range(0, len(data), 512):
        x = data.x[start : start + 512].to(device)
        y = data.y[start : start + 512].to(device)
        out = model(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    return {"loss": loss / len(data), "accuracy": correct / len(data), "num-examples": len(data)}
