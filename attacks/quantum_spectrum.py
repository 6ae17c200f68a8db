"""A circuit at fixed weights as the trigonometric polynomial it is in its inputs.

Every encoding gate is RX(a x_j), so an expectation value f(x; theta) and each of its weight
derivatives d f / d theta_i is a trigonometric polynomial in every feature x_j with the
frequencies k omega, |k| <= K (omega cycles per unit of x; K from the encoding,
`spectrum_size`). At the attack's fixed weights, sampling f and grad_theta f once on a grid of
N = 2 K + 1 points per feature over one period 1 / omega determines them everywhere (a band-
limited signal sampled at its Nyquist rate), and the discrete Fourier transform gives the
coefficients:

    f(x) = Re sum_k c_k exp(2 pi i omega k . x),   c = FFT(samples) / N^F.

After that an attack evaluates f, grad_theta f and their derivatives in x from the
coefficients, with no circuit call and no second-order autograd through the simulator. The
table has N^F (C (1 + d)) coefficients per target (C outputs, d weights), so it is built only
where that is small (`MAX_ENTRIES`, `MAX_FREQUENCY_VECTORS`); otherwise the oracle runs the
circuit.

Example: at m = 3 qubits per feature (K = 31, N = 63) and L = 4 layers (d = 24), one feature's
table is 63 x 25 numbers; 1000 restarts cost one (1000 x 63) @ (63 x 25) product per step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedsim.models.quantum import VQC

MAX_ENTRIES = 1 << 23
"""Complex coefficients (targets x N^F x C (1 + d)) above which the circuit is run instead."""

MAX_FREQUENCY_VECTORS = 4096
"""N^F above which the circuit is run instead: a candidate costs N^F C (1 + d) products from
the table, against a statevector of 2^qubits amplitudes through the circuit (N grows like
5^m, the statevector like 2^m), so for m = 6 (N = 7813) the circuit is the cheaper one."""

BASIS_CHUNK = 1 << 22
"""Candidates x N^F complex basis entries evaluated at once (64 MiB)."""

TABULATION_CHUNK = 8192
"""Grid points per circuit call while tabulating."""


def spectrum_size(simulator: VQC) -> tuple[float, int]:
    """(omega, K): the base frequency in cycles per unit of x and the highest multiple of it.

    RX(phi) puts phases e^(+-i phi / 2) on the amplitudes, so e^(+-i phi) and 1 on an
    expectation. Fourier tower RX(base^k 2 pi x), k < m: frequencies sum_k s_k base^k with
    s_k in {-1, 0, 1}, so omega = 1 and K = (base^m - 1) / (base - 1) per upload. Angle
    RX(a x): omega = a / (2 pi), K = 1 per upload. Re-uploading before each of the L layers
    multiplies K by L.
    """
    p = simulator.quantum.circuit.params
    uploads = p.layers if p.reupload else 1
    if p.encoding == "fourier":
        return 1.0, uploads * (p.base**p.qubits_per_feature - 1) // (p.base - 1)
    return p.angle_scale / (2 * math.pi), uploads


class CircuitSpectrum:
    """f and grad_theta f of K targets' circuits (each at its own weights) as Fourier
    coefficients: `coefficients` (K, N^F, C, 1 + d) complex, entry [..., 0] for f."""

    def __init__(self, coefficients: Tensor, omega: float, frequencies: Tensor, features: int) -> None:
        self.coefficients = coefficients
        self.omega = omega
        self.frequencies = frequencies  # (N,) the integer multiples k, in FFT order
        self.features = features

    @classmethod
    def tabulate(cls, simulator: VQC, weights: Tensor) -> CircuitSpectrum | None:
        """Sample every target's circuit on the Nyquist grid and transform; None when the table
        would exceed `MAX_ENTRIES`."""
        omega, highest = spectrum_size(simulator)
        features, points = simulator.quantum.circuit.features, 2 * highest + 1
        outputs = simulator.quantum.circuit.num_outputs
        grid_size = points**features
        if grid_size > MAX_FREQUENCY_VECTORS or len(weights) * grid_size * outputs * (1 + weights[0].numel()) > MAX_ENTRIES:
            return None
        axis = torch.arange(points, dtype=torch.float64) / (points * omega)
        grid = torch.cartesian_prod(*[axis] * features).reshape(grid_size, features)
        samples = []
        for target in weights:
            parts = [sample(simulator, chunk, target) for chunk in grid.split(TABULATION_CHUNK)]
            samples.append(torch.cat(parts))  # (N^F, C, 1 + d)
        shape = (len(weights), *[points] * features, *samples[0].shape[1:])
        values = torch.stack(samples).reshape(shape)
        dims = tuple(range(1, 1 + features))
        coefficients = torch.fft.fftn(values, dim=dims) / grid_size
        frequencies = torch.fft.fftfreq(points, d=1.0 / points).to(torch.float64)
        return cls(coefficients.reshape(len(weights), grid_size, *samples[0].shape[1:]), omega, frequencies, features)

    def subset(self, indices: Tensor) -> CircuitSpectrum:
        return CircuitSpectrum(self.coefficients[indices], self.omega, self.frequencies, self.features)

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Outputs (N, C) and Jacobians d f / d theta (N, C, d) at inputs x (N, F), target-major
        (N / K inputs per target), differentiable in x."""
        targets, per_target = len(self.coefficients), len(x) // len(self.coefficients)
        table = self.coefficients.flatten(2)  # (K, N^F, C (1 + d))
        step = max(1, BASIS_CHUNK // (targets * table.shape[1]))
        parts = []
        for start in range(0, per_target, step):  # bounded memory: a slice of every target's candidates
            chunk = x.reshape(targets, per_target, -1)[:, start : start + step]
            basis = self._basis(chunk.reshape(-1, chunk.shape[-1])).reshape(targets, chunk.shape[1], -1)
            parts.append(torch.real(basis @ table))  # (K, chunk, C (1 + d))
        values = torch.cat(parts, dim=1).reshape(len(x), *self.coefficients.shape[2:])
        return values[..., 0], values[..., 1:]

    def _basis(self, x: Tensor) -> Tensor:
        """exp(2 pi i omega k . x) for every frequency vector k, (N, N^F), feature 0 slowest
        (the order of the tabulation grid)."""
        phases = torch.exp(2j * math.pi * self.omega * x[..., None] * self.frequencies)  # (N, F, n)
        basis = phases[:, 0]
        for j in range(1, self.features):
            basis = (basis[:, :, None] * phases[:, j, None, :]).flatten(1)
        return basis


def sample(simulator: VQC, x: Tensor, weights: Tensor) -> Tensor:
    """(f, grad_theta f) of one circuit at inputs x (P, F): (P, C, 1 + d), float64."""
    per_example = weights.expand(len(x), *weights.shape).clone().requires_grad_(True)
    outputs = simulator.forward_per_example(x, per_example)
    rows = [
        torch.autograd.grad(outputs[:, c].sum(), per_example, retain_graph=True)[0].flatten(1)
        for c in range(outputs.shape[1])
    ]
    return torch.cat([outputs.detach()[..., None], torch.stack(rows, dim=1)], dim=-1)
