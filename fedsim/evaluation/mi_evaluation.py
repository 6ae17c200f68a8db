"""The judge of model-inversion attacks: an evaluation classifier the attacker never sees.

Protocol (Zhang et al. 2020, "The Secret Revealer"; Wang et al. 2021, MID): an independent
classifier of a *different* architecture from the target is trained on the private data (the
federation's training examples). A reconstruction for private class c counts as a success when
this classifier recognises it as c:

    top-1 = mean_i [argmax_j E(x_i)_j = c],   top-5 = mean_i [c among the 5 largest of E(x_i)]

(top-5 is reported only when there are more than 5 private classes; otherwise it is always 1).
The zero-knowledge baseline (`zero_knowledge_image`) is the mean public image, scored alike.
KNN distance = mean_i min_{x in private class c} || phi(x_i) - phi(x) ||_2, with phi the
features that enter the evaluator's last linear layer: how close a reconstruction is to a real
private example of its class. The evaluator classifies among the private classes only (the
public classes are not among the attacker's targets).

Only the model stage (`fedsim.pipeline.model_leakage`) builds and calls this; attacks get a
`ModelTarget`, which holds no evaluator.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from fedsim.core.config import ModelSpec
from fedsim.data.datasets import FederatedData, TensorData
from fedsim.core.errors import UserError
from fedsim.models import build_model
from fedsim.models.heads import classifier_head, features_and_logits
from fedsim.core.results import atomic_write_bytes
from fedsim.federation.training import evaluate

TOP_K = 5


class EvaluationParams(BaseModel):
    """The evaluation classifier: its architecture and training."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    model: ModelSpec = Field(
        "resnet20", description="architecture; must differ from the target's (fedsim models)"
    )
    epochs: int = Field(40, ge=1, description="passes over the private training data")
    batch_size: int = Field(64, ge=1, description="mini-batch size")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")


@dataclass(frozen=True)
class InversionScore:
    """How the evaluator judges one class's reconstructions."""

    top1_accuracy: float
    top5_accuracy: float | None
    knn_distance: float
    correct: list[bool]  # per reconstruction: top-1 says the target class
    nearest: torch.Tensor  # per reconstruction: the closest private example of the class


class EvaluationClassifier:
    """A trained evaluator over the private classes, with their training examples for KNN."""

    def __init__(self, model: nn.Module, private: TensorData, classes: list[int]) -> None:
        self.model = model.eval()
        self.classes = classes
        self.private = private
        self.test_accuracy: float | None = None
        self._features_and_logits = features_and_logits(
            model, classifier_head(model, "evaluator")[1]
        )

    @torch.no_grad()
    def score(self, images: torch.Tensor, target_class: int) -> InversionScore:
        """Top-1/top-5 recognition of `images` as `target_class`, and KNN distance to it."""
        features, logits = self._features_and_logits(images)
        column = self.classes.index(target_class)
        rank = (logits > logits[:, column : column + 1]).sum(1)  # classes scored higher
        members = self.private.x[self.private.y == target_class]
        member_features, _ = self._features_and_logits(members)
        distances = torch.cdist(features, member_features)
        nearest_distance, nearest = distances.min(1)
        return InversionScore(
            top1_accuracy=(rank == 0).float().mean().item(),
            top5_accuracy=(rank < TOP_K).float().mean().item()
            if len(self.classes) > TOP_K
            else None,
            knn_distance=nearest_distance.mean().item(),
            correct=(rank == 0).tolist(),
            nearest=members[nearest],
        )


def zero_knowledge_image(public_x: torch.Tensor, input_shape: tuple[int, ...]) -> tuple[torch.Tensor, str]:
    """What an attacker who ignores the target model outputs for every private class, and its
    name: the mean of the public images it holds, or mid-grey when it holds none. Not the
    private class's mean image: that needs the private examples the attack is after. One image
    (1, *shape): the evaluator scores any number of copies of it the same."""
    if len(public_x):
        return public_x.float().mean(0, keepdim=True), "mean public image"
    return torch.full((1, *input_shape), 0.5), "mid-grey image, no public data"


def private_labels(data: TensorData, classes: list[int]) -> TensorData:
    """`data` with labels renumbered 0..len(classes)-1 in the order of `classes`."""
    lookup = torch.full((data.num_classes,), -1, dtype=torch.long)
    lookup[torch.tensor(classes)] = torch.arange(len(classes))
    return TensorData(data.x, lookup[data.y], len(classes))


def load_or_train_evaluator(
    data: FederatedData,
    params: EvaluationParams,
    target_architecture: str,
    seed: int,
    cache_dir: Path,
    console: Console,
) -> EvaluationClassifier:
    """The evaluator for this data and seed: from the cache, else trained and cached.

    Trained on every private training example (all clients' shares), tested on the private
    test split. Refuses the target's own architecture: an evaluator that shares the target's
    inductive biases would also share its blind spots and flatter the attack.
    """
    if params.model.name == target_architecture:
        raise UserError(
            f"evaluation.model: '{target_architecture}' is the target's architecture; the "
            "evaluation classifier must differ (e.g. resnet20, convnet, mlp)"
        )
    classes = data.private_classes
    train = private_labels(data.train, classes)
    test = private_labels(data.test, classes)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(params.model, data.input_shape, len(classes))
    key = hashlib.sha256(
        json.dumps(
            [data.config.model_dump(mode="json"), seed, params.model_dump(mode="json")]
        ).encode()
    ).hexdigest()[:16]
    path = Path(cache_dir) / f"evaluator-{key}.safetensors"
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        with safe_open(str(path), "pt") as handle:
            accuracy = float(handle.metadata()["test_accuracy"])
        console.print(f"evaluator: reusing {path} (private test accuracy {accuracy:.3f})")
    else:
        train_classifier(model, train, params, seed, console)
        accuracy = evaluate(model, test)["accuracy"]
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(path, save(state, {"test_accuracy": repr(accuracy)}))
        console.print(
            f"evaluator: {params.model.name} trained on {len(train)} private examples, "
            f"private test accuracy {accuracy:.3f}"
        )
    evaluator = EvaluationClassifier(model, data.train, classes)
    evaluator.test_accuracy = accuracy
    return evaluator


def train_classifier(
    model: nn.Module, train: TensorData, params: EvaluationParams, seed: int, console: Console
) -> None:
    """Plain supervised training with Adam and seeded batches, with progress.

    Each epoch drops its last partial batch (a batch of one breaks batch norm).
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr)
    model.train()
    steps_per_epoch = max(1, len(train) // params.batch_size)
    columns = (
        TextColumn("training evaluation classifier"),
        BarColumn(),
        TextColumn("epoch {task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("evaluator", total=params.epochs)
        for _ in range(params.epochs):
            order = torch.randperm(len(train), generator=generator)
            for step in range(steps_per_epoch):
                batch = order[step * params.batch_size : (step + 1) * params.batch_size]
                optimizer.zero_grad()
                F.cross_entropy(model(train.x[batch]), train.y[batch]).backward()
                optimizer.step()
            progress.update(task, advance=1)
    model.eval()
