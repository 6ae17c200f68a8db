"""Gradient matching: the objective every gradient-inversion attack minimises, vectorised.

The honest-but-curious server holds the weights theta it sent and a client's update. An
inversion attack looks for dummy images x (and labels y) whose simulated client computation
reproduces what the server saw:

    min_x  D(sim_theta(x, y), observed) + lambda * TV(x),   x in [0, 1]^(n x C x H x W)

- `sim` is one gradient grad_theta CE(f_theta(x), y), matched against the client's mean step
  gradient -update / (lr * steps) (DLG, iDLG, IG), or the client's whole local training
  unrolled step by step, matched against the update itself (`fedsim.attacks.fedavg_inversion`).
- `D` is the squared distance sum_l ||a_l - b_l||^2 (DLG) or one minus the cosine similarity
  of all layers at once, 1 - <a, b> / (||a|| ||b||) (Geiping et al. 2020, "Inverting Gradients").
- `TV` is the anisotropic total variation mean|dx| + mean|dy| (Geiping et al.).

`MatchingProblem` evaluates D for a whole stack of dummies, T targets x R restarts, in one
call: torch.func.vmap over restarts inside vmap over targets, of functional_call and
torch.func.grad. The rows are independent, so `loss.sum().backward()` gives every row its own
gradient, and restarts cost one vectorised forward and backward, not a Python loop.

`GradientInversion` is the attack skeleton on top: it checks what the server saw, chooses
labels (inferred from the update, or known under the stronger threat model), groups
compatible targets into one problem and keeps, per target, the restart with the lowest
matching loss D; ground truth never enters.
"""

from __future__ import annotations

import copy
import math
from abc import abstractmethod
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

from fedsim.attacks.label_inference import infer_labels
from fedsim.core.attack import GradientAttack, GradientTarget, Reconstruction
from fedsim.core.errors import UserError
from fedsim.core.seeding import torch_generator

THREAT_MODEL = "honest-but-curious server (one client's update, the weights sent, lr/steps/batch size)"
KNOWN_LABELS_THREAT_MODEL = THREAT_MODEL + " + the client's labels (labels: known)"

Distance = Callable[[list[Tensor], list[Tensor]], Tensor]
Weights = dict[str, Tensor]
"""Tensors by parameter (or buffer) name, as torch.func.functional_call takes them."""


# --------------------------------------------------------------------------- losses


def soft_cross_entropy(outputs: Tensor, label_logits: Tensor) -> Tensor:
    """mean_b sum_k -softmax(z_b)_k log softmax(f(x_b))_k: cross-entropy against soft labels."""
    return (-label_logits.softmax(-1) * outputs.log_softmax(-1)).sum(-1).mean()


def label_loss(outputs: Tensor, labels: Tensor) -> Tensor:
    """The client's loss: cross-entropy against hard labels (integers) or, for float label
    logits z (DLG's joint optimisation), against the soft labels softmax(z)."""
    if labels.is_floating_point():
        return soft_cross_entropy(outputs, labels)
    return F.cross_entropy(outputs, labels)


def l2_distance(dummy: list[Tensor], observed: list[Tensor]) -> Tensor:
    """sum_l ||a_l - b_l||^2 over all layers (DLG)."""
    return sum(((a - b) ** 2).sum() for a, b in zip(dummy, observed, strict=True))


def cosine_distance(dummy: list[Tensor], observed: list[Tensor]) -> Tensor:
    """1 - <a, b> / (||a|| ||b||) with all layers taken as one vector (Geiping et al. 2020).

    Scale-free, so a wrong guess of lr or of the number of steps does not matter; 0 means
    parallel, 2 opposite.
    """
    dot = sum((a * b).sum() for a, b in zip(dummy, observed, strict=True))
    dummy_norm = sum(a.pow(2).sum() for a in dummy).sqrt()
    observed_norm = sum(b.pow(2).sum() for b in observed).sqrt()
    return 1 - dot / (dummy_norm * observed_norm).clamp_min(1e-12)


DISTANCES: dict[str, Distance] = {"l2": l2_distance, "cosine": cosine_distance}


def total_variation(images: Tensor) -> Tensor:
    """Anisotropic TV per stack of images (..., n, C, H, W): mean|x[h, w+1] - x[h, w]| +
    mean|x[h+1, w] - x[h, w]| over each stack's pixels; returns the leading shape (...)."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(-4).mean(-1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(-4).mean(-1)
    return dx + dy


# --------------------------------------------------------------------------- what was observed


def examples_used(target: GradientTarget) -> int:
    """How many distinct examples the client trained on: all of them when its steps covered
    an epoch or more, else `local_steps` batches of `batch_size`."""
    return max(1, min(target.num_examples, target.local_steps * target.batch_size))


def mean_step_gradient(target: GradientTarget) -> list[Tensor]:
    """-update / (lr * steps): the mean gradient of the client's SGD steps.

    Exact for one plain SGD step. After several steps on n examples it approximates the
    gradient of the mean loss over those n examples at the sent weights (each example seen
    equally often, weights moving little); the cosine distance is blind to the scale.
    """
    steps = max(target.local_steps, 1)
    return [-u / (target.lr * steps) for u in target.parameter_update()]


def check_target(target: GradientTarget, attack: str) -> None:
    """A one-line UserError unless the update fits the model the attack was given."""
    for name, parameter in target.model.named_parameters():
        update = target.update.get(name)
        if update is None:
            raise UserError(
                f"attack '{attack}': the update has no parameter '{name}' of the model; "
                "attack it with the architecture the client trained"
            )
        if update.shape != parameter.shape:
            raise UserError(
                f"attack '{attack}': update '{name}' has shape {tuple(update.shape)} but the "
                f"model's is {tuple(parameter.shape)}; the observation comes from another "
                "architecture: attack it with its own scenario"
            )
    if not target.lr > 0 or target.local_steps < 1:
        raise UserError(
            f"attack '{attack}': the observation records lr={target.lr}, "
            f"local_steps={target.local_steps}; both must be positive"
        )


def check_start(target: GradientTarget, count: int, attack: str) -> None:
    """A one-line UserError unless the target's `start` (if any) is `count` images of its shape."""
    if target.start is None:
        return
    expected = (count, *target.input_shape)
    if tuple(target.start.shape) != expected:
        raise UserError(
            f"attack '{attack}': the target's start has shape {tuple(target.start.shape)}; "
            f"it needs {expected} (images x input shape)"
        )


# --------------------------------------------------------------------------- the simulation


@dataclass(frozen=True)
class FunctionalModel:
    """A private copy of the target's architecture, called with explicit weights.

    BatchNorm layers are switched to batch statistics only (no running averages), which is
    what a client in training mode computes and what torch.func.vmap needs (no in-place
    buffer updates).
    """

    module: nn.Module
    buffers: Weights

    @classmethod
    def of(cls, model: nn.Module) -> FunctionalModel:
        module = copy.deepcopy(model).train()
        replace_all_batch_norm_modules_(module)
        return cls(module, {k: b.detach() for k, b in module.named_buffers()})

    def __call__(self, params: Weights, images: Tensor) -> Tensor:
        return functional_call(self.module, (params, self.buffers), (images,))

    def loss_gradient(self, params: Weights, images: Tensor, labels: Tensor) -> Weights:
        """grad_theta label_loss(f_theta(images), labels), differentiable in images/labels."""
        return grad(lambda p: label_loss(self(p, images), labels))(params)


Simulation = Callable[[FunctionalModel, Weights, Tensor, Tensor], list[Tensor]]
"""(model, weights, dummy images, labels or label logits) -> what the server would observe."""


def one_gradient(model: FunctionalModel, params: Weights, images: Tensor, labels: Tensor) -> list[Tensor]:
    """The gradient of one step on the whole dummy batch, in parameter order."""
    return list(model.loss_gradient(params, images, labels).values())


@dataclass(frozen=True)
class MatchingProblem:
    """D(sim(x), observed) for T targets of one architecture, vectorised over targets and restarts.

    `params` are the sent weights, stacked on a leading target axis when the targets come
    from different rounds (`stacked`), shared otherwise. `observed[l]` is (T, *shape_l).
    `labels` is (T, n) hard labels, or None when label logits are optimised too (DLG).
    """

    model: FunctionalModel
    params: Weights
    stacked: bool
    observed: list[Tensor]
    labels: Tensor | None
    simulate: Simulation
    distance: Distance

    @classmethod
    def build(
        cls,
        targets: list[GradientTarget],
        observe: Callable[[GradientTarget], list[Tensor]],
        labels: Tensor | None,
        simulate: Simulation,
        distance: Distance,
    ) -> MatchingProblem:
        first = targets[0].model
        device = next(first.parameters()).device
        weights = [dict(t.model.named_parameters()) for t in targets]
        stacked = any(
            not torch.equal(w[name], weights[0][name]) for w in weights[1:] for name in w
        )
        params = {
            name: (torch.stack([w[name] for w in weights]) if stacked else p).detach()
            for name, p in weights[0].items()
        }
        observed = [
            torch.stack(layer).to(device)
            for layer in zip(*(observe(t) for t in targets), strict=True)
        ]
        return cls(FunctionalModel.of(first), params, stacked, observed, labels, simulate, distance)

    def _one(self, params: Weights, observed: list[Tensor], labels: Tensor, images: Tensor) -> Tensor:
        return self.distance(self.simulate(self.model, params, images, labels), observed)

    def matching(self, images: Tensor, label_logits: Tensor | None = None) -> Tensor:
        """D per row: images (T, R, n, C, H, W), label logits (T, R, n, K) -> (T, R).

        One row (one target, one restart) is computed without vmap: the same function, but
        its double backward skips the batching rules (1.2-1.7x faster per evaluation on CPU,
        `benchmarks/breaching_parity.py`)."""
        learned = label_logits is not None
        labels = label_logits if learned else self.labels
        if images.shape[:2] == (1, 1):
            params = {name: p[0] for name, p in self.params.items()} if self.stacked else self.params
            row_labels = labels[0, 0] if learned else labels[0]
            return self._one(params, [o[0] for o in self.observed], row_labels, images[0, 0]).reshape(1, 1)
        per_restart = vmap(self._one, in_dims=(None, None, 0 if learned else None, 0), randomness="different")
        per_target = vmap(per_restart, in_dims=(0 if self.stacked else None, 0, 0, 0), randomness="different")
        return per_target(self.params, self.observed, labels, images)


# --------------------------------------------------------------------------- the attack skeleton


def random_images(targets: list[GradientTarget], restarts: int, count: int, seed: int) -> Tensor:
    """Starting images U[0, 1], (T, R, n, C, H, W); each target's own generator is seeded by
    (attack seed, round, client), so a target starts the same whichever others it is batched with.
    A target's `start`, if given, replaces its first restart."""
    stacked = []
    for t in targets:
        generator = torch_generator(seed, "images", t.server_round, t.client)
        images = torch.rand((restarts, count, *t.input_shape), generator=generator)
        if t.start is not None:
            images[0] = t.start.detach().cpu().to(images.dtype)
        stacked.append(images)
    return torch.stack(stacked)


def random_label_logits(targets: list[GradientTarget], restarts: int, count: int, seed: int) -> Tensor:
    """Starting label logits N(0, 1), (T, R, n, K), seeded per target like `random_images`."""
    return torch.stack([
        torch.randn((restarts, count, t.num_classes), generator=torch_generator(seed, "labels", t.server_round, t.client))
        for t in targets
    ])  # fmt: skip


def best_restarts(losses: Tensor) -> Tensor:
    """Per target (row of `losses`, T x R), the restart with the lowest loss; NaN counts as +inf."""
    return losses.nan_to_num(nan=math.inf).argmin(dim=1)


class InversionParams(BaseModel):
    """Settings every gradient-inversion attack shares."""

    model_config = ConfigDict(extra="forbid")

    restarts: int = Field(
        1, ge=1, description="random starts per target, optimised together; the lowest matching loss wins"
    )
    images: int | None = Field(
        None,
        ge=1,
        description="images to reconstruct; default: the examples the client trained on, "
        "min(num_examples, local_steps * batch_size)",
    )
    labels: Literal["inferred", "known"] = Field(
        "inferred",
        description="inferred: from the last layer's gradient (iDLG at one image, mean-softmax "
        "label counts for more); known: the client's true labels (a stronger threat model)",
    )
    label_scale: Literal["update", "estimated"] = Field(
        "update",
        description="label counts (more than one image) at the update's scale, or at a scale "
        "estimated from the classes absent from the batch: for clipped updates",
    )
    targets_per_batch: int = Field(
        16, ge=1, description="observations of one shape optimised together as one vectorised problem"
    )


@dataclass
class LabelChoice:
    """The labels a problem is solved with: hard labels (n,) or None (learned), and how."""

    labels: Tensor | None
    method: str


class GradientInversion(GradientAttack):
    """Skeleton of a gradient-matching attack: checks, labels, vectorised groups of targets.

    Subclasses implement `solve` for a group of compatible targets.
    """

    params: InversionParams
    needs_classes = True

    _problem: tuple[int, int] = (0, 1)
    """(index, count) of the problem `solve` is working on, within one `reconstruct_many`."""

    @property
    def threat_model(self) -> str:  # type: ignore[override]
        return KNOWN_LABELS_THREAT_MODEL if self.wants_known_labels else THREAT_MODEL

    def reconstruct(self, target: GradientTarget) -> Reconstruction:
        return self.reconstruct_many([target])[0]

    def reconstruct_many(self, targets: list[GradientTarget]) -> list[Reconstruction]:
        """Group targets that can share one problem (same shapes and local schedule) and solve
        each group of up to `targets_per_batch` at once."""
        groups: dict[Hashable, list[int]] = defaultdict(list)
        for index, target in enumerate(targets):
            check_target(target, self.name)
            check_start(target, self.image_count(target), self.name)
            groups[self.group_key(target)].append(index)
        size = self.params.targets_per_batch
        chunks = [indices[i : i + size] for indices in groups.values() for i in range(0, len(indices), size)]
        results: dict[int, Reconstruction] = {}
        for number, chunk in enumerate(chunks):
            self._problem = (number, len(chunks))
            group = [targets[i] for i in chunk]
            labels = [self.choose_labels(t) for t in group]
            results.update(zip(chunk, self.solve(group, labels), strict=True))
        return [results[index] for index in range(len(targets))]

    def report_iteration(self, done: int, total: int) -> None:
        """Progress over all problems of one `reconstruct_many`: each counts `total` iterations."""
        index, count = self._problem
        super().report_iteration(index * total + done, count * total)

    def image_count(self, target: GradientTarget) -> int:
        if self.wants_known_labels and target.known_labels is not None:
            return len(target.known_labels)
        return self.params.images or examples_used(target)

    def group_key(self, target: GradientTarget) -> Hashable:
        """Targets with equal keys are stacked into one problem."""
        shapes = tuple((n, tuple(p.shape)) for n, p in target.model.named_parameters())
        return (type(target.model), shapes, target.input_shape, self.image_count(target))

    def choose_labels(self, target: GradientTarget) -> LabelChoice:
        """Known labels (only under `labels: known`) or labels inferred from the update."""
        count = self.image_count(target)
        if self.wants_known_labels:
            if target.known_labels is None:
                raise UserError(
                    f"attack '{self.name}': labels: known but the target carries no known "
                    "labels; pass GradientTarget(known_labels=...) or set labels: inferred"
                )
            return LabelChoice(target.known_labels.long().cpu(), "known")
        generator = torch_generator(self.seed, "label-inference", target.server_round, target.client)
        labels, method = infer_labels(
            target, mean_step_gradient(target), count, generator, self.name, self.params.label_scale
        )
        return LabelChoice(labels, method)

    def observation(self, targets: list[GradientTarget]) -> tuple[Callable[[GradientTarget], list[Tensor]], Simulation]:
        """What is matched and how the dummies simulate it: by default the client's mean step
        gradient against one gradient of the whole dummy batch."""
        return mean_step_gradient, one_gradient

    @abstractmethod
    def solve(self, targets: list[GradientTarget], labels: list[LabelChoice]) -> list[Reconstruction]:
        """Reconstruct a group of targets that share one `group_key`."""


def stack_labels(choices: list[LabelChoice], device: torch.device) -> Tensor | None:
    """(T, n) hard labels of a group, or None when the labels are learned."""
    if choices[0].labels is None:
        return None
    return torch.stack([c.labels for c in choices]).to(device)


def reconstructions(
    images: Tensor,
    labels: Tensor,
    losses: Tensor,
    restart_losses: Tensor,
    choices: list[LabelChoice],
    details: dict[str, object],
) -> list[Reconstruction]:
    """One `Reconstruction` per target from the chosen restarts: images (T, n, C, H, W) in
    [0, 1], labels (T, n), their matching losses (T,) and every restart's loss (T, R)."""
    return [
        Reconstruction(
            images=images[t].detach().clamp(0, 1).cpu(),
            labels=labels[t].detach().cpu(),
            attack_loss=float(losses[t]) if math.isfinite(float(losses[t])) else math.inf,
            details={**details, "labels": choices[t].method, "restart_losses": restart_losses[t].tolist()},
        )
        for t in range(images.shape[0])
    ]
