"""Quantum models, their DP-SGD and the attacks on their gradients, measured in numbers.

Small circuits and few iterations only: the study over m, qubits and layers is
`benchmarks/quantum_study.py`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from pydantic import ValidationError
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsim.attacks.quantum_dla_snapshot import QuantumDlaSnapshot, SnapshotProblem
from fedsim.attacks.quantum_landscape import (
    QuantumGridScan,
    feature_grid,
    grid_scan,
    grid_size,
    local_minima,
    loss_on_grid,
)
from fedsim.attacks.quantum_learned import QuantumLearned
from fedsim.attacks.quantum_matching import QuantumGradientMatching, local_search
from fedsim.attacks.quantum_numerical import QuantumNumericalInversion, kalman_update
from fedsim.attacks.quantum_oracle import QuantumGradientOracle, circular_distance
from fedsim.defenses import quantum_grad_sampler  # noqa: F401  (Opacus's sampler for QuantumLayer)
from fedsim.defenses.dp_sgd import DpSgd
from fedsim.core.config import build_scenario
from fedsim.data.datasets import FederatedData, TensorData
from fedsim.core.defense import LocalTraining
from fedsim.core.errors import UserError
from fedsim.core.seeding import derive_seed
from fedsim.models.circuits import Circuit
from fedsim.models.quantum import VQC, Hybrid
from fedsim.core.registry import DATASETS
from fedsim.pipeline.runner import run_scenario
from fedsim.evaluation.metrics import score_features
from fedsim.federation.training import SquaredError, evaluate
from quantum_cases import fourier_vqc, observed_target, random_example, trained_target

pytestmark = pytest.mark.filterwarnings(
    "ignore:Secure RNG turned off",
    "ignore:Optimal order is the",
    "ignore:Full backward hook is firing",
)
ANSATZE = ("hardware_efficient", "strongly_entangling", "basic_entangler")


@pytest.fixture(autouse=True)
def one_thread() -> object:
    """Small circuits run many times faster on one torch thread on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- models -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ansatz", ANSATZE)
@pytest.mark.parametrize("encoding", ["angle", "fourier"])
def test_vqc_size_and_outputs(ansatz: str, encoding: str) -> None:
    model = VQC(
        VQC.Params(ansatz=ansatz, encoding=encoding, qubits_per_feature=2, layers=3), (3,), 3
    )
    qubits = 6 if encoding == "fourier" else 3
    per_layer = {"hardware_efficient": 2, "strongly_entangling": 3, "basic_entangler": 1}[ansatz]
    assert model.num_qubits == qubits
    assert (
        model.circuit_parameters
        == 3 * qubits * per_layer
        == sum(p.numel() for p in model.parameters())
    )
    assert model.informative_parameters <= model.circuit_parameters
    assert model.overparameterised == (model.informative_parameters >= 4 * qubits)
    out = model(torch.rand(5, 3))
    assert out.shape == (5, 3) and out.dtype == torch.float32 and out.abs().max() <= 1


def test_hybrid_trains_any_shape_and_reports_its_circuit() -> None:
    torch.manual_seed(0)
    model = Hybrid(Hybrid.Params(hidden=[8], quantum_features=3, layers=2), (1, 8, 8), 10)
    assert model(torch.rand(4, 1, 8, 8)).shape == (4, 10)
    # The last layer's 3 RZ angles commute with the Z readout: 9 informative weights < 4 Nq.
    assert (model.num_qubits, model.circuit_parameters, model.informative_parameters) == (3, 12, 9)
    assert model.overparameterised is False
    assert model.dla_dimension() == 63  # HEA on 3 qubits generates all of su(8)


def test_dla_dimensions() -> None:
    """HEA on 2 qubits: su(4), 15. BasicEntanglerLayers (RX + CNOT ring) on 2 qubits: 3."""
    assert VQC(VQC.Params(layers=2), (2,), 2).dla_dimension() == 15
    assert VQC(VQC.Params(ansatz="basic_entangler", layers=2), (2,), 2).dla_dimension() == 3


def test_informative_weights_and_the_one_layer_degeneracy() -> None:
    """m = 3, L = 1: f = cos w_0 cos w_2 cos(2 pi x) cos(50 pi x); only w_0, w_2 (the RY angles
    on qubits 0 and 2) move it, so the gradient over x has rank 1 and x is not determined.
    L = 4: the last layer loses its 3 RZ angles and qubit 1's RY: 20 of 24 informative."""
    one = fourier_vqc(m=3, layers=1).double()
    assert (one.circuit_parameters, one.informative_parameters, one.overparameterised) == (6, 2, False)
    x = torch.rand(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weights = one.quantum.weights.detach().expand(64, *one.quantum.weights.shape).clone()
    (jacobian,) = torch.autograd.grad(
        one.forward_per_example(x, weights.requires_grad_(True)).sum(), weights
    )
    assert torch.linalg.matrix_rank(jacobian.flatten(1)).item() == 1
    four = fourier_vqc(m=3, layers=4)
    assert (four.circuit_parameters, four.informative_parameters, four.overparameterised) == (24, 20, True)
    assert fourier_vqc(m=3, layers=2).overparameterised is False  # 8 informative < 12


def test_noise_channels_on_default_mixed_act_as_their_formulas() -> None:
    """One qubit, one layer, <Z>: depolarising p scales it by 1 - 4p/3, amplitude damping gamma
    maps it to (1 - gamma) <Z> + gamma. Gradients stay finite (no NaN from PennyLane's expval),
    and the attack simulator keeps the noise: its loss vanishes at the truth."""
    x = torch.rand(5, 1, dtype=torch.float64)

    def model(**noise: float) -> VQC:
        torch.manual_seed(0)
        return VQC(VQC.Params(layers=1, observable="tensor_z", **noise), (1,), 1).double()

    exact = model()(x)
    p, gamma = 0.1, 0.2
    depolarised = model(device="default.mixed", depolarizing=p)
    assert torch.allclose(depolarised(x), (1 - 4 * p / 3) * exact, atol=1e-12)
    damped = model(device="default.mixed", amplitude_damping=gamma)
    assert torch.allclose(damped(x), (1 - gamma) * exact + gamma, atol=1e-12)
    noisy = fourier_vqc(m=2, layers=2, device="default.mixed", depolarizing=0.05)
    sample, label = random_example(1)
    target = observed_target(noisy, sample, label)
    assert torch.isfinite(target.update["quantum.weights"]).all()
    oracle = QuantumGradientOracle.for_target(target, label)
    assert oracle.simulator.params.device == "default.mixed"
    assert oracle(sample.double(), create_graph=False).loss.item() < 1e-10
    batch, labels = torch.rand(4, 1), torch.rand(4)  # DP-SGD's per-example gradients, noisy circuit
    expected = per_example_loop(noisy.float(), SquaredError(reduction="sum"), batch, labels)[0]
    wrapped = GradSampleModule(noisy, loss_reduction="sum")
    wrapped.zero_grad()
    SquaredError(reduction="sum")(wrapped(batch), labels).backward()
    assert (noisy.quantum.weights.grad_sample - expected).abs().max() < 1e-6
    wrapped._close()
    with pytest.raises(UserError, match="need a mixed-state device"):
        build_scenario({"model": {"name": "vqc", "depolarizing": 0.1}})
    with pytest.raises(UserError, match="adds noise only through"):
        build_scenario({"model": {"name": "vqc", "device": "default.mixed"}})


def test_circuit_interface_and_dtypes() -> None:
    """The numpy interface computes the same values; lightning returns float64 for float64
    inputs (PennyLane's torch interface would round it to float32) and float32 for float32."""
    torch.manual_seed(1)
    exact = VQC(VQC.Params(), (2,), 2).double()
    torch.manual_seed(1)
    lightning = VQC(VQC.Params(device="lightning.qubit", diff_method="adjoint"), (2,), 2).double()
    x = torch.rand(6, 2, dtype=torch.float64)
    assert lightning(x).dtype == torch.float64 and torch.get_default_dtype() == torch.float32
    assert (lightning(x) - exact(x)).abs().max() < 1e-12
    assert lightning.float()(x.float()).dtype == torch.float32
    numpy = Circuit(exact.params, 2, interface="numpy")
    values = numpy(x.numpy(), exact.quantum.weights.detach().numpy())
    assert isinstance(values, np.ndarray) and np.abs(values - exact(x).detach().numpy()).max() < 1e-12


def test_fourier_encoding_is_periodic_with_the_predicted_spectrum() -> None:
    """f(x + 1) = f(x), and f's frequencies are the sums s_1 + 5 s_2 (s_k in {-1, 0, 1}):
    3^m of them (not 5^m), the highest (5^m - 1) / 4."""
    model = fourier_vqc(m=2, layers=2)
    assert model.quantum.circuit.max_frequency == 6
    x = torch.rand(7, 1, dtype=torch.float64)
    with torch.no_grad():
        sim = model.double()
        assert torch.allclose(sim(x), sim(x + 1), atol=1e-10)
        samples = sim(torch.arange(64, dtype=torch.float64).unsqueeze(1) / 64).flatten()
    spectrum = torch.fft.rfft(samples).abs() / 64
    assert set(torch.nonzero(spectrum > 1e-10).flatten().tolist()) <= {0, 1, 4, 5, 6}
    assert spectrum[6] > 1e-4  # the highest frequency is present


def test_model_errors_are_one_line_user_errors() -> None:
    with pytest.raises(UserError, match="64 qubits, above the 20"):
        VQC(VQC.Params(), (64,), 10)
    with pytest.raises(UserError, match="per_qubit_z"):
        VQC(VQC.Params(observable="tensor_z"), (4,), 10)
    with pytest.raises(ValidationError, match="backprop needs device default.qubit"):
        VQC.Params(device="lightning.qubit")
    with pytest.raises(ValidationError, match="with shots use parameter-shift"):
        VQC.Params(shots=100)
    with pytest.raises(ValidationError, match="not installed"):
        VQC.Params(device="lightning.gpuu")


def test_lightning_adjoint_and_shots_agree_with_default_qubit() -> None:
    x = torch.rand(6, 2)
    torch.manual_seed(1)
    exact = VQC(VQC.Params(), (2,), 2)
    torch.manual_seed(1)
    lightning = VQC(VQC.Params(device="lightning.qubit", diff_method="adjoint"), (2,), 2)
    assert torch.allclose(exact(x), lightning(x), atol=1e-5)
    torch.manual_seed(1)
    noisy = VQC(VQC.Params(diff_method="parameter-shift", shots=2000), (2,), 2)
    noisy_first = noisy(x)
    error = (noisy_first - exact(x)).abs().max()
    assert 0 < error < 5 / math.sqrt(2000)  # shot noise: std <= 1 / sqrt(shots)
    torch.manual_seed(1)  # the same torch seed gives the same shot noise
    again = VQC(VQC.Params(diff_method="parameter-shift", shots=2000), (2,), 2)
    assert torch.equal(noisy_first, again(x))


# --- data and task ----------------------------------------------------------------------------


def test_digits_features_and_regression_dataset() -> None:
    digits = DATASETS.get("digits").load(DATASETS.get("digits").Params(features=6), 0)
    assert digits.x.shape == (1797, 6) and digits.x.min() == 0 and digits.x.max() == 1
    regression = DATASETS.get("regression")
    data = regression.load(regression.Params(num_examples=300, features=2, noise=0.0), 5)
    assert (
        data.is_regression
        and data.y.dtype == torch.float32
        and data.y.abs().max() == pytest.approx(0.8)
    )
    assert torch.equal(
        data.y, regression.load(regression.Params(num_examples=300, features=2, noise=0.0), 5).y
    )


def test_regression_refuses_label_partitioners_and_scores_r2() -> None:
    from fedsim.core.config import DataConfig

    with pytest.raises(UserError, match="use partitioner iid"):
        FederatedData(DataConfig(dataset="regression", partitioner="dirichlet"), 0)
    x = torch.rand(50, 1)
    data = TensorData(x, torch.sin(6 * x[:, 0]), 0)

    class Oracle(nn.Module):
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return torch.sin(6 * inputs)

    assert evaluate(Oracle(), data) == {"loss": 0.0, "accuracy": 1.0, "num-examples": 50}
    assert evaluate(_constant(float(data.y.mean())), data)["accuracy"] == pytest.approx(
        0.0, abs=1e-6
    )


def _constant(value: float) -> nn.Module:
    layer = nn.Linear(1, 1)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.fill_(value)
    return layer


# --- per-example gradients and DP-SGD ---------------------------------------------------------


def per_example_loop(
    model: nn.Module, criterion: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> list[torch.Tensor]:
    grads = []
    for i in range(len(x)):
        model.zero_grad()
        criterion(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
    return [torch.stack(column) for column in zip(*grads)]


@pytest.mark.parametrize("ansatz", ANSATZE)
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_opacus_per_example_gradients_equal_a_per_example_loop(ansatz: str, mode: str) -> None:
    """Every parameter of a vqc (regression) and a hybrid (classes), to 1e-6."""
    torch.manual_seed(0)
    cases = [
        (VQC(VQC.Params(ansatz=ansatz, encoding="fourier", qubits_per_feature=2, observable="tensor_z"), (2,), 1),
         SquaredError(reduction="sum"), torch.rand(6, 2), torch.rand(6)),
        (Hybrid(Hybrid.Params(ansatz=ansatz, hidden=[5], quantum_features=3), (4,), 4),
         nn.CrossEntropyLoss(reduction="sum"), torch.rand(6, 4), torch.randint(0, 4, (6,))),
    ]  # fmt: skip
    for model, criterion, x, y in cases:
        expected = per_example_loop(model, criterion, x, y)
        wrapped = GradSampleModule(model, loss_reduction="sum", force_functorch=mode == "functorch")
        wrapped.zero_grad()
        criterion(wrapped(x), y).backward()
        for (name, p), want in zip(model.named_parameters(), expected, strict=True):
            assert p.grad_sample.shape == want.shape, name
            assert (p.grad_sample - want).abs().max() < 1e-6, name
            assert want.abs().max() > 1e-3, name  # not trivially zero
        wrapped._close()


def dp_training() -> LocalTraining:
    return LocalTraining(
        num_examples=32,
        batch_size=8,
        local_epochs=1,
        local_steps=None,
        total_rounds=1,
        server_round=1,
        seed=0,
    )


def dp_prepare(model: nn.Module, features: int, **params: object) -> None:
    loader = DataLoader(
        TensorDataset(torch.rand(32, features), torch.randint(0, 2, (32,))), batch_size=8
    )
    defense = DpSgd(DpSgd.Params(**params))
    defense.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, dp_training(), {})
    defense.finish({})


def test_dp_sgd_accepts_quantum_models_and_refuses_what_it_cannot_verify() -> None:
    torch.manual_seed(0)
    dp_prepare(Hybrid(Hybrid.Params(quantum_features=2), (3,), 2), 3)  # checked, accepted
    dp_prepare(VQC(VQC.Params(), (2,), 2), 2, grad_sample_mode="functorch")
    with pytest.raises(UserError, match="finite shots"):
        dp_prepare(VQC(VQC.Params(diff_method="parameter-shift", shots=100), (2,), 2), 2)
    with pytest.raises(UserError, match="use hooks"):
        dp_prepare(VQC(VQC.Params(), (2,), 2), 2, grad_sample_mode="ew")


# --- attacks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", ["known", "unknown"])
def test_attack_loss_vanishes_at_the_truth_and_implies_the_label(labels: str) -> None:
    x, y = random_example(3)
    target = observed_target(fourier_vqc(m=2, layers=2), x, y)
    oracle = QuantumGradientOracle.for_target(target, y if labels == "known" else None)
    at_truth = oracle(x.double(), create_graph=False)
    assert at_truth.loss.item() < 1e-10
    assert at_truth.labels.item() == pytest.approx(y.item(), abs=1e-5)
    assert (
        oracle(
            torch.tensor([[x.item() + 0.3]], dtype=torch.float64), create_graph=False
        ).loss.item()
        > 1e-3
    )


def test_batched_restarts_move_exactly_like_separate_runs() -> None:
    x, y = random_example(4)
    oracle = QuantumGradientOracle.for_target(observed_target(fourier_vqc(m=2, layers=2), x, y), y)
    starts = torch.rand(5, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    together, losses, _ = local_search(oracle, starts, iterations=15, lr=0.01)
    for i in range(5):
        alone, loss, _ = local_search(oracle, starts[i : i + 1], iterations=15, lr=0.01)
        assert torch.allclose(together[i], alone[0], atol=1e-10) and torch.allclose(
            losses[i], loss[0], atol=1e-10
        )


def test_attacks_use_backprop_even_when_the_client_used_adjoint() -> None:
    """Adjoint gets second derivatives wrong; the attack's oracle must not depend on it."""
    x, y = random_example(5)
    exact = observed_target(fourier_vqc(m=2, layers=2), x, y)
    adjoint = observed_target(
        fourier_vqc(m=2, layers=2, device="lightning.qubit", diff_method="adjoint"), x, y
    )
    probe = torch.tensor([[0.37]], dtype=torch.float64, requires_grad=True)
    slopes = []
    for target in (exact, adjoint):
        (slope,) = torch.autograd.grad(
            QuantumGradientOracle.for_target(target, y)(probe).loss.sum(), probe
        )
        slopes.append(slope)
    assert torch.allclose(slopes[0], slopes[1], rtol=1e-4)


def test_one_qubit_per_feature_gradient_matching_recovers_x() -> None:
    """m = 1 (Kumar et al.: minima cluster at the truth): most trials within eps = 0.01."""
    distances = []
    for seed in range(6):
        x, y = random_example(seed)
        attack = QuantumGradientMatching(
            QuantumGradientMatching.Params(labels="known", restarts=10), seed=seed
        )
        recon = attack.reconstruct(observed_target(fourier_vqc(m=1, layers=2, seed=seed), x, y))
        distances.append(
            circular_distance(recon.images.flatten().double(), x.flatten().double()).item()
        )
        assert recon.details["period"] == 1.0
    assert sum(d < 0.01 for d in distances) >= 5, distances


def test_grid_scan_refines_until_the_loss_says_the_basin_was_found() -> None:
    """A miss at 8 points per cycle (experiment 91 of 200 drawn as in benchmarks/quantum_study.py,
    m = 3, L = 4: the true basin's nearest grid point is not among the best 8), visible in its
    loss, and fixed by one refinement to 16 points per cycle."""
    generator = torch.Generator().manual_seed(derive_seed(0, "quantum-study", 3, 4))
    simulator = fourier_vqc(m=3, layers=4).double()
    shape = simulator.quantum.circuit.weight_shape
    weights = torch.rand(200, *shape, generator=generator, dtype=torch.float64)[91:92] * 2 * math.pi
    x = torch.rand(200, 1, generator=generator, dtype=torch.float64)[91:92]
    y = torch.rand(200, generator=generator, dtype=torch.float64)[91:92] * 2 - 1
    blank = QuantumGradientOracle(simulator, weights, torch.ones(1, 24), y, regression=True)
    oracle = QuantumGradientOracle(simulator, weights, blank.gradients(x), y, regression=True)
    coarse = feature_grid(grid_size(oracle, 8), 1, periodic=True)  # 992 points
    best = coarse[loss_on_grid(oracle, coarse, chunk=8192).topk(8, largest=False).indices]
    assert circular_distance(best, x).min() > 0.01  # the polish of these 8 cannot reach x
    scan = grid_scan(oracle, QuantumGridScan.Params(labels="known", iterations=60))
    # It ran a second pass at 16 points per cycle: the first one's loss was above tolerance.
    assert scan.found[0] and scan.loss[0] < 1e-3 and scan.points_per_cycle[0] == 16
    assert scan.grid_points[0] == 992 + 1984
    assert circular_distance(scan.x, x).item() < 1e-3
    capped = grid_scan(
        oracle, QuantumGridScan.Params(labels="known", max_points_per_cycle=8, iterations=5)
    )
    assert not capped.found[0] and capped.loss[0] > 0.1  # a miss is reported, not hidden


def test_grid_scan_finds_x_where_minima_multiply() -> None:
    """m = 3: many local minima, yet the global scan lands on the truth."""
    x, y = random_example(7)
    target = observed_target(fourier_vqc(m=3, layers=2, seed=7), x, y)
    recon = QuantumGridScan(QuantumGridScan.Params(labels="known"), seed=0).reconstruct(target)
    assert circular_distance(recon.images.flatten().double(), x.flatten().double()).item() < 1e-3
    assert recon.attack_loss < 1e-8
    assert recon.details["basin_found"] and recon.details["points_per_cycle"] == 8


def test_numerical_inversion_descends_the_filtered_loss_to_x_where_minima_multiply() -> None:
    """m = 3, L = 4 (Kumar et al.'s hard case): the low-pass filtered descent (Papadopoulos et
    al.) from 4 starts lands within 1e-3 of x, where Adam on the exact gradient from the same
    4 starts does not (benchmarks/quantum_numerical.py: 8/8 against 2/8 at 8 starts)."""
    x, y = random_example(3)
    target = observed_target(fourier_vqc(m=3, layers=4, seed=3), x, y)
    params = QuantumNumericalInversion.Params(labels="known", restarts=4, iterations=200)
    recon = QuantumNumericalInversion(params, seed=3).reconstruct(target)
    assert circular_distance(recon.images.flatten().double(), x.flatten().double()).item() < 1e-3
    assert recon.attack_loss < 1e-6 and recon.details["objective_evaluations"] == (200 + 100 + 1) * 4 * 17
    assert recon.details["final_window"] < params.window  # the window shrank as it converged
    local = QuantumGradientMatching(QuantumGradientMatching.Params(labels="known", restarts=4), seed=3)
    missed = local.reconstruct(target)
    assert circular_distance(missed.images.flatten().double(), x.flatten().double()).item() > 1e-2


def test_kalman_update_weighs_the_estimate_by_its_variance() -> None:
    first, var = kalman_update(torch.zeros(2), torch.full((2,), torch.inf), torch.tensor([1.0, 2.0]),
                               torch.tensor([0.5, 0.5]), process_noise=0.0)  # fmt: skip
    assert first.tolist() == [1.0, 2.0] and var.tolist() == [0.5, 0.5]  # a first measurement as it is
    second, var = kalman_update(first, var, torch.tensor([3.0, 2.0]), torch.tensor([0.5, 0.5]), process_noise=0.0)
    assert second.tolist() == [2.0, 2.0] and var.tolist() == [0.25, 0.25]  # equal variances: the mean


def test_local_minima_multiply_with_qubits_per_feature() -> None:
    counts = []
    for m in (1, 2, 3):
        x, y = random_example(m)
        oracle = QuantumGradientOracle.for_target(
            observed_target(fourier_vqc(m=m, layers=2, seed=m), x, y), y
        )
        values = loss_on_grid(
            oracle, feature_grid(grid_size(oracle, 16), 1, periodic=True), chunk=8192
        )
        counts.append(len(local_minima(values, periodic=True)))
    assert counts[0] < counts[1] < counts[2] and counts[2] > 15, counts
    assert local_minima(torch.tensor([3.0, 1.0, 2.0, 0.5, 4.0]), periodic=True).tolist() == [1, 3]


def test_learned_attack_reports_its_size_and_held_out_error() -> None:
    x, y = random_example(2)
    params = QuantumLearned.Params(
        labels="known", samples=1024, hidden=[64], epochs=30, batch_size=32
    )
    recon = QuantumLearned(params, seed=0).reconstruct(
        observed_target(fourier_vqc(m=1, layers=2, seed=2), x, y)
    )
    assert (
        recon.details["network_parameters"] == 4 * 64 + 64 + 64 * 2 + 2
    )  # d = 4 -> 64 -> (cos, sin)
    assert recon.details["held_out_error"] < 0.1  # mean circular error on simulated clients
    assert circular_distance(recon.images.flatten().double(), x.flatten().double()).item() < 0.03


def test_dla_snapshot_attack_solves_for_the_visible_part_of_the_snapshot() -> None:
    """HEA on m = 2 qubits: V = su(4) (dim 15). Through V, <Z Z> = o . e(x) and the gradient is
    c M e(x), so the least-squares snapshot is the true snapshot's part in M's row space (up
    to c); one gradient shows rank M < 15 of its coordinates, and x still follows."""
    x, y = random_example(3)
    model = fourier_vqc(m=2, layers=2, seed=3)
    problem = SnapshotProblem.of(model.quantum.circuit, model.quantum.weights)
    e = problem.snapshots(x.double())[0]
    with torch.no_grad():
        assert float(problem.output @ e) == pytest.approx(model.double()(x.double()).item(), abs=1e-10)
    model.float()
    target = observed_target(model, x, y)
    attack = QuantumDlaSnapshot(QuantumDlaSnapshot.Params(labels="known", iterations=30), seed=0)
    recon = attack.reconstruct(target)
    details = recon.details
    assert (details["dla_dimension"], details["module_dimension"]) == (15, 15)
    assert details["rank"] < 15 and not details["snapshot_determined"]
    visible = torch.linalg.pinv(problem.jacobian) @ (problem.jacobian @ e)
    snapshot = torch.tensor(details["snapshot"], dtype=torch.float64)
    assert abs(float(snapshot @ visible) / float(visible.norm())) > 1 - 1e-4
    assert circular_distance(recon.images.flatten().double(), x.flatten().double()).item() < 1e-3
    assert recon.labels.item() == pytest.approx(y.item(), abs=5e-3)  # float32 gradient


@pytest.mark.parametrize(
    ("batch_size", "local_steps", "examples", "labels"),
    [(2, 1, 2, "known"), (2, 1, 2, "unknown"), (1, 3, 3, "known"), (2, 2, 4, "known"), (2, 3, 2, "known")],
)
def test_oracle_unrolls_the_clients_batch_and_local_steps(
    batch_size: int, local_steps: int, examples: int, labels: str
) -> None:
    """Batch means, several steps with their own examples (FedAvg), and several epochs over a
    full batch: D is ~0 at the client's examples in the order it trained on them (float32
    update), and far from 0 when they move, so the unroll is the client's training."""
    x, y = random_example(4, examples=examples)
    model = fourier_vqc(m=2, layers=3, seed=4)
    target, trained = trained_target(model, x, y, batch_size=batch_size, local_steps=local_steps)
    oracle = QuantumGradientOracle.for_target(target, target.known_labels if labels == "known" else None, batches=True)
    assert (oracle.examples, oracle.dimension) == (min(examples, batch_size * local_steps), examples)
    at_truth = oracle(trained.double().reshape(1, -1), create_graph=False)
    moved = trained.double() + 0.05
    assert at_truth.loss.item() < 1e-9
    assert oracle(moved.reshape(1, -1), create_graph=False).loss.item() > 1e-3
    assert torch.allclose(at_truth.labels[0].float(), target.known_labels, atol=1e-4)  # implied when unknown


@pytest.mark.parametrize(
    ("changes", "features", "classes", "examples"),
    [
        ({}, 2, 0, 2),  # Fourier tower, two features, a batch of two
        ({"encoding": "angle", "reupload": True, "angle_scale": 2.0}, 2, 0, 1),
        ({"encoding": "angle", "observable": "per_qubit_z"}, 3, 3, 2),  # three classes, cross-entropy
    ],
)
def test_fourier_table_gives_the_circuits_attack_loss(changes: dict, features: int, classes: int, examples: int) -> None:
    """The oracle's default, f and grad_theta f from the circuit's Fourier table at the sent
    weights, equals running the circuit (`spectrum=False`): attack loss, implied labels and
    the loss's gradient in x, to 1e-12, with the label known and unknown."""
    torch.manual_seed(5)
    params = dict(encoding="fourier", qubits_per_feature=1, layers=2, observable="tensor_z") | changes
    simulator = VQC(VQC.Params(**params), (features,), classes or 1).double()
    weights = simulator.quantum.weights.detach().unsqueeze(0)
    generator = torch.Generator().manual_seed(5)
    labels = torch.randint(0, classes, (1, examples), generator=generator) if classes else torch.rand(1, examples, generator=generator)
    blank = QuantumGradientOracle(simulator, weights, torch.ones(1, weights.numel()), labels, classes == 0, [(0, examples)])
    observed = blank.gradients(torch.rand(1, examples * features, generator=generator, dtype=torch.float64))
    probe = torch.rand(7, examples * features, generator=generator, dtype=torch.float64)
    for known in (labels, None):
        table, circuit = (
            QuantumGradientOracle(simulator, weights, observed, known, classes == 0, [(0, examples)], spectrum=spectrum)
            for spectrum in (True, False)
        )
        assert table.spectrum is not None and circuit.spectrum is None
        x_table, x_circuit = probe.clone().requires_grad_(True), probe.clone().requires_grad_(True)
        a, b = table(x_table), circuit(x_circuit)
        assert torch.allclose(a.loss, b.loss, atol=1e-12)
        assert torch.allclose(a.labels.double(), b.labels.double(), atol=1e-10)
        (g_table,) = torch.autograd.grad(a.loss.sum(), x_table)
        (g_circuit,) = torch.autograd.grad(b.loss.sum(), x_circuit)
        assert torch.allclose(g_table, g_circuit, atol=1e-10 * g_circuit.abs().max().item())


def test_attacks_recover_a_small_batch() -> None:
    """Two examples in one averaged gradient (m = 2, L = 4): both attacks recover both, each
    within 1e-3, label known or not (the implied labels then come from the solve)."""
    x, y = random_example(0, examples=2)
    target, trained = trained_target(fourier_vqc(m=2, layers=4, seed=0), x, y, batch_size=2)
    for attack in (
        QuantumGradientMatching(QuantumGradientMatching.Params(labels="unknown", restarts=100, iterations=200), seed=0),
        QuantumNumericalInversion(QuantumNumericalInversion.Params(labels="known", iterations=200), seed=0),
    ):
        recon = attack.reconstruct(target)
        assert recon.images.shape == (2, 1) and recon.labels.shape == (2,)
        scores = score_features(recon.images, trained, recon.labels, target.known_labels, period=1.0)
        assert scores["max_feature_error"] < 1e-3 and scores["label_error"] < 1e-2


def test_attack_refuses_targets_outside_its_threat_model() -> None:
    x, y = random_example(0)
    target = observed_target(fourier_vqc(m=1, layers=1), x, y)
    from dataclasses import replace

    with pytest.raises(UserError, match="batch_size: 1"):
        QuantumLearned(QuantumLearned.Params()).reconstruct(replace(target, batch_size=4))
    with pytest.raises(UserError, match="local_steps 3 set labels: known"):
        QuantumGradientMatching(QuantumGradientMatching.Params()).reconstruct(
            replace(target, num_examples=3, local_steps=3)
        )
    with pytest.raises(UserError, match="carries no labels"):
        QuantumGradientMatching(QuantumGradientMatching.Params(labels="known")).reconstruct(
            replace(target, known_labels=None)
        )
    torch.manual_seed(0)
    hybrid = Hybrid(Hybrid.Params(), (1,), 1)
    with pytest.raises(UserError, match="model 'vqc'"):
        QuantumGradientMatching(QuantumGradientMatching.Params()).reconstruct(
            replace(target, model=hybrid)
        )


# --- federated end to end ---------------------------------------------------------------------


def test_quantum_federation_trains_records_and_is_attacked(tmp_path: Path) -> None:
    scenario = build_scenario(
        {
            "name": "qtiny",
            "data": {"dataset": {"name": "regression", "num_examples": 200}, "num_clients": 6},
            "model": {"name": "vqc", "encoding": "fourier", "qubits_per_feature": 1, "reupload": False,
                      "layers": 2, "observable": "tensor_z"},
            "training": {"batch_size": 1, "local_steps": 1, "lr": 0.5},
            "federation": {"rounds": 10},
            "observer": {"rounds": [1], "clients": [0, 1]},
            "attacks": [{"name": "quantum_grid_scan", "labels": "known"},
                        {"name": "quantum_gradient_matching", "restarts": 20}],
            "output": {"dir": str(tmp_path)},
        }
    )  # fmt: skip
    run = run_scenario(scenario, tmp_path / "run")
    rounds = list(run.metrics())
    assert rounds[-1]["test_accuracy"] > 0.85 > rounds[0]["test_accuracy"] + 0.3  # test R^2
    summary = json.loads(run.summary_path.read_text())
    assert summary["attacks"]["quantum_grid_scan"]["targets"] == 2
    assert summary["attacks"]["quantum_grid_scan"]["feature_error"] < 1e-3
    assert "feature_error" in summary["attacks"]["quantum_gradient_matching"]
