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

Beyond that threat model, a client may average a batch of B examples and take S local SGD
steps (a FedAvg update). The candidate is then the n examples behind the update, x' of
shape (R, n F), and G(x') = -(theta_S - theta_0) / lr is the sum of the step gradients the
client would have taken on them, unrolled step by step (the schedule of
`fedsim.attacks.fedavg_inversion.local_schedule`: step t trains on slots [t B, (t+1) B)).
While S B <= n every step has its own examples and the unroll is exact; when the client
passes over its data more than once it reshuffled, and later epochs are approximated. An
unknown label needs one step: G is then J(x')^T v, linear in the n loss derivatives.

Where it is small, the oracle evaluates f and grad_theta f from the circuit's Fourier table
at the targets' weights (`fedsim.attacks.quantum_spectrum`), exact to float64 rounding, with
no circuit call per candidate; several local steps move the weights and always run the
circuit. There, every candidate gets its own copy of the weights, so one broadcast circuit
call gives all R candidates' gradients (see `fedsim.models.quantum.QuantumLayer`). The circuit always runs on
default.qubit with backprop, whatever the client used: attacks differentiate the gradient
again, and adjoint differentiation gets that second derivative wrong silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from fedsim.attacks.fedavg_inversion import local_schedule
from fedsim.attacks.quantum_spectrum import CircuitSpectrum
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
    labels: Tensor  # (R, n) int64 classes, or float regression targets


class QuantumGradientOracle:
    """D(x') for a batch of candidates x' (R, n F), differentiable in x' (backprop circuit).

    It holds K observed gradients at once (K targets, each with its own weights, gradient and
    labels (K, n)): R candidates are R / K per target, target-major, so a study can run many
    targets' restarts as one problem. An attack on one observation has K = 1. `schedule`
    lists each local step's (start, stop) slots of the n examples, `lr` its step size; the
    default is one step on one example (Kumar et al.).
    """

    def __init__(
        self,
        simulator: VQC,
        weights: Tensor,
        observed: Tensor,
        known_labels: Tensor | None,
        regression: bool,
        schedule: list[tuple[int, int]] | None = None,
        lr: float | None = None,
        spectrum: CircuitSpectrum | None | bool = True,
    ) -> None:
        self.simulator = simulator
        self.weights = weights.detach().double()  # (K, *weight_shape)
        self.observed = observed.detach().double()  # (K, d)
        self.scale = self.observed.square().sum(1).clamp_min(1e-300)
        self.schedule = schedule or [(0, 1)]
        if len(self.schedule) > 1 and lr is None:
            raise ValueError("several local steps need the client's lr to unroll them")
        self.lr = lr
        self.examples = max(stop for _, stop in self.schedule)
        self.known_labels = None if known_labels is None else known_labels.reshape(len(self.weights), self.examples)
        self.regression = regression
        circuit = simulator.quantum.circuit
        self.num_features = circuit.features
        self.dimension = self.examples * self.num_features
        self.max_frequency = circuit.max_frequency
        self.period = 1.0 if circuit.params.encoding == "fourier" else None
        if spectrum is True:  # tabulate (one step: the weights stay those sent)
            spectrum = CircuitSpectrum.tabulate(simulator, self.weights) if len(self.schedule) == 1 else None
        self.spectrum: CircuitSpectrum | None = spectrum or None

    @classmethod
    def for_target(
        cls, target: GradientTarget, known_labels: Tensor | None = None, batches: bool = False
    ) -> QuantumGradientOracle:
        """The oracle of one observed update (K = 1); `batches`: the attack can take a
        client's batch and several local steps, not only one example's single step."""
        model = _vqc_of(target, batches)
        schedule = local_schedule(target.num_examples, target.batch_size, target.local_steps)
        if known_labels is None and len(schedule) > 1:
            raise UserError(
                "attack labels: unknown solves one step's loss derivatives; with "
                f"training.local_steps {target.local_steps} set labels: known"
            )
        simulator = exact_simulator(model, target.num_classes)
        observed = target.single_step_gradient()[0].flatten().unsqueeze(0)  # the sum of the step gradients
        labels = None if known_labels is None else known_labels.double().reshape(1, -1)
        return cls(
            simulator,
            model.quantum.weights.unsqueeze(0),
            observed,
            labels,
            target.num_classes == 0,
            schedule,
            target.lr,
        )

    def targets(self, start: int, stop: int) -> QuantumGradientOracle:
        """The oracle of targets start..stop-1 alone."""
        return self.subset(torch.arange(start, stop))

    def subset(self, indices: Tensor) -> QuantumGradientOracle:
        """The oracle of the targets `indices` (in that order) alone."""
        labels = None if self.known_labels is None else self.known_labels[indices]
        return QuantumGradientOracle(
            self.simulator,
            self.weights[indices],
            self.observed[indices],
            labels,
            self.regression,
            self.schedule,
            self.lr,
            None if self.spectrum is None else self.spectrum.subset(indices),
        )

    def gradients(self, x: Tensor, create_graph: bool = False) -> Tensor:
        """Per-candidate G(x'; y) (R, d): the sum of the step gradients of the client's local
        steps on the candidate's examples (for one step, the loss gradient); needs the labels."""
        if self.spectrum is not None:  # one step: G = (1/n) sum_b J_b^T dL/df_b
            outputs, jacobian = self.jacobians(x)
            shape = (len(x), self.examples, -1)
            labels = self._per_candidate(self.known_labels, len(x))
            slopes = self._loss_derivative(outputs.reshape(shape), labels) / self.examples
            return (slopes.flatten(1).unsqueeze(1) @ jacobian).squeeze(1)
        count = len(x)
        examples = x.reshape(count, self.examples, self.num_features)
        labels = self._per_candidate(self.known_labels, count)
        weights = self._per_candidate(self.weights, count).requires_grad_(True)
        current, total = weights, torch.zeros_like(weights)
        for start, stop in self.schedule:
            size = stop - start
            per_example = current if size == 1 else current.repeat_interleave(size, dim=0)
            outputs = self.simulator.forward_per_example(examples[:, start:stop].reshape(-1, self.num_features), per_example)
            loss = self._loss(outputs, labels[:, start:stop].reshape(-1)) / size  # the client's batch mean
            (step,) = torch.autograd.grad(loss, current, create_graph=create_graph)
            total = total + step
            if len(self.schedule) > 1:
                current = current - self.lr * step
        return total.flatten(1)

    def jacobians(self, x: Tensor, create_graph: bool = False) -> tuple[Tensor, Tensor]:
        """Per-candidate outputs (R, n C) and Jacobians d f / d theta (R, n C, d), example-major."""
        count = len(x)
        if self.spectrum is not None:
            outputs, jacobian = self.spectrum(x.reshape(-1, self.num_features))
            return outputs.reshape(count, -1), jacobian.reshape(count, -1, jacobian.shape[-1])
        weights = self._per_candidate(self.weights, count * self.examples).requires_grad_(True)
        outputs = self.simulator.forward_per_example(x.reshape(-1, self.num_features), weights)
        rows = [
            torch.autograd.grad(
                outputs[:, c].sum(), weights, create_graph=create_graph, retain_graph=True
            )[0]
            for c in range(outputs.shape[1])
        ]
        jacobian = torch.stack(rows, dim=1).flatten(2)  # (R n, C, d)
        return outputs.reshape(count, -1), jacobian.reshape(count, -1, jacobian.shape[-1])

    def __call__(self, x: Tensor, create_graph: bool = True) -> Candidates:
        """D(x') for every candidate, and the label each candidate implies."""
        observed = self._per_candidate(self.observed, len(x))
        scale = self._per_candidate(self.scale, len(x))
        if self.known_labels is not None:
            residual = self.gradients(x, create_graph) - observed
            return Candidates(
                residual.square().sum(1) / scale, self._per_candidate(self.known_labels, len(x))
            )
        if len(self.schedule) > 1:
            raise ValueError("an unknown label is solved for over one local step only")
        outputs, jac = self.jacobians(x, create_graph)
        gram = jac @ jac.transpose(1, 2) + RIDGE * torch.eye(jac.shape[1], dtype=jac.dtype)
        # G = (1/n) sum_b J_b^T v_b = J^T u: solve for u = v / n, (R, n C)
        u = torch.linalg.solve(gram, (jac @ observed.unsqueeze(-1)).squeeze(-1))
        residual = observed - (jac.transpose(1, 2) @ u.unsqueeze(-1)).squeeze(-1)
        shape = (len(x), self.examples, -1)
        labels = self._implied_labels(outputs.reshape(shape), (u * self.examples).reshape(shape))
        return Candidates(residual.square().sum(1) / scale, labels.detach())

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

    def _loss_derivative(self, outputs: Tensor, labels: Tensor) -> Tensor:
        """dL/df per example (R, n, C) of the per-example loss `_loss` sums: MSE 2 (f - y),
        cross-entropy softmax(f) - onehot(y)."""
        if self.regression:
            return 2 * (outputs - labels.unsqueeze(-1))
        return outputs.softmax(-1) - F.one_hot(labels.long(), outputs.shape[-1]).to(outputs.dtype)

    def _implied_labels(self, outputs: Tensor, v: Tensor) -> Tensor:
        """Per example (R, n) from outputs and loss derivatives (R, n, C). MSE: v = 2 (f - y),
        so y = f - v / 2. Cross-entropy: v = softmax - onehot(y), whose only negative entry is
        the label's."""
        if self.regression:
            return outputs[..., 0] - v[..., 0] / 2
        return v.argmin(dim=-1)


def exact_simulator(model: VQC, num_classes: int) -> VQC:
    """The same vqc on exact default.qubit with backprop, in float64 (weights supplied per call)."""
    return VQC(
        model.params.simulator(), (model.quantum.circuit.features,), num_classes or 1
    ).double()


def _vqc_of(target: GradientTarget, batches: bool = False) -> VQC:
    """The target's model, if the attack's threat model covers it: a vqc trained by plain SGD,
    on one example's single step unless the attack takes `batches`."""
    if not isinstance(target.model, VQC):
        raise UserError(
            f"model: quantum attacks invert the gradient of model 'vqc', got {type(target.model).__name__}; "
            "use dlg/ig for classical and hybrid models"
        )
    if not batches and (target.batch_size != 1 or target.local_steps != 1):
        raise UserError(
            "training: this quantum attack inverts one example's gradient (Kumar et al.'s threat model); "
            f"set training.batch_size: 1 and training.local_steps: 1 (got {target.batch_size} and {target.local_steps}), "
            "or use quantum_gradient_matching / quantum_numerical, which take batches and local steps"
        )
    if target.optimizer != "sgd" or target.momentum or target.weight_decay:
        raise UserError(
            "training: quantum attacks unroll plain SGD steps; set optimizer sgd, momentum 0, weight_decay 0"
        )
    return target.model
