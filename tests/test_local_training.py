"""Local training stops with a one-line error instead of looping when no step is counted."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from fedsim.core.defense import LocalTraining, TrainTimeDefense
from fedsim.core.errors import UserError
from fedsim.data.datasets import TensorData
from fedsim.federation.training import LocalHyperParams, train_locally


class ReplacesOptimizer(TrainTimeDefense):
    """A faulty defense: hands the loop a new optimizer, so fedsim's step hook never fires."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def prepare(self, model, optimizer, loader, training, state):  # type: ignore[override]
        return model, torch.optim.SGD(model.parameters(), lr=0.1), loader


def run(data: TensorData, defenses: list[Any]) -> None:
    hp = LocalHyperParams(lr=0.1, batch_size=4, local_epochs=1, local_steps=3, optimizer="sgd",
                          momentum=0.0, weight_decay=0.0)
    training = LocalTraining(num_examples=len(data), batch_size=4, local_epochs=1, local_steps=3,
                             total_rounds=1, server_round=1, seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    train_locally(model, data, hp, training, torch.Generator().manual_seed(0), defenses,
                  [{} for _ in defenses])


def test_a_defense_that_replaces_the_optimizer_is_refused_not_looped() -> None:
    data = TensorData(torch.rand(8, 4), torch.randint(0, 2, (8,)), 2)
    with pytest.raises(UserError, match="ReplacesOptimizer.*must return an optimizer that steps"):
        run(data, [ReplacesOptimizer(ReplacesOptimizer.Params())])


def test_a_client_without_examples_is_refused_not_looped() -> None:
    empty = TensorData(torch.rand(0, 4), torch.randint(0, 2, (0,)), 2)
    with pytest.raises(UserError, match="no training examples"):
        run(empty, [])


def test_plain_training_counts_its_steps() -> None:
    data = TensorData(torch.rand(8, 4), torch.randint(0, 2, (8,)), 2)
    hp = LocalHyperParams(lr=0.1, batch_size=4, local_epochs=1, local_steps=3, optimizer="sgd",
                          momentum=0.0, weight_decay=0.0)
    training = LocalTraining(8, 4, 1, 3, 1, 1, 0)
    result = train_locally(nn.Sequential(nn.Linear(4, 2)), data, hp, training, torch.Generator().manual_seed(0))
    assert result.steps == 3 and len(result.batches) == 3
