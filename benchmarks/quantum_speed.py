"""How fast fedsim's quantum models train and how fast the attacks on them run.

    python benchmarks/quantum_speed.py            # the tables below (a few minutes on 2 cores)
    python benchmarks/quantum_speed.py --quick    # 4 qubits only

1. One training step (forward, MSE backward, batch 32) of a `vqc` with 4, 8 and 12 qubits
   (angle encoding with re-uploading, 2 hardware-efficient layers, per-qubit Z), per
   simulation path: default.qubit + backprop with parameter broadcasting (fedsim's default),
   the same without broadcasting (a loop over examples), default.qubit + adjoint,
   lightning.qubit + adjoint, default.qubit + parameter-shift, and PennyLane's TorchLayer;
   each with one and with two torch threads.
2. The DP-SGD per-example gradients of the same model (defenses/quantum_grad_sampler.py),
   against the plain step.
3. The batched gradient-matching attack on one feature at m = 3: 1000 restarts x 60 Adam
   iterations, restarts per second (target: 1000 restarts in under 10 s on CPU).
Median of `--repeats` timed runs after one warm-up run.
"""

from __future__ import annotations

import argparse
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

from fedsim.attacks.quantum_matching import local_search
from fedsim.attacks.quantum_oracle import QuantumGradientOracle
from fedsim.defenses.quantum_grad_sampler import quantum_layer_grad_sample
from fedsim.models.quantum import VQC

BATCH = 32
SLOW_PATH_MAX_QUBITS = 8  # parameter-shift and the per-example loop take minutes beyond this


def timed(step: Callable[[], object], repeats: int) -> float:
    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


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


def attack_table(repeats: int) -> Table:
    torch.manual_seed(0)
    model = VQC(
        VQC.Params(
            encoding="fourier",
            qubits_per_feature=3,
            reupload=False,
            layers=4,
            observable="tensor_z",
        ),
        (1,),
        1,
    ).double()
    weights = model.quantum.weights.detach().unsqueeze(0)
    x, y = torch.rand(1, 1, dtype=torch.float64), torch.rand(1, dtype=torch.float64)
    blank = QuantumGradientOracle(
        model, weights, torch.ones(1, weights.numel()), y, regression=True
    )
    oracle = QuantumGradientOracle(model, weights, blank.gradients(x), y, regression=True)
    table = Table(
        title="gradient-matching attack, one feature, m = 3, L = 4, 60 Adam iterations, 1 thread"
    )
    for column in ("restarts", "seconds", "restarts / s"):
        table.add_column(column, justify="right")
    for restarts in (10, 100, 1000):
        starts = torch.rand(restarts, 1, dtype=torch.float64)
        seconds = timed(partial(local_search, oracle, starts, 60, 0.01), repeats)
        table.add_row(str(restarts), f"{seconds:.2f}", f"{restarts / seconds:.0f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 qubits only, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    qubit_counts = [4] if args.quick else [4, 8, 12]
    console = Console()
    torch.set_num_threads(1)
    console.print(attack_table(repeats))
    console.print(dp_table(qubit_counts, repeats))
    console.print(training_table(qubit_counts, repeats))


if __name__ == "__main__":
    main()
