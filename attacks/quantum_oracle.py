"""The gradient-matching objective for a `vqc` client, batched over candidate inputs.

Threat model (Kumar et al. 2023): the honest-but-curious server knows the circuit, its
weights theta, the observable and the loss, and sees the gradient g of one client step on a
single example (batch size 1, one plain SGD step, so g = -update / lr). For a candidate
input x' it computes the gradient the client would have sent, G(x'), and the distance

    known label y:   D(x') = || G(x'; y) - g ||^2 / ||g||^2
    unknown label:   D(x') = min_v || J(x')^T v - g ||^2 / ||g||^2,

where J(x') = d f(x') / d theta is the circuit's Jacobian (outputs x d). Without the label the
gradient is J^T v for the unknown loss-derivative v = dL/df (for MSE, v = 2 (f(x) - y)), so
the best v is a least-squares solve and D is the part of g outside the row space of J(x')
(for one output: 1 - cos^2 of the angle between g and grad f(x')). The solved v also gives
a label estimate.

Every candidate gets its own copy of the weights, so one broadcast circuit call gives all R
candidates' gradients (see `fedsim.models.quantum.QuantumLayer`). The circuit always runs on
default.qubit with backprop, whatever the client used: attacks differentiate the gradient
again, and adjoint differentiation gets that second derivative wrong silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from fedsim.core.attack import GradientTarget
from fedsim.core.errors import UserError
from fedsim.models.quantum import VQC

RIDGE = 1e-10
"""Tikhonov term in the least-squares solve for v: keeps J J^T invertible at flat points."""


def circular_distance(a: Tensor, b: Tensor, period: float = 1.0) -> Tensor:
    """Elementwise distance on a circle of circumference `period`: min(|a-b|, period-|a-b|)."""
    d = torch.remainder(a - b, period)
    return torch.minimum(d, period - d)


@dataclass
class Candidates:
    """Attack loss of a batch of candidate inputs and the label each one implies."""

    loss: Tensor  # (R,)
    labels: Tensor  # (R,) int64 classes, or float regression targets


class QuantumGradientOracle:
    """D(x') for a batch of candidates x' (R, F), differentiable in x' (backprop circuit).

    It holds K observed gradients at once (K targets, each with its own weights, gradient and
    label): R candidates are R / K per target, target-major, so a study can run many targets'
    restarts as one problem. An attack on one observation has K = 1.
    """

    def __init__(
        self,
        simulator: VQC,
        weights: Tensor,
        observed: Tensor,
        known_labels: Tensor | None,
        regression: bool,
    ) -> None:
        self.simulator = simulator
        self.weights = weights.detach().double()  # (K, *weight_shape)
        self.observed = observed.detach().double()  # (K, d)
        self.scale = self.observed.square().sum(1).clamp_min(1e-300)
        self.known_labels = known_labels
        self.regression = regression
        circuit = simulator.quantum.circuit
        self.num_features = circuit.features
        self.max_frequency = circuit.max_frequency
        self.period = 1.0 if circuit.params.encoding == "fourier" else None

    @classmethod
    def for_target(
        cls, target: GradientTarget, known_label: Tensor | None = None
    ) -> QuantumGradientOracle:
        """The oracle of one observed update (K = 1)."""
        model = _vqc_of(target)
        simulator = exact_simulator(model, target.num_classes)
        observed = target.single_step_gradient()[0].flatten().unsqueeze(0)
        label = None if known_label is None else known_label.double().reshape(1)
        return cls(
            simulator, model.quantum.weights.unsqueeze(0), observed, label, target.num_classes == 0
        )

    def targets(self, start: int, stop: int) -> QuantumGradientOracle:
        """The oracle of targets start..stop-1 alone."""
        return self.subset(torch.arange(start, stop))

    def subset(self, indices: Tensor) -> QuantumGradientOracle:
        """The oracle of the targets `indices` (in that order) alone."""
        labels = None if self.known_labels is None else self.known_labels[indices]
        return QuantumGradientOracle(
            self.simulator, self.weights[indices], self.observed[indices], labels, self.regression
        )

    def gradients(self, x: Tensor, create_graph: bool = False) -> Tensor:
        """Per-candidate loss gradients G(x'; y) (R, d); needs the known labels."""
        weights = self._per_candidate(self.weights, len(x)).requires_grad_(True)
        outputs = self.simulator.forward_per_example(x, weights)
        loss = self._loss(outputs, self._per_candidate(self.known_labels, len(x)))
        (grads,) = torch.autograd.grad(loss, weights, create_graph=create_graph)
        return grads.flatten(1)

    def jacobians(self, x: Tensor, create_graph: bool = False) -> tuple[Tensor, Tensor]:
        """Per-candidate outputs (R, C) and Jacobians d f / d theta (R, C, d)."""
        weights = self._per_candidate(self.weights, len(x)).requires_grad_(True)
        outputs = self.simulator.forward_per_example(x, weights)
        rows = [
            torch.autograd.grad(
                outputs[:, c].sum(), weights, create_graph=create_graph, retain_graph=True
            )[0]
            for c in range(outputs.shape[1])
        ]
        return outputs, torch.stack(rows, dim=1).flatten(2)

    def __call__(self, x: Tensor, create_graph: bool = True) -> Candidates:
        """D(x') for every candidate, and the label each candidate implies."""
        observed = self._per_candidate(self.observed, len(x))
        scale = self._per_candidate(self.scale, len(x))
        if self.known_labels is not None:
            residual = self.gradients(x, create_graph) - observed
            return Candidates(
                residual.square().sum(1) / scale, self._per_candidate(self.known_labels, len(x))
            )
        outputs, jac = self.jacobians(x, create_graph)
        gram = jac @ jac.transpose(1, 2) + RIDGE * torch.eye(jac.shape[1], dtype=jac.dtype)
        v = torch.linalg.solve(gram, (jac @ observed.unsqueeze(-1)).squeeze(-1))  # dL/df, (R, C)
        residual = observed - (jac.transpose(1, 2) @ v.unsqueeze(-1)).squeeze(-1)
        return Candidates(
            residual.square().sum(1) / scale, self._implied_labels(outputs, v).detach()
        )

    def _per_candidate(self, per_target: Tensor, count: int) -> Tensor:
        """Row k of `per_target` repeated for each of target k's count / K candidates."""
        targets = len(per_target)
        if count % targets:
            raise ValueError(f"{count} candidates do not split evenly over {targets} targets")
        return per_target.repeat_interleave(count // targets, dim=0)

    def _loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        """The client's loss summed over candidates (each candidate is its own batch of 1)."""
        if self.regression:
            return (outputs[:, 0] - labels).square().sum()
        return F.cross_entropy(outputs, labels.long(), reduction="sum")

    def _implied_labels(self, outputs: Tensor, v: Tensor) -> Tensor:
        """MSE: v = 2 (f - y), so y = f - v / 2. Cross-entropy: v = softmax - onehot(y), whose
        only negative entry is the label's."""
        if self.regression:
            return outputs[:, 0] - v[:, 0] / 2
        return v.argmin(dim=1)


def exact_simulator(model: VQC, num_classes: int) -> VQC:
    """The same vqc on exact default.qubit with backprop, in float64 (weights supplied per call)."""
    return VQC(
        model.params.simulator(), (model.quantum.circuit.features,), num_classes or 1
    ).double()


def _vqc_of(target: GradientTarget) -> VQC:
    """The target's model, if the attack's threat model covers it (a vqc, one SGD step of 1)."""
    if not isinstance(target.model, VQC):
        raise UserError(
            f"model: quantum attacks invert the gradient of model 'vqc', got {type(target.model).__name__}; "
            "use dlg/ig for classical and hybrid models"
        )
    if target.batch_size != 1 or target.local_steps != 1:
        raise UserError(
            "training: quantum attacks invert one example's gradient (Kumar et al.'s threat model); "
            f"set training.batch_size: 1 and training.local_steps: 1 (got {target.batch_size} and {target.local_steps})"
        )
    if target.optimizer != "sgd" or target.momentum or target.weight_decay:
        raise UserError(
            "training: quantum attacks read the gradient off one plain SGD step; set optimizer sgd, momentum 0, weight_decay 0"
        )
    return target.model
