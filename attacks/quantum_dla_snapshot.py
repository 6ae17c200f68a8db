"""The DLA-snapshot attack (Heredge et al. 2024, arXiv 2405.08801): a linear solve for the
part of the input state that the gradient sees, then the input from it.

Threat model: Kumar et al.'s (attacks/quantum_oracle.py): the server knows the circuit, its
weights theta, the observable O and the loss, and sees one client's single-example gradient
g; the label may be known or not (it is not needed). The model must encode once and then run
the ansatz (no re-uploading), so the circuit's output is f(x) = Tr(O U(theta) rho(x) U(theta)^dag)
for the encoded input state rho(x).

The maths. In the Heisenberg picture f = Tr(rho(x) O_H(theta)) with O_H = U^dag O U. Every
O_H(theta) lies in the smallest space V of Hermitian operators that contains O and is closed
under commutators with the ansatz's generators (the module of O under the dynamical Lie
algebra g; V lies in g when O does, so dim V <= dim g). With an orthonormal basis B_1..B_K of
V (Tr(B_k B_l) = delta_kl) the *snapshot* of the input is e(x)_k = Tr(rho(x) B_k): the
projection of rho(x) onto V, everything of the input that any gradient of this model can
show. Writing A_j = d O_H / d theta_j = sum_k M_jk B_k (parameter-shift, exact for Pauli
rotations: A_j = (O_H(theta + pi/2 e_j) - O_H(theta - pi/2 e_j)) / 2),

    g = c M e(x),   c = dL/df (unknown scalar; for MSE 2 (f - y)),

a linear system of d equations in K unknowns. The least-squares solve e_hat = M^+ g is the
snapshot up to the scalar c where rank M = K (the weak privacy breach), and otherwise its
part in the row space of M: one gradient shows rank M coordinates of the snapshot, and rank M
is at most the dimension of O_H's orbit under the group (dim V minus O_H's stabiliser), so
below K even for small DLAs. The input follows by matching through the module, with e(x')
computed in closed form from the encoding's matrix (no circuit):

    known label:   || 2 (s o . e(x') - y) s M e(x') - g ||^2 / ||g||^2   (s = output_scale)
    unknown label: 1 - cos^2(M e(x'), g),

which are the attack losses D of attacks/quantum_oracle.py evaluated through V, on a grid of
16 f_max points per unit and feature, the best points polished by Adam. `details` reports
dim g, dim V, rank M, whether the snapshot is determined (rank M = dim V) and e_hat / ||e_hat||.

Cost: V is built from 2^n x 2^n matrices, so up to `MAX_QUBITS` qubits; the grid has
(16 f_max)^F points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pennylane as qml
import torch
from pydantic import Field
from torch import Tensor

from fedsim.attacks.quantum_landscape import feature_grid
from fedsim.attacks.quantum_matching import QuantumAttack, QuantumAttackParams, into_domain
from fedsim.attacks.quantum_oracle import _vqc_of
from fedsim.core.attack import GradientTarget, Reconstruction
from fedsim.core.errors import UserError
from fedsim.core.registry import ATTACKS
from fedsim.models.circuits import Circuit

MAX_QUBITS = 5
"""V is spanned in the 4^n-dimensional space of 2^n x 2^n Hermitian matrices."""
INDEPENDENCE = 1e-9
"""A new commutator joins V's basis when its part outside V has at least this norm."""
RANK_TOLERANCE = 1e-8
"""Singular values of M below this fraction of the largest count as zero."""
GRID_PER_CYCLE = 16


@dataclass
class SnapshotProblem:
    """What the server computes from the circuit and the weights: V's basis (K, 2^n, 2^n),
    M (d, K), the coordinates o (K,) of O_H(theta) (so <O> = o . e(x)) and the circuit."""

    basis: Tensor
    jacobian: Tensor
    output: Tensor
    circuit: Circuit

    @classmethod
    def of(cls, circuit: Circuit, weights: Tensor) -> SnapshotProblem:
        wires = list(range(circuit.num_qubits))
        observable = _observable(circuit)
        basis = module_basis(observable, generators(circuit))
        theta = weights.detach().double().flatten()
        shifts = torch.eye(len(theta), dtype=torch.float64) * math.pi / 2
        ansatz = qml.matrix(
            lambda w: [
                circuit._ansatz_layer(w.reshape(circuit.weight_shape)[layer : layer + 1])
                for layer in range(circuit.params.layers)
            ],
            wire_order=wires,
        )
        rows = []
        for j in range(len(theta)):
            plus, minus = (torch.as_tensor(ansatz(theta + s * shifts[j])) for s in (1, -1))
            a_j = (heisenberg(observable, plus) - heisenberg(observable, minus)) / 2
            rows.append(coordinates(a_j, basis))
        output = coordinates(heisenberg(observable, torch.as_tensor(ansatz(theta))), basis)
        return cls(basis, torch.stack(rows), output, circuit)

    @property
    def rank(self) -> int:
        values = torch.linalg.svdvals(self.jacobian)
        return int((values > RANK_TOLERANCE * values.max()).sum())

    @property
    def determined(self) -> bool:
        return self.rank == len(self.basis)

    def snapshots(self, x: Tensor) -> Tensor:
        """e(x) (N, K) for inputs x (N, F): Tr(rho(x) B_k) with rho the encoded pure state."""
        wires = list(range(self.circuit.num_qubits))
        state = qml.matrix(self.circuit._encode, wire_order=wires)(x)[..., 0]  # U_enc |0>
        state = state.reshape(len(x), -1)
        return torch.einsum("ni,kij,nj->nk", state.conj(), self.basis, state).real


def _observable(circuit: Circuit) -> Tensor:
    if circuit.params.observable != "tensor_z":
        raise UserError(
            "quantum_dla_snapshot: the attack reads one output; use observable tensor_z"
        )
    wires = list(range(circuit.num_qubits))
    z = qml.prod(*(qml.PauliZ(w) for w in wires))
    return torch.as_tensor(qml.matrix(z, wire_order=wires), dtype=torch.complex128)


def generators(circuit: Circuit) -> tuple[list[Tensor], Tensor]:
    """The ansatz's generators G_j' = F_<j^dag G_j F_<j with the fixed gates F moved to the end
    (as in `Circuit.dla_dimension`), as 2^n x 2^n matrices, and the product W of all fixed
    gates: U(theta) = W V(theta) with V generated by the G_j', so O_H = V^dag (W^dag O W) V."""
    wires = list(range(circuit.num_qubits))
    symbols = np.arange(1.0, 1.0 + circuit.num_weights).reshape(circuit.weight_shape)
    tape = qml.tape.make_qscript(
        lambda w: [circuit._ansatz_layer(w[layer : layer + 1]) for layer in range(circuit.params.layers)]
    )(symbols)
    (ops,), _ = qml.transforms.decompose(tape, gate_set={"RX", "RY", "RZ", "CNOT"})
    frame = np.eye(2**circuit.num_qubits)
    found = []
    for op in ops.operations:
        if op.num_params == 0:
            frame = qml.matrix(op, wire_order=wires) @ frame
            continue
        g = qml.matrix(qml.generator(op, format="observable"), wire_order=wires)
        found.append(frame.conj().T @ g @ frame)
    return [torch.as_tensor(g, dtype=torch.complex128) for g in found], torch.as_tensor(
        frame, dtype=torch.complex128
    )


def module_basis(observable: Tensor, generators_and_frame: tuple[list[Tensor], Tensor]) -> Tensor:
    """Orthonormal basis (K, 2^n, 2^n) of V: O' = W^dag O W and its repeated commutators
    i [G_j', .] with the generators, Gram-Schmidt in the trace inner product
    <A, B> = Tr(A B) (real for Hermitian A, B)."""
    gens, frame = generators_and_frame
    start = frame.conj().T @ observable @ frame
    basis = torch.zeros(0, *start.shape, dtype=start.dtype)
    frontier = start.unsqueeze(0)
    while len(frontier):
        new = []
        for candidate in frontier:
            residual = candidate - torch.einsum("k,kij->ij", coordinates(candidate, basis).to(candidate.dtype), basis)
            norm = torch.linalg.matrix_norm(residual).item()
            if norm > INDEPENDENCE * max(1.0, torch.linalg.matrix_norm(candidate).item()):
                new.append(residual / norm)
                basis = torch.cat([basis, new[-1].unsqueeze(0)])
        if not new:
            break
        added = torch.stack(new)
        frontier = torch.cat([1j * (g @ added - added @ g) for g in gens])
    return basis


def heisenberg(observable: Tensor, unitary: Tensor) -> Tensor:
    return unitary.conj().T @ observable @ unitary


def coordinates(operator: Tensor, basis: Tensor) -> Tensor:
    """Coefficients of a Hermitian operator in V's orthonormal basis (K,)."""
    return torch.einsum("kij,ji->k", basis, operator).real


def implied_label(
    problem: SnapshotProblem, x: Tensor, observed: Tensor, scale: float, num_classes: int
) -> Tensor:
    """g = c M e(x'): c = <M e, g> / ||M e||^2 is scale * dL/df. MSE: y = f - (dL/df) / 2 with
    f = scale * o . e. Two classes read (f, -f): dL/df = 2 (p_0 - [y = 0]), so y = [c > 0]."""
    e = problem.snapshots(x.reshape(1, -1))[0]
    direction = problem.jacobian @ e
    c = float(direction @ observed / direction.square().sum().clamp_min(1e-300))
    if num_classes == 0:
        return torch.tensor([scale * float(problem.output @ e) - c / (2 * scale)])
    return torch.tensor([int(c > 0)])


@ATTACKS.register("quantum_dla_snapshot")
class QuantumDlaSnapshot(QuantumAttack):
    """Heredge et al.'s weak breach (snapshot by linear solve) and the input from the snapshot."""

    class Params(QuantumAttackParams):
        iterations: int = Field(100, ge=0, description="Adam iterations polishing the best grid points")
        refine: int = Field(8, ge=1, description="best grid points polished")
        max_points: int = Field(1_000_000, ge=1, description="refuse grids larger than this")

    params: Params

    def reconstruct(self, target: GradientTarget) -> Reconstruction:
        model = _vqc_of(target)
        circuit = model.quantum.circuit
        if circuit.params.reupload or circuit.params.noisy:
            raise UserError(
                "quantum_dla_snapshot: needs one encoding before the ansatz and a noiseless circuit; set reupload: false and no noise"
            )
        if circuit.num_qubits > MAX_QUBITS:
            raise UserError(
                f"quantum_dla_snapshot: {circuit.num_qubits} qubits, above the {MAX_QUBITS} it builds the DLA module for"
            )
        problem = SnapshotProblem.of(circuit, model.quantum.weights)
        observed = target.single_step_gradient()[0].flatten().double()
        # the minimum-norm solution, through the same rank cut as `rank`
        snapshot = torch.linalg.pinv(problem.jacobian, rtol=RANK_TOLERANCE) @ observed
        label = target.known_labels[:1].double() if self.params.labels == "known" else None
        if label is not None and target.num_classes != 0:
            raise UserError("quantum_dla_snapshot: labels: known is for regression; set labels: unknown")
        x, loss = self._invert(problem, observed, label, model.scale)
        return Reconstruction(
            images=x.float().reshape(1, *target.input_shape),
            labels=implied_label(problem, x, observed, model.scale, target.num_classes),
            attack_loss=loss,
            details={
                "period": 1.0 if circuit.params.encoding == "fourier" else None,
                "dla_dimension": circuit.dla_dimension() if circuit.num_qubits <= 4 else None,
                "module_dimension": len(problem.basis),
                "rank": problem.rank,
                "equations": len(observed),
                "snapshot_determined": problem.determined,
                "snapshot": (snapshot / snapshot.norm().clamp_min(1e-300)).tolist(),
            },
        )

    def _invert(
        self, problem: SnapshotProblem, observed: Tensor, label: Tensor | None, scale: float
    ) -> tuple[Tensor, float]:
        """The input whose predicted gradient, through the module, best matches g."""
        circuit = problem.circuit
        periodic = circuit.params.encoding == "fourier"
        points = max(2, math.ceil(GRID_PER_CYCLE * circuit.max_frequency))
        if points**circuit.features > self.params.max_points:
            raise UserError(
                f"quantum_dla_snapshot: {points}^{circuit.features} grid points, above max_points {self.params.max_points}"
            )
        def loss(x: Tensor) -> Tensor:
            e = problem.snapshots(x)
            slope = e @ problem.jacobian.T  # d<O>/dtheta at x', (N, d)
            if label is not None:
                predicted = 2 * (scale * (e @ problem.output) - label).unsqueeze(1) * scale * slope
                return (predicted - observed).square().sum(1) / observed.square().sum()
            cosine = slope @ observed / (slope.norm(dim=1) * observed.norm()).clamp_min(1e-300)
            return 1 - cosine.square()

        grid = feature_grid(points, circuit.features, periodic)
        values = torch.cat([loss(part) for part in grid.split(4096)])
        x = grid[values.topk(min(self.params.refine, len(grid)), largest=False).indices].clone()
        x.requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=0.5 / points)
        for _ in range(self.params.iterations):
            optimizer.zero_grad()
            loss(x).sum().backward()
            optimizer.step()
            with torch.no_grad():
                x.copy_(into_domain(x, 1.0 if periodic else None))
        final = loss(x.detach())
        best = int(final.argmin())
        return x.detach()[best], float(final[best])
