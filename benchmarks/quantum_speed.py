"""How fast fedsim's quantum models train and how fast the attacks on them run.

    python benchmarks/quantum_speed.py            # the tables below (a few minutes on 2 cores)
    python benchmarks/quantum_speed.py --quick    # 4 qubits only
    python benchmarks/quantum_speed.py --tables attack   # the attack against a plain statevector only

1. One training step (forward, MSE backward, batch 32) of a `vqc` with 4, 8 and 12 qubits
   (angle encoding with re-uploading, 2 hardware-efficient layers, per-qubit Z), per
   simulation path: default.qubit + backprop with parameter broadcasting (fedsim's default),
   the same without broadcasting (a loop over examples), default.qubit + adjoint,
   lightning.qubit + adjoint, default.qubit + parameter-shift, and PennyLane's TorchLayer;
   each with one and with two torch threads.
2. The DP-SGD per-example gradients of the same model (defenses/quantum_grad_sampler.py),
   against the plain step.
3. The batched gradient-matching attack on one feature (Kumar et al.'s model: Fourier tower,
   L = 4 hardware-efficient layers, <Z...Z>, MSE, label known), restarts x 60 Adam
   iterations, at m = 3 and 5 qubits and 1000 and 10,000 restarts, three ways, interleaved:
   fedsim's oracle from the circuit's Fourier table (its default), fedsim's oracle running
   the PennyLane circuit every step (`spectrum=False`), and a plain-torch statevector
   simulation of the same maths (`PlainStatevector`, written here for the comparison: 2 x 2
   gates by einsum, CNOTs as index permutations, the weight gradient by autograd with
   create_graph). All three give the same attack loss at the same points (checked to 1e-10).
Median of `--repeats` timed runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pennylane as qml
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fedsim.attacks.quantum_matching import local_search
from fedsim.attacks.quantum_oracle import QuantumGradientOracle
from fedsim.defenses.quantum_grad_sampler import quantum_layer_grad_sample
from fedsim.models.quantum import VQC
from quantum_cases import kumar_params

BATCH = 32
SLOW_PATH_MAX_QUBITS = 8  # parameter-shift and the per-example loop take minutes beyond this


def timed(step: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` runs after one warm-up run."""
    step()
    return statistics.median(once(step) for _ in range(repeats))


def once(step: Callable[[], object]) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def vqc(qubits: int, **changes: object) -> VQC:
    torch.manual_seed(0)
    return VQC(VQC.Params(layers=2, **changes), (qubits,), qubits)


def train_step(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, per_example: bool = False
) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad()
        if per_example:
            for i in range(len(x)):
                (model(x[i : i + 1]) - y[i : i + 1]).square().mean().backward()
        else:
            (model(x) - y).square().mean().backward()

    return step


def torch_layer(qubits: int) -> torch.nn.Module:
    """PennyLane's TorchLayer with the same circuit (it does its own broadcasting)."""
    circuit = vqc(qubits).quantum.circuit

    def body(inputs: torch.Tensor, weights: torch.Tensor) -> object:  # TorchLayer wants `inputs`
        return circuit._circuit(inputs, weights)

    qnode = qml.QNode(
        body, qml.device("default.qubit", wires=qubits), interface="torch", diff_method="backprop"
    )
    return qml.qnn.TorchLayer(qnode, {"weights": circuit.weight_shape})


def paths(qubits: int) -> dict[str, Callable[[], torch.nn.Module]]:
    found = {
        "default.qubit backprop, broadcast (fedsim)": lambda: vqc(qubits),
        "default.qubit adjoint": lambda: vqc(qubits, diff_method="adjoint"),
        "lightning.qubit adjoint": lambda: vqc(
            qubits, device="lightning.qubit", diff_method="adjoint"
        ),
        "PennyLane TorchLayer backprop": lambda: torch_layer(qubits),
    }
    if qubits <= SLOW_PATH_MAX_QUBITS:
        found["default.qubit backprop, per-example loop"] = lambda: vqc(qubits)
        found["default.qubit parameter-shift"] = lambda: vqc(qubits, diff_method="parameter-shift")
    return found


def training_table(qubit_counts: list[int], repeats: int) -> Table:
    table = Table(title=f"vqc training step, batch {BATCH} (ms)")
    for column in ("qubits", "path", "1 thread", "2 threads"):
        table.add_column(column, justify="right" if column != "path" else "left")
    for qubits in qubit_counts:
        x, y = torch.rand(BATCH, qubits), torch.rand(BATCH, qubits)
        for name, build in paths(qubits).items():
            model = build()
            cells = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                cells.append(
                    f"{1000 * timed(train_step(model, x, y, per_example='loop' in name), repeats):.1f}"
                )
            table.add_row(str(qubits), name, *cells)
    torch.set_num_threads(1)
    return table


def dp_table(qubit_counts: list[int], repeats: int) -> Table:
    table = Table(
        title=f"DP-SGD per-example gradients of the quantum layer, batch {BATCH}, 1 thread (ms)"
    )
    for column in ("qubits", "plain step", "per-example gradients (grad sampler)"):
        table.add_column(column, justify="right")
    for qubits in qubit_counts:
        model = vqc(qubits)
        x, y = torch.rand(BATCH, qubits), torch.rand(BATCH, qubits)
        backprops = torch.rand(BATCH, qubits)
        plain = timed(train_step(model, x, y), repeats)
        sampler = timed(partial(quantum_layer_grad_sample, model.quantum, [x], backprops), repeats)
        table.add_row(str(qubits), f"{1000 * plain:.1f}", f"{1000 * sampler:.1f}")
    return table


class PlainStatevector:
    """The attack loss D(x) = ||grad_theta (f(x) - y)^2 - g||^2 / ||g||^2 of one Fourier-tower
    feature on m qubits with L hardware-efficient layers (RY, RZ per qubit, CNOT chain) and
    <Z...Z>, as a plain-torch statevector simulation, batched over candidates x (R,)."""

    def __init__(self, weights: torch.Tensor, observed: torch.Tensor, label: torch.Tensor, qubits: int) -> None:
        self.weights, self.observed, self.label, self.qubits = weights, observed, label, qubits
        basis = torch.arange(2**qubits)
        bits = (basis[:, None] >> torch.arange(qubits - 1, -1, -1)) & 1  # wire 0: most significant
        self.signs = (1 - 2 * bits).prod(1).to(torch.float64)
        self.cnots = []
        for q in range(qubits - 1):  # CNOT(q, q + 1): flip bit q + 1 where bit q is set
            flip = 1 << (qubits - 2 - q)
            self.cnots.append(torch.where(bits[:, q] == 1, basis ^ flip, basis))

    def _gate(self, state: torch.Tensor, matrix: torch.Tensor, wire: int) -> torch.Tensor:
        view = state.reshape(len(state), 2**wire, 2, 2 ** (self.qubits - wire - 1))
        return torch.einsum("rij,rajb->raib", matrix, view).reshape(len(state), -1)

    def output(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        count = len(x)
        state = torch.zeros(count, 2**self.qubits, dtype=torch.complex128)
        state[:, 0] = 1
        for k in range(self.qubits):
            half = 5**k * math.pi * x  # RX(5^k 2 pi x) / 2
            c, s = torch.cos(half).to(torch.complex128), torch.sin(half).to(torch.complex128)
            rx = torch.stack([torch.stack([c, -1j * s], -1), torch.stack([-1j * s, c], -1)], -2)
            state = self._gate(state, rx, k)
        for layer in range(theta.shape[1]):
            for q in range(self.qubits):
                a = theta[:, layer, q, 0] / 2
                c, s = torch.cos(a).to(torch.complex128), torch.sin(a).to(torch.complex128)
                ry = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
                phase = torch.exp(-1j * theta[:, layer, q, 1] / 2)
                zero = torch.zeros_like(phase)
                rz = torch.stack([torch.stack([phase, zero], -1), torch.stack([zero, phase.conj()], -1)], -2)
                state = self._gate(self._gate(state, ry, q), rz, q)
            for permutation in self.cnots:
                state = state[:, permutation]
        return (state.abs().square() * self.signs).sum(1)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.weights.expand(len(x), *self.weights.shape[1:]).clone().requires_grad_(True)
        outputs = self.output(x, theta)
        (grads,) = torch.autograd.grad((outputs - self.label).square().sum(), theta, create_graph=True)
        residual = grads.flatten(1) - self.observed
        return residual.square().sum(1) / self.observed.square().sum()

    def local_search(self, starts: torch.Tensor, iterations: int, lr: float) -> torch.Tensor:
        """Adam on D from every start, wrapped onto [0, 1) (as fedsim's local_search)."""
        x = starts[:, 0].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=lr)
        for _ in range(iterations):
            optimizer.zero_grad()
            self.loss(x).sum().backward()
            optimizer.step()
            with torch.no_grad():
                x.copy_(torch.remainder(x, 1.0))
        return self.loss(x.detach()).detach()


def attack_case(qubits: int) -> tuple[QuantumGradientOracle, QuantumGradientOracle, PlainStatevector]:
    """Kumar et al.'s one-feature model at m = `qubits`, one observed gradient: fedsim's oracle
    from the Fourier table, fedsim's oracle on the circuit, and the plain statevector."""
    torch.manual_seed(0)
    model = VQC(kumar_params(qubits, 4), (1,), 1).double()
    weights = model.quantum.weights.detach().unsqueeze(0)
    x, y = torch.rand(1, 1, dtype=torch.float64), torch.rand(1, dtype=torch.float64)
    blank = QuantumGradientOracle(model, weights, torch.ones(1, weights.numel()), y, regression=True)
    observed = blank.gradients(x)
    spectral = QuantumGradientOracle(model, weights, observed, y, regression=True)
    circuit = QuantumGradientOracle(model, weights, observed, y, regression=True, spectrum=False)
    plain = PlainStatevector(weights, observed, y, qubits)
    probe = torch.rand(16, 1, dtype=torch.float64)
    reference = circuit(probe, create_graph=False).loss
    assert spectral.spectrum is not None
    assert torch.allclose(spectral(probe, create_graph=False).loss, reference, atol=1e-10)
    assert torch.allclose(plain.loss(probe[:, 0]).detach(), reference, atol=1e-10)
    return spectral, circuit, plain


def attack_table(repeats: int, quick: bool) -> Table:
    table = Table(title="gradient-matching attack, one feature, L = 4, 60 Adam iterations, 1 thread, interleaved")
    for column in ("m", "restarts", "fedsim (Fourier table) s", "fedsim (circuit) s", "plain statevector s",
                   "table / plain", "circuit / plain"):  # fmt: skip
        table.add_column(column, justify="right")
    cases = [(3, 1000)] if quick else [(3, 1000), (5, 1000), (3, 10_000)]
    for qubits, restarts in cases:
        spectral, circuit, plain = attack_case(qubits)
        starts = torch.rand(restarts, 1, dtype=torch.float64)
        runs = {
            "spectral": partial(local_search, spectral, starts, 60, 0.01),
            "circuit": partial(local_search, circuit, starts, 60, 0.01),
            "plain": partial(plain.local_search, starts, 60, 0.01),
        }
        for run in runs.values():  # warm-up
            run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):  # interleaved, so load changes hit all three alike
            for name, run in runs.items():
                times[name].append(once(run))
        median = {name: statistics.median(values) for name, values in times.items()}
        table.add_row(
            str(qubits), str(restarts), f"{median['spectral']:.2f}", f"{median['circuit']:.2f}",
            f"{median['plain']:.2f}", f"{median['spectral'] / median['plain']:.2f}x",
            f"{median['circuit'] / median['plain']:.2f}x",
        )  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 qubits only, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tables", nargs="+", choices=("attack", "dp", "training"), default=["attack", "dp", "training"])
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    qubit_counts = [4] if args.quick else [4, 8, 12]
    console = Console()
    torch.set_num_threads(1)
    if "attack" in args.tables:
        console.print(attack_table(repeats, args.quick))
    if "dp" in args.tables:
        console.print(dp_table(qubit_counts, repeats))
    if "training" in args.tables:
        console.print(training_table(qubit_counts, repeats))


if __name__ == "__main__":
    main()
