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

Noise (`depolarizing` p, `amplitude_damping` gamma; only on a mixed-state device,
`default.mixed`): after every layer (its encoding, if any, and its ansatz block) every qubit
goes through the depolarising channel rho -> (1 - p) rho + p/3 (X rho X + Y rho Y + Z rho Z)
and then amplitude damping with Kraus operators [[1, 0], [0, sqrt(1 - gamma)]] and
[[0, sqrt(gamma)], [0, 0]]. PennyLane 0.45 differentiates `expval` on default.mixed through
sqrt(probabilities), which is NaN wherever a probability is exactly 0 (e.g. after a CNOT on
|00>), so with backprop (or "best", which picks it) the circuit returns its density matrix
and the Z expectations are read off its diagonal: <Z_S> = sum_i rho_ii (-1)^(bits of i in S).

Dtypes: default.qubit and default.mixed compute in complex128 and return float64 whatever the
input dtype; lightning devices compute in complex128 too, but PennyLane's torch interface
returns their values in torch's default dtype (float32). `Circuit.__call__` therefore runs
lightning devices with the default dtype set to the input's, and casts the result once to the
input's dtype (float32 models get float32 outputs, the float64 attack simulators float64).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np
import pennylane as qml
import torch
from pennylane.typing import TensorLike
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Encoding = Literal["angle", "fourier"]
Ansatz = Literal["hardware_efficient", "strongly_entangling", "basic_entangler"]
Observable = Literal["tensor_z", "per_qubit_z"]
DiffMethod = Literal["backprop", "adjoint", "parameter-shift", "best"]

WEIGHTS_PER_QUBIT_LAYER = {"hardware_efficient": 2, "strongly_entangling": 3, "basic_entangler": 1}
DLA_MAX_QUBITS = 4
"""The Lie closure is computed on 4^Nq - 1 dimensional Pauli space: cheap up to 4 qubits."""
INFORMATIVE_MAX_QUBITS = 12
"""Informative weights are found from a broadcast Jacobian, cheap up to 12 qubits."""
MIXED_STATE_DEVICES = frozenset({"default.mixed"})
"""Devices that simulate density matrices, so noise channels."""
BACKPROP_DEVICES = frozenset({"default.qubit", "default.mixed"})
INFORMATIVE_TOLERANCE = 1e-9
"""|d f / d theta_j| above this somewhere: weight j is informative (structural zeros are ~1e-16)."""


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
    depolarizing: float = Field(
        0.0, ge=0, le=1, description="depolarising strength p per qubit and layer (default.mixed)"
    )
    amplitude_damping: float = Field(
        0.0, ge=0, le=1, description="amplitude damping gamma per qubit and layer (default.mixed)"
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
        if self.diff_method == "backprop" and self.device not in BACKPROP_DEVICES:
            raise ValueError(
                f"diff_method backprop needs device default.qubit (or default.mixed); use adjoint or parameter-shift on {self.device}"
            )
        if self.noisy and self.device not in MIXED_STATE_DEVICES:
            raise ValueError(
                f"depolarizing / amplitude_damping need a mixed-state device: set device default.mixed ({self.device} simulates pure states only)"
            )
        if self.device in MIXED_STATE_DEVICES and not self.noisy:
            raise ValueError(
                f"device {self.device} adds noise only through depolarizing or amplitude_damping; set one > 0, or use default.qubit (faster, the same exact results)"
            )
        if self.shots is not None and self.diff_method in ("backprop", "adjoint"):
            raise ValueError(
                f"diff_method {self.diff_method} needs exact simulation; with shots use parameter-shift"
            )
        return self

    @property
    def noisy(self) -> bool:
        return self.depolarizing > 0 or self.amplitude_damping > 0

    def simulator(self) -> CircuitParams:
        """The same circuit, noise channels included, simulated exactly (no shots) with
        backprop on default.qubit (default.mixed when noisy): what attacks differentiate.

        Attacks need second-order gradients, which only backprop gets right (adjoint returns
        wrong ones without complaint; see shared/PAPERS.md).
        """
        device = "default.mixed" if self.noisy else "default.qubit"
        return self.model_copy(update={"device": device, "diff_method": "backprop", "shots": None})


def qubit_count(params: CircuitParams, features: int) -> int:
    return features * (params.qubits_per_feature if params.encoding == "fourier" else 1)


def weight_shape(params: CircuitParams, features: int) -> tuple[int, ...]:
    """(layers, qubits, weights per qubit and layer); BasicEntanglerLayers has no last axis."""
    shape = (params.layers, qubit_count(params, features), WEIGHTS_PER_QUBIT_LAYER[params.ansatz])
    return shape[:2] if params.ansatz == "basic_entangler" else shape


class Circuit:
    """A QNode for one (encoding, ansatz, observable, device) on `features` inputs.

    `seed` seeds the device's shot sampling (ignored without shots). `interface` is the
    PennyLane interface of the inputs and weights; fedsim's models are torch modules, other
    interfaces (e.g. "numpy", "autograd") serve checks and plain-PennyLane use.
    """

    def __init__(
        self,
        params: CircuitParams,
        features: int,
        seed: int | None = None,
        interface: str = "torch",
    ) -> None:
        self.params = params
        self.features = features
        self.interface = interface
        self.num_qubits = qubit_count(params, features)
        self.weight_shape = weight_shape(params, features)
        self.num_outputs = 1 if params.observable == "tensor_z" else self.num_qubits
        # default.mixed's expval has NaN gradients under backprop (module docstring).
        self._density_readout = params.device in MIXED_STATE_DEVICES and params.diff_method in (
            "backprop",
            "best",
        )
        self._signs = self._z_signs() if self._density_readout else None
        device = qml.device(params.device, wires=self.num_qubits, seed=seed)
        qnode = qml.QNode(
            self._circuit,
            device,
            interface=interface,
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
        uploads = p.layers if p.reupload else 1  # each upload adds its frequencies again
        if p.encoding == "fourier":
            return uploads * (p.base**p.qubits_per_feature - 1) / (p.base - 1)
        return uploads * p.angle_scale / (2 * math.pi)

    def __call__(self, x: TensorLike, weights: TensorLike) -> TensorLike:
        """Expectation values (B, num_outputs) for inputs x (B, F) in [0, 1], in x's dtype and
        `interface` (torch tensors for the models).

        `weights` is `weight_shape` (shared) or (B, *weight_shape) (one copy per example).
        """
        with self._returning(x):
            out = self._qnode(x, weights)
        if self._density_readout:  # rho (B, 2^n, 2^n) -> sum_i rho_ii sign_i per output
            diagonal = qml.math.real(qml.math.diagonal(out, axis1=-2, axis2=-1))
            out = diagonal @ qml.math.convert_like(self._signs, diagonal)
        elif isinstance(out, (list, tuple)):
            out = qml.math.stack(list(out), axis=-1)
        out = qml.math.reshape(out, (len(x), self.num_outputs))
        return qml.math.cast_like(out, x)

    @contextmanager
    def _returning(self, x: TensorLike) -> Iterator[None]:
        """Lightning results come back in torch's default dtype: make that x's for the call."""
        if self.interface != "torch" or not self.params.device.startswith("lightning"):
            yield
            return
        previous = torch.get_default_dtype()
        torch.set_default_dtype(x.dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)

    def _z_signs(self) -> np.ndarray:
        """(2^n, outputs): the eigenvalue of each output's Z observable on basis state i."""
        bits = (np.arange(2**self.num_qubits)[:, None] >> np.arange(self.num_qubits)[::-1]) & 1
        signs = 1.0 - 2.0 * bits  # column q: Z_q (wire 0 is the most significant bit)
        return signs.prod(axis=1, keepdims=True) if self.num_outputs == 1 else signs

    # ------------------------------------------------------------------ circuit body

    def _circuit(
        self, x: torch.Tensor, weights: torch.Tensor
    ) -> list | qml.measurements.ExpectationMP:
        p = self.params
        for layer in range(p.layers):
            if layer == 0 or p.reupload:
                self._encode(x)
            per_example = qml.math.ndim(weights) > len(self.weight_shape)
            self._ansatz_layer(
                weights[:, layer : layer + 1] if per_example else weights[layer : layer + 1]
            )
            self._noise()
        wires = range(self.num_qubits)
        if self._density_readout:
            return qml.density_matrix(wires=wires)
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

    def _noise(self) -> None:
        """The noise channels on every qubit, after each layer (module docstring)."""
        for q in range(self.num_qubits):
            if self.params.depolarizing:
                qml.DepolarizingChannel(self.params.depolarizing, wires=q)
            if self.params.amplitude_damping:
                qml.AmplitudeDamping(self.params.amplitude_damping, wires=q)

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

    # ------------------------------------------------------------------ informative weights

    def informative_weights(self, samples: int = 8, seed: int = 0) -> torch.Tensor:
        """Which weights can move an output: a bool mask of `weight_shape`.

        Weight j is informative when d f_c / d theta_j is nonzero for some output c at some
        of `samples` random (x, theta) pairs (x ~ U[0, 1]^F, theta ~ U[0, 2 pi)^d; seeded),
        computed exactly in float64 on `params.simulator()`. A weight whose derivative
        vanishes at generic points vanishes identically (the derivative is a trigonometric
        polynomial in x and theta), e.g. the last layer's RZ angles of the hardware-efficient
        ansatz under Z observables (RZ commutes with them, and the CNOT chain maps Z products
        to Z products). Such weights carry nothing about x in the gradient.
        """
        if self.num_qubits > INFORMATIVE_MAX_QUBITS:
            raise ValueError(
                f"informative weights are computed for at most {INFORMATIVE_MAX_QUBITS} qubits, this circuit has {self.num_qubits}"
            )
        exact = Circuit(self.params.simulator(), self.features)
        generator = torch.Generator().manual_seed(seed)
        x = torch.rand(samples, self.features, generator=generator, dtype=torch.float64)
        theta = torch.rand(samples, *self.weight_shape, generator=generator, dtype=torch.float64)
        theta = (theta * 2 * math.pi).requires_grad_(True)
        outputs = exact(x, theta)
        largest = torch.zeros(self.weight_shape, dtype=torch.float64)
        for c in range(outputs.shape[1]):
            (grads,) = torch.autograd.grad(outputs[:, c].sum(), theta, retain_graph=True)
            largest = torch.maximum(largest, grads.abs().amax(dim=0))
        return largest > INFORMATIVE_TOLERANCE

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
