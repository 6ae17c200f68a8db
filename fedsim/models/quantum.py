"""Quantum models: a pure variational quantum circuit (`vqc`) and a `hybrid` network.

Both are ordinary `nn.Module`s built as `Model(params, input_shape, num_classes)`, so they
train in the Flower simulation like any classical model. The circuit (encoding, ansatz,
observable, PennyLane device, diff method, shots) is described by
`fedsim.models.circuits.CircuitParams`; its weights live in one `QuantumLayer` parameter,
initialised uniformly in [0, 2 pi) as in Kumar et al. 2023.

Outputs: `num_classes` logits, or one value for a regression dataset (built with
num_classes 1). The pure `vqc` reads them straight off the circuit, scaled by
`output_scale`: the first `num_classes` per-qubit <Z_q>, or, with the single `tensor_z`
output, (e, -e) for two classes and e for regression.

Every model reports its circuit size: `num_qubits`, d = `circuit_parameters`, the number of
informative weights d_inf (those whose gradient is not identically zero,
`Circuit.informative_weights`) and whether it is over-parameterised in Kumar et al.'s sense,
counted on informative weights: d_inf >= 4 Nq (a weight with identically zero gradient adds
a parameter but no information, e.g. the last layer's RZ angles of the hardware-efficient
ansatz). `dla_dimension()` gives the dimension of the ansatz's dynamical Lie algebra for small
circuits. The first model of each configuration in a process logs these once.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence

import torch
from pydantic import Field
from torch import nn

from fedsim.core.errors import UserError
from fedsim.models.circuits import (
    INFORMATIVE_MAX_QUBITS,
    Circuit,
    CircuitParams,
    qubit_count,
    weight_shape,
)
from fedsim.models.classical import MLP, Activation
from fedsim.core.registry import MODELS

log = logging.getLogger("fedsim")
MAX_QUBITS = 20
"""State-vector simulation doubles in memory and time with every qubit; 20 is ~16 MB a state."""
OVERPARAMETERISED_FACTOR = 4
"""Kumar et al. call a circuit over-parameterised when d >= 4 Nq."""

_described: set[str] = set()


class QuantumLayer(nn.Module):
    """The circuit's weights as one `nn.Parameter`, and the circuit that uses them.

    `self.circuit(x, weights)` also accepts per-example weights (B, *weight_shape): the
    per-example gradients of a loss are then its gradient with respect to them, from one
    broadcast circuit call. DP-SGD's grad sampler (`defenses/quantum_grad_sampler.py`) and the
    attacks use it; they call the circuit, not the module, so Opacus's hooks do not fire.
    """

    def __init__(self, params: CircuitParams, features: int) -> None:
        super().__init__()
        qubits = qubit_count(params, features)
        if qubits > MAX_QUBITS:
            raise UserError(
                f"model: {features} features need {qubits} qubits, above the {MAX_QUBITS} fedsim "
                "simulates; reduce the features (e.g. data.dataset.features for digits) or use "
                "model 'hybrid' with fewer quantum_features"
            )
        self.weights = nn.Parameter(torch.rand(weight_shape(params, features)) * 2 * math.pi)
        # Shot noise draws from the device's own generator, seeded from torch's (after the
        # weights), so that torch.manual_seed fixes it like every other random number.
        seed = int(torch.randint(2**31 - 1, ())) if params.shots else None
        self.circuit = Circuit(params, features, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.circuit(x, self.weights)


class QuantumModel(nn.Module):
    """What the `vqc` and `hybrid` models share: one quantum layer and its size report."""

    quantum: QuantumLayer

    @property
    def num_qubits(self) -> int:
        return self.quantum.circuit.num_qubits

    @property
    def circuit_parameters(self) -> int:
        """d, the number of trainable circuit weights."""
        return self.quantum.circuit.num_weights

    @functools.cached_property
    def informative_parameters(self) -> int | None:
        """d_inf, the weights whose gradient is not identically zero (None above
        `INFORMATIVE_MAX_QUBITS` qubits, where it is not computed)."""
        if self.num_qubits > INFORMATIVE_MAX_QUBITS:
            return None
        return int(self.quantum.circuit.informative_weights().sum())

    @property
    def overparameterised(self) -> bool | None:
        """d_inf >= 4 Nq (None where d_inf is not computed)."""
        informative = self.informative_parameters
        if informative is None:
            return None
        return informative >= OVERPARAMETERISED_FACTOR * self.num_qubits

    def dla_dimension(self) -> int:
        """Dimension of the ansatz's dynamical Lie algebra (at most 4 qubits)."""
        return self.quantum.circuit.dla_dimension()

    def _describe_once(self, name: str, params: CircuitParams) -> None:
        key = f"{name}:{params.model_dump_json()}:{self.num_qubits}"
        if key in _described:
            return
        _described.add(key)
        verdict = {True: "over", False: "under", None: "not checked"}[self.overparameterised]
        log.info(
            "%s: %d qubits, d = %d circuit weights, %s informative (%s-parameterised: 4 Nq = %d), "
            "%s encoding, %s x %d, device %s, diff %s, shots %s, depolarizing %s, "
            "amplitude damping %s",
            name,
            self.num_qubits,
            self.circuit_parameters,
            self.informative_parameters,
            verdict,
            4 * self.num_qubits,
            params.encoding,
            params.ansatz,
            params.layers,
            params.device,
            params.diff_method,
            params.shots,
            params.depolarizing,
            params.amplitude_damping,
        )


@MODELS.register("vqc")
class VQC(QuantumModel):
    """Pure variational quantum circuit: features -> encoding -> ansatz -> <Z> outputs."""

    class Params(CircuitParams):
        output_scale: float = Field(
            1.0, gt=0, description="outputs (logits) = output_scale * expectation values"
        )

    def __init__(self, params: Params, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.params = params
        self.quantum = QuantumLayer(params, math.prod(input_shape))
        self.scale = params.output_scale
        self.num_classes = num_classes
        outputs = self.quantum.circuit.num_outputs
        if num_classes > outputs and not (outputs == 1 and num_classes == 2):
            raise UserError(
                f"model.observable: vqc has {outputs} output(s) but the data has {num_classes} "
                "classes; use observable per_qubit_z with at least as many qubits as classes, "
                "or model 'hybrid'"
            )
        self._describe_once("vqc", params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs (B, num_classes) for inputs x in [0, 1]."""
        return self.readout(self.quantum(x.flatten(1)))

    def forward_per_example(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Outputs when example i uses its own weights `weights[i]` (see QuantumLayer)."""
        return self.readout(self.quantum.circuit(x.flatten(1), weights))

    def readout(self, expectations: torch.Tensor) -> torch.Tensor:
        values = self.scale * expectations
        if values.shape[1] == 1 and self.num_classes == 2:
            return torch.cat([values, -values], dim=1)
        return values[:, : self.num_classes]


@MODELS.register("hybrid")
class Hybrid(QuantumModel):
    """Classical layers -> quantum layer -> linear head (any input shape, any class count)."""

    class Params(CircuitParams):
        quantum_features: int = Field(
            4,
            ge=1,
            description="classical outputs encoded into the circuit (qubits for angle encoding)",
        )
        hidden: list[int] = Field(
            default_factory=list, description="classical hidden layer widths before the circuit"
        )
        activation: Activation = Field(
            "relu", description="activation after each classical hidden layer"
        )

    def __init__(self, params: Params, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        # The classical part ends in a sigmoid: the circuit's encodings expect inputs in [0, 1].
        encoder = MLP(
            MLP.Params(hidden=params.hidden, activation=params.activation),
            input_shape,
            params.quantum_features,
        )
        self.encoder = nn.Sequential(encoder, nn.Sigmoid())
        self.quantum = QuantumLayer(params, params.quantum_features)
        self.head = nn.Linear(self.quantum.circuit.num_outputs, num_classes)
        self._describe_once("hybrid", params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.quantum(self.encoder(x)))
