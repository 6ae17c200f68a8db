"""Variational quantum circuits as PennyLane QNodes: encoding, ansatz, observable, device.

A `Circuit` maps a batch of feature vectors x in [0, 1]^F and circuit weights to expectation
values. Both x and the weights may carry a leading batch dimension (PennyLane parameter
broadcasting), so one call simulates a whole batch; per-example weights of shape
(B, *weight_shape) give every example its own copy of the weights, which is how the
per-example gradients for DP-SGD and the batched attack restarts are computed.

Encodings (feature j of F):
- `angle`: RX(angle_scale * x_j) on qubit j, so F qubits; with `reupload` the encoding is
  repeated before every ansatz layer (data re-uploading).
- `fourier` (the "Fourier tower" of Kumar et al. 2023): RX(base^(k-1) * 2 pi * x_j) on qubit
  j*m + k - 1 for k = 1..m, so F*m qubits. One feature's expectation value is then a
  trigonometric polynomial in x_j whose frequencies are the sums s_1 + s_2 base + ... with
  s_k in {-1, 0, 1}, up to (base^m - 1) / (base - 1) cycles per unit of x (`max_frequency`).

Ansätze, any depth L: `hardware_efficient` (RY, RZ on every qubit, then a CNOT chain;
d = 2 L Nq weights), PennyLane's `strongly_entangling` (d = 3 L Nq) and `basic_entangler`
(d = L Nq). Observables: `tensor_z` (one output, Z x Z x ... x Z) or `per_qubit_z` (Nq outputs).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pennylane as qml
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Encoding = Literal["angle", "fourier"]
Ansatz = Literal["hardware_efficient", "strongly_entangling", "basic_entangler"]
Observable = Literal["tensor_z", "per_qubit_z"]
DiffMethod = Literal["backprop", "adjoint", "parameter-shift", "best"]

WEIGHTS_PER_QUBIT_LAYER = {"hardware_efficient": 2, "strongly_entangling": 3, "basic_entangler": 1}
DLA_MAX_QUBITS = 4
"""The Lie closure is computed on 4^Nq - 1 dimensional Pauli space: cheap up to 4 qubits."""


class CircuitParams(BaseModel):
    """The circuit settings shared by the `vqc` and `hybrid` models."""

    model_config = ConfigDict(extra="forbid")

    encoding: Encoding = Field(
        "angle", description="angle (one qubit per feature) or fourier (m qubits per feature)"
    )
    reupload: bool = Field(
        True, description="repeat the encoding before every ansatz layer (data re-uploading)"
    )
    angle_scale: float = Field(math.pi, gt=0, description="angle encoding: RX(angle_scale * x)")
    qubits_per_feature: int = Field(
        3, ge=1, le=12, description="fourier encoding: m, qubits per feature"
    )
    base: int = Field(
        5, ge=2, description="fourier encoding: RX(base^(k-1) * 2 pi * x) on the k-th qubit"
    )
    ansatz: Ansatz = Field(
        "hardware_efficient",
        description="trainable layers: hardware_efficient, strongly_entangling, basic_entangler",
    )
    layers: int = Field(2, ge=1, le=100, description="ansatz depth L")
    observable: Observable = Field(
        "per_qubit_z", description="tensor_z (one output) or per_qubit_z (one per qubit)"
    )
    device: str = Field(
        "default.qubit",
        description="PennyLane device name (default.qubit, lightning.qubit, lightning.gpu, ...)",
    )
    diff_method: DiffMethod = Field(
        "backprop", description="how PennyLane differentiates (backprop needs default.qubit)"
    )
    shots: int | None = Field(
        None, ge=1, description="finite shots (shot noise); null = exact expectation values"
    )

    @field_validator("device")
    @classmethod
    def _installed(cls, name: str) -> str:
        if name not in qml.plugin_devices:
            raise ValueError(
                f"PennyLane device '{name}' is not installed; installed: "
                f"{', '.join(sorted(d for d in qml.plugin_devices if d.endswith('qubit')))}"
            )
        return name

    @model_validator(mode="after")
    def _compatible(self) -> CircuitParams:
        if self.diff_method == "backprop" and self.device != "default.qubit":
            raise ValueError(
                f"diff_method backprop needs device default.qubit; use adjoint or parameter-shift on {self.device}"
            )
        if self.shots is not None and self.diff_method in ("backprop", "adjoint"):
            raise ValueError(
                f"diff_method {self.diff_method} needs exact simulation; with shots use parameter-shift"
            )
        return self

    def simulator(self) -> CircuitParams:
        """The same circuit on exact default.qubit with backprop: what attacks differentiate.

        Attacks need second-order gradients, which only backprop gets right (adjoint returns
        wrong ones without complaint; see shared/PAPERS.md).
        """
        return self.model_copy(
            update={"device": "default.qubit", "diff_method": "backprop", "shots": None}
        )


def qubit_count(params: CircuitParams, features: int) -> int:
    return features * (params.qubits_per_feature if params.encoding == "fourier" else 1)


def weight_shape(params: CircuitParams, features: int) -> tuple[int, ...]:
    """(layers, qubits, weights per qubit and layer); BasicEntanglerLayers has no last axis."""
    shape = (params.layers, qubit_count(params, features), WEIGHTS_PER_QUBIT_LAYER[params.ansatz])
    return shape[:2] if params.ansatz == "basic_entangler" else shape


class Circuit:
    """A QNode for one (encoding, ansatz, observable, device) on `features` inputs.

    `seed` seeds the device's shot sampling (ignored without shots).
    """

    def __init__(self, params: CircuitParams, features: int, seed: int | None = None) -> None:
        self.params = params
        self.features = features
        self.num_qubits = qubit_count(params, features)
        self.weight_shape = weight_shape(params, features)
        self.num_outputs = 1 if params.observable == "tensor_z" else self.num_qubits
        device = qml.device(params.device, wires=self.num_qubits, seed=seed)
        qnode = qml.QNode(
            self._circuit,
            device,
            interface="torch",
            diff_method=params.diff_method,
            shots=params.shots,
        )
        # Parameter-shift cannot differentiate broadcast tapes: split them into one per example.
        self._qnode = (
            qml.transforms.broadcast_expand(qnode) if params.diff_method != "backprop" else qnode
        )

    @property
    def num_weights(self) -> int:
        """d, the number of trainable circuit parameters."""
        return math.prod(self.weight_shape)

    @property
    def max_frequency(self) -> float:
        """Highest frequency (cycles per unit of one feature) of the model output in x_j."""
        p = self.params
        if p.encoding == "fourier":
            return (p.base**p.qubits_per_feature - 1) / (p.base - 1)
        uploads = p.layers if p.reupload else 1
        return uploads * p.angle_scale / (2 * math.pi)

    def __call__(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Expectation values (B, num_outputs) for inputs x (B, F) in [0, 1].

        `weights` is `weight_shape` (shared) or (B, *weight_shape) (one copy per example).
        """
        out = self._qnode(x, weights)
        out = (
            torch.stack(list(out), dim=-1) if isinstance(out, (list, tuple)) else out.unsqueeze(-1)
        )
        return out.reshape(len(x), self.num_outputs).to(x.dtype)

    # ------------------------------------------------------------------ circuit body

    def _circuit(
        self, x: torch.Tensor, weights: torch.Tensor
    ) -> list | qml.measurements.ExpectationMP:
        p = self.params
        for layer in range(p.layers):
            if layer == 0 or p.reupload:
                self._encode(x)
            layer_axis = weights.dim() - len(self.weight_shape)  # 1 with per-example weights
            self._ansatz_layer(weights.narrow(layer_axis, layer, 1))
        wires = range(self.num_qubits)
        if p.observable == "tensor_z":
            return qml.expval(qml.prod(*(qml.PauliZ(w) for w in wires)))
        return [qml.expval(qml.PauliZ(w)) for w in wires]

    def _encode(self, x: torch.Tensor) -> None:
        p = self.params
        for j in range(self.features):
            if p.encoding == "angle":
                qml.RX(p.angle_scale * x[..., j], wires=j)
                continue
            m = p.qubits_per_feature
            for k in range(m):
                qml.RX(p.base**k * 2 * math.pi * x[..., j], wires=j * m + k)

    def _ansatz_layer(self, weights: torch.Tensor) -> None:
        """One layer of the ansatz; `weights` keeps a length-1 layer axis."""
        wires = list(range(self.num_qubits))
        if self.params.ansatz == "strongly_entangling":
            qml.StronglyEntanglingLayers(weights, wires=wires)
        elif self.params.ansatz == "basic_entangler":
            qml.BasicEntanglerLayers(weights, wires=wires)
        else:
            for q in wires:
                qml.RY(weights[..., 0, q, 0], wires=q)
                qml.RZ(weights[..., 0, q, 1], wires=q)
            for q in wires[:-1]:
                qml.CNOT(wires=[q, q + 1])

    # ------------------------------------------------------------------ Lie algebra

    def dla_dimension(self) -> int:
        """Dimension of the dynamical Lie algebra of the ansatz (encoding left out).

        The ansatz is U = prod_j V_j exp(-i theta_j G_j) with fixed gates V_j (CNOTs). Moving
        every fixed gate to the end conjugates each generator by the fixed gates before it,
        G_j' = W_j^dagger G_j W_j, and the DLA is the Lie closure of {i G_j'}. Computed on
        Pauli sentences, for at most `DLA_MAX_QUBITS` qubits.
        """
        if self.num_qubits > DLA_MAX_QUBITS:
            raise ValueError(
                f"the DLA is computed for at most {DLA_MAX_QUBITS} qubits, this circuit has {self.num_qubits}"
            )
        symbols = np.arange(1.0, 1.0 + self.num_weights).reshape(self.weight_shape)
        tape = qml.tape.make_qscript(
            lambda w: [
                self._ansatz_layer(w[layer : layer + 1]) for layer in range(self.params.layers)
            ]
        )(symbols)
        (ops,), _ = qml.transforms.decompose(tape, gate_set={"RX", "RY", "RZ", "CNOT"})
        wires = list(range(self.num_qubits))
        frame = np.eye(2**self.num_qubits)
        generators = []
        for op in ops.operations:
            if op.num_params == 0:
                frame = qml.matrix(op, wire_order=wires) @ frame
                continue
            g = qml.matrix(qml.generator(op, format="observable"), wire_order=wires)
            generators.append(
                qml.pauli_decompose(frame.conj().T @ g @ frame, wire_order=wires, pauli=True)
            )
        return len(qml.lie_closure(generators, pauli=True))
