"""Defenses measured against their definitions: clipping bound, noise scale, composed epsilon."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
)
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from pydantic import ValidationError
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsim.defenses.central_dp import CentralDpAdaptive, CentralDpFixed
from fedsim.defenses.dp_sgd import HISTORY_KEY, DpSgd
from fedsim.defenses.pruning import TopK
from fedsim.data.datasets import TensorData
from fedsim.core.defense import LocalTraining
from fedsim.core.errors import UserError
from fedsim.core.registry import DEFENSES
from fedsim.federation.training import LocalHyperParams, LocalResult, train_locally

N, BATCH, FEATURES, CLASSES = 64, 8, 10, 3
SAMPLE_RATE = BATCH / N  # Opacus's 1 / len(loader)

pytestmark = pytest.mark.filterwarnings(
    "ignore:Secure RNG turned off",
    "ignore:Optimal order is the",
    "ignore:GDP accounting",
    "ignore:Full backward hook is firing",  # Opacus's hooks on a first layer; harmless
)


def training(server_round: int = 1, total_rounds: int = 3) -> LocalTraining:
    return LocalTraining(
        num_examples=N,
        batch_size=BATCH,
        local_epochs=1,
        local_steps=None,
        total_rounds=total_rounds,
        server_round=server_round,
        seed=server_round,
    )


def client_objects(
    seed: int, scale: float = 1.0
) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
    """A fresh model, optimizer and loader, as a Flower client builds them every round."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    data = TensorDataset(scale * torch.randn(N, FEATURES), torch.randint(0, CLASSES, (N,)))
    loader = DataLoader(data, batch_size=BATCH, generator=torch.Generator().manual_seed(seed))
    return model, torch.optim.SGD(model.parameters(), lr=0.05), loader


def train_round(defense: DpSgd, state: dict, server_round: int, total_rounds: int = 3) -> dict:
    """prepare -> one local epoch -> finish; `state` goes through JSON like Context.state."""
    model, optimizer, loader = client_objects(server_round)
    model, optimizer, loader = defense.prepare(
        model, optimizer, loader, training(server_round, total_rounds), state
    )
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    metrics = defense.finish(state)
    state.update(json.loads(json.dumps(state)))
    return metrics


# --- dp_sgd -------------------------------------------------------------------------------


def test_registered() -> None:
    assert DEFENSES.get("dp_sgd") is DpSgd
    assert DEFENSES.get("topk") is TopK
    assert DEFENSES.get("central_dp_fixed") is CentralDpFixed


def test_per_sample_gradients_are_clipped_to_max_grad_norm() -> None:
    C = 0.5
    defense = DpSgd(DpSgd.Params(noise_multiplier=0.0, max_grad_norm=C, grad_sample_mode="hooks"))
    plain, optimizer, loader = client_objects(seed=0, scale=20.0)  # large inputs: norms > C
    reference = copy.deepcopy(plain)
    model, optimizer, loader = defense.prepare(plain, optimizer, loader, training(), {})
    x, y = next(iter(loader))
    nn.functional.cross_entropy(model(x), y).backward()
    params = list(plain.parameters())

    # Opacus's per-sample gradients are the real ones (trap 2 says to check this).
    for i in range(len(x)):
        loss_i = nn.functional.cross_entropy(reference(x[i : i + 1]), y[i : i + 1])
        for p, g in zip(params, torch.autograd.grad(loss_i, list(reference.parameters()))):
            torch.testing.assert_close(p.grad_sample[i], g, rtol=1e-4, atol=1e-6)

    norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params]).norm(dim=0)
    clip = (C / (norms + 1e-6)).clamp(max=1.0)  # Opacus's flat clipping factor
    assert norms.max() > 2 * C  # clipping is active
    assert (norms * clip).max() <= C + 1e-5
    expected_sum = [torch.einsum("i,i...->...", clip, p.grad_sample) for p in params]

    optimizer.step()
    summed = torch.cat([p.summed_grad.flatten() for p in params])
    torch.testing.assert_close(summed, torch.cat([g.flatten() for g in expected_sum]))
    assert summed.norm() <= len(x) * C + 1e-5
    # sigma = 0: the step's gradient is the clipped sum over the expected batch size.
    for p, g in zip(params, expected_sum):
        torch.testing.assert_close(p.grad, g / BATCH)


def pure_noise_step(sigma: float, C: float, loader_seed: int, mode: str = "hooks") -> torch.Tensor:
    """The gradient of one DP-SGD step whose per-sample gradients are all zero: only noise."""
    defense = DpSgd(DpSgd.Params(noise_multiplier=sigma, max_grad_norm=C, grad_sample_mode=mode))
    model = nn.Linear(500, 200, bias=False)  # 100,000 coordinates
    data = TensorDataset(torch.randn(N, 500), torch.zeros(N, dtype=torch.long))
    generator = torch.Generator().manual_seed(loader_seed)
    loader = DataLoader(data, batch_size=BATCH, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model, optimizer, loader = defense.prepare(model, optimizer, loader, training(), {})
    criterion = defense.criterion(nn.CrossEntropyLoss())
    x, y = next(iter(loader))
    criterion(0.0 * model(x), y).backward()  # zero gradients, whatever the loss
    optimizer.step()
    return model._module.weight.grad


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_noise_std_is_sigma_times_c_over_batch(mode: str) -> None:
    sigma, C = 2.0, 0.5
    noise = pure_noise_step(sigma, C, loader_seed=0, mode=mode)
    expected_std = sigma * C / BATCH
    assert abs(noise.std().item() / expected_std - 1) < 0.05
    assert abs(noise.mean().item()) < 0.05 * expected_std


def test_noise_is_reproducible_per_loader_and_differs_between_loaders() -> None:
    """Every client and round has its own batch generator, so its own noise stream."""
    assert torch.equal(pure_noise_step(1.0, 1.0, 1), pure_noise_step(1.0, 1.0, 1))
    assert not torch.equal(pure_noise_step(1.0, 1.0, 1), pure_noise_step(1.0, 1.0, 2))


def independent_rdp_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Epsilon from Opacus's RDP analysis functions directly, not through an accountant."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    return rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_composes_over_rounds(accountant: str) -> None:
    sigma, delta = 1.0, 1e-5
    defense = DpSgd(DpSgd.Params(noise_multiplier=sigma, delta=delta, accountant=accountant))
    state: dict = {}
    epsilons = [train_round(defense, state, r)["epsilon"] for r in (1, 2, 3)]

    steps = 3 * (N // BATCH)
    assert state[HISTORY_KEY] == [[sigma, SAMPLE_RATE, steps]]
    reference = create_accountant(accountant)
    reference.history = [(sigma, SAMPLE_RATE, steps)]
    assert epsilons[2] == pytest.approx(reference.get_epsilon(delta=delta), rel=0.01)
    assert epsilons[0] < epsilons[1] < epsilons[2]
    if accountant == "rdp":
        assert epsilons[2] == pytest.approx(
            independent_rdp_epsilon(sigma, SAMPLE_RATE, steps, delta), rel=0.01
        )
        # What a per-round engine (Flower's Opacus example) would report in round 3.
        assert epsilons[0] == pytest.approx(
            independent_rdp_epsilon(sigma, SAMPLE_RATE, steps // 3, delta), rel=0.01
        )


def test_target_epsilon_is_reached_after_total_rounds() -> None:
    target = 3.0
    defense = DpSgd(DpSgd.Params(noise_multiplier=None, target_epsilon=target))
    state: dict = {}
    epsilons = [train_round(defense, state, r, total_rounds=4)["epsilon"] for r in (1, 2, 3, 4)]
    assert epsilons[-1] <= target
    assert epsilons[-1] == pytest.approx(target, rel=0.05)


def test_plain_model_can_be_wrapped_again_after_finish() -> None:
    defense = DpSgd(DpSgd.Params())
    plain, optimizer, loader = client_objects(seed=0)
    state: dict = {}
    for server_round in (1, 2):
        model, opt, dl = defense.prepare(plain, optimizer, loader, training(server_round), state)
        x, y = next(iter(dl))
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        defense.finish(state)
        assert defense.unwrap(model) is plain
    assert not hasattr(plain[0].weight, "grad_sample")


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew", "ghost"])
def test_modes_pass_the_per_sample_check_with_dropout(mode: str) -> None:
    defense = DpSgd(DpSgd.Params(grad_sample_mode=mode))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.Dropout(0.5), nn.Linear(16, CLASSES))
    _, _, loader = client_objects(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    defense.prepare(model, optimizer, loader, training(), {})
    defense.finish({})


def test_batchnorm_is_refused_with_the_fix() -> None:
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.Linear(16, CLASSES))
    _, _, loader = client_objects(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(UserError, match=r"BatchNorm cannot .*: layer '1' \(BatchNorm1d\)\. .*fix_modules: true"):
        DpSgd(DpSgd.Params()).prepare(model, optimizer, loader, training(), {})


def test_fix_modules_replaces_batchnorm_and_says_which(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Unflatten(1, (1, 2, FEATURES // 2)),
        nn.Conv2d(1, 4, 1),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(FEATURES * 4, CLASSES),
    )
    defense = DpSgd(DpSgd.Params(fix_modules=True))
    fixed = defense.wrap_model(model)
    assert isinstance(fixed[2], nn.GroupNorm) and isinstance(model[2], nn.BatchNorm2d)
    assert "2 (BatchNorm2d -> GroupNorm)" in caplog.text
    torch.testing.assert_close(fixed[1].weight, model[1].weight)  # the rest is kept
    _, _, loader = client_objects(seed=0)
    optimizer = torch.optim.SGD(fixed.parameters(), lr=0.05)
    defense.prepare(fixed, optimizer, loader, training(), {})
    defense.finish({})
    plain = nn.Sequential(nn.Linear(FEATURES, CLASSES))
    assert defense.wrap_model(plain) is plain


@pytest.mark.parametrize("mode", ["functorch", "ghost"])
def test_step_is_the_mean_of_clipped_per_example_gradients(mode: str) -> None:
    """Against a per-example loop: g = sum_i min(1, C / ||g_i||) g_i / B (sigma = 0)."""
    C = 0.5
    defense = DpSgd(DpSgd.Params(noise_multiplier=0.0, max_grad_norm=C, grad_sample_mode=mode))
    plain, optimizer, loader = client_objects(seed=0, scale=20.0)
    reference = copy.deepcopy(plain)
    model, optimizer, loader = defense.prepare(plain, optimizer, loader, training(), {})
    criterion = defense.criterion(nn.CrossEntropyLoss())
    x, y = next(iter(loader))
    optimizer.zero_grad()
    criterion(model(x), y).backward()
    optimizer.step()

    per_example = [
        torch.autograd.grad(
            nn.functional.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]),
            list(reference.parameters()),
        )
        for i in range(len(x))
    ]
    norms = torch.stack([torch.cat([g.flatten() for g in grads]).norm() for grads in per_example])
    assert (norms > C).sum() >= len(x) // 2  # clipping is active
    factors = (C / (norms + 1e-6)).clamp(max=1.0)
    for j, p in enumerate(plain.parameters()):
        clipped_sum = sum(f * grads[j] for f, grads in zip(factors, per_example))
        torch.testing.assert_close(p.grad, clipped_sum / BATCH, rtol=1e-4, atol=1e-6)
        assert (p.grad * BATCH).norm() <= len(x) * C + 1e-5


def train_with_batches_of_32(defense: DpSgd) -> tuple[LocalResult, list[int], nn.Module]:
    """fedsim's own loop on 96 examples; returns the sizes of all forward passes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    data = TensorData(torch.randn(96, FEATURES), torch.randint(0, CLASSES, (96,)), CLASSES)
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _, args: sizes.append(len(args[0])))
    hp = LocalHyperParams(lr=0.1, batch_size=32, local_epochs=2, local_steps=0, optimizer="sgd",
                          momentum=0.0, weight_decay=0.0)
    local = LocalTraining(96, 32, 2, None, 1, 1, 0)
    state: dict = {}
    result = train_locally(model, data, hp, local, torch.Generator().manual_seed(0), [defense], [state])
    return result, sizes, defense.unwrap(model)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_batch_memory_manager_takes_the_same_steps_in_smaller_batches(mode: str) -> None:
    """Logical batches of ~32 (Poisson) in physical batches of <= 5: same steps, same noise,
    same weights and epsilon; fedsim counts logical steps and records logical batches."""
    params = {"noise_multiplier": 1.0, "grad_sample_mode": mode}
    whole, whole_sizes, whole_model = train_with_batches_of_32(DpSgd(DpSgd.Params(**params)))
    split, split_sizes, split_model = train_with_batches_of_32(
        DpSgd(DpSgd.Params(**params, max_physical_batch_size=5))
    )
    assert max(split_sizes) <= 5 < max(whole_sizes)  # (the per-sample probe uses 4)
    assert split.steps == whole.steps == 6  # 2 epochs of 3 logical batches
    assert split.batches == whole.batches
    assert max(len(b) for b in split.batches) > 5
    assert split.metrics["epsilon"] == whole.metrics["epsilon"]
    for a, b in zip(split_model.parameters(), whole_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_params_refuse_two_noise_sources() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        DpSgd.Params(noise_multiplier=1.0, target_epsilon=2.0)
    with pytest.raises(ValidationError, match="exactly one"):
        DpSgd.Params(noise_multiplier=None)


def test_target_epsilon_alone_derives_the_noise() -> None:
    params = DpSgd.Params.model_validate({"target_epsilon": 8})
    assert params.noise_multiplier is None and params.target_epsilon == 8


def test_opacus_empty_batch_warnings_become_one_explanation(caplog: pytest.LogCaptureFixture) -> None:
    opacus_log = logging.getLogger("opacus.data_loader")
    for _ in range(3):
        opacus_log.warning("First batch is empty. We are using an empty list as a batch.")
    assert "First batch is empty" not in caplog.text
    assert caplog.text.count("dp_sgd: a Poisson-sampled batch came out empty") <= 1


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_quantum_layer_with_zero_per_sample_gradients_is_refused(mode: str) -> None:
    """Trap 2: Opacus returns all-zero per-sample gradients for a PennyLane TorchLayer."""
    import pennylane as qml

    device = qml.device("default.qubit", wires=2)

    @qml.qnode(device, interface="torch", diff_method="backprop")
    def circuit(inputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        qml.AngleEmbedding(inputs, wires=[0, 1])
        qml.BasicEntanglerLayers(weights, wires=[0, 1])
        return qml.expval(qml.PauliZ(0) @ qml.PauliZ(1))

    torch.manual_seed(0)
    model = nn.Sequential(qml.qnn.TorchLayer(circuit, {"weights": (2, 2)}))
    loader = DataLoader(TensorDataset(torch.rand(16, 2), torch.rand(16)), batch_size=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(UserError, match="wrong per-example gradients"):
        DpSgd(DpSgd.Params(grad_sample_mode=mode)).prepare(model, optimizer, loader, training(), {})


# --- topk ---------------------------------------------------------------------------------


def random_update() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(8, generator=g),
        "fc.weight": torch.randn(10, 50, generator=g),
        "scalar": torch.randn((), generator=g),
        "steps": torch.tensor([7, 3]),  # integer buffer: never pruned
    }


def assert_kept_are_largest(original: torch.Tensor, pruned: torch.Tensor, count: int) -> None:
    kept = pruned != 0
    assert int(kept.sum()) == count
    assert torch.equal(pruned[kept], original[kept])
    if not kept.all():
        assert original[kept].abs().min() >= original[~kept].abs().max()


@pytest.mark.parametrize("fraction", [0.1, 0.37, 1.0])
def test_topk_per_tensor_keeps_exactly_the_largest(fraction: float) -> None:
    update = random_update()
    pruned = TopK(TopK.Params(keep_fraction=fraction)).transform(update, torch.Generator())
    for name in ("conv.weight", "conv.bias", "fc.weight", "scalar"):
        n = update[name].numel()
        assert_kept_are_largest(update[name], pruned[name], max(1, round(fraction * n)))
    assert torch.equal(pruned["steps"], update["steps"])


def test_topk_global_keeps_exactly_the_largest_overall() -> None:
    update = random_update()
    defense = TopK(TopK.Params(keep_fraction=0.05, scope="global"))
    pruned = defense.transform(update, torch.Generator())
    names = ["conv.weight", "conv.bias", "fc.weight", "scalar"]
    flat = torch.cat([update[n].flatten() for n in names])
    flat_pruned = torch.cat([pruned[n].flatten() for n in names])
    assert_kept_are_largest(flat, flat_pruned, round(0.05 * flat.numel()))
    assert torch.equal(pruned["steps"], update["steps"])


# --- central_dp_fixed ---------------------------------------------------------------------


class FakeGrid:
    """Just enough of a Grid for FedAvg.configure_train: three connected nodes."""

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages need the run/node identity that Flower's ServerApp runtime sets."""
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def run_round(
    strategy: DifferentialPrivacyServerSideFixedClipping,
    server_round: int,
    updates: list[torch.Tensor],
    weights: tuple[int, ...] = (10, 10, 10),
) -> torch.Tensor:
    """configure_train -> client replies (global zeros + update) -> aggregate_train."""
    global_arrays = ArrayRecord({"w": torch.zeros(4)})
    messages = strategy.configure_train(server_round, global_arrays, ConfigRecord(), FakeGrid())
    replies = [
        Message(
            RecordDict(
                {"arrays": ArrayRecord({"w": u}), "metrics": MetricRecord({"num-examples": n, "unit-weight": 1})}
            ),
            reply_to=message,
        )
        for message, u, n in zip(messages, updates, weights, strict=True)
    ]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays.to_torch_state_dict()["w"]


def gaussian_epsilon(sigma: float, releases: int, delta: float) -> float:
    """Closed form RDP of `releases` Gaussian mechanisms, T * a / (2 sigma^2), to (eps, delta)."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = [releases * a / (2 * sigma**2) for a in orders]
    return rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]


def test_central_dp_wraps_fedavg_and_clips_each_client(server_identity: None) -> None:
    defense = CentralDpFixed(CentralDpFixed.Params(noise_multiplier=1e-6, clipping_norm=1.0))
    strategy = defense.wrap(FedAvg(min_train_nodes=3, min_available_nodes=3), 3, total_rounds=2)
    assert isinstance(strategy, DifferentialPrivacyServerSideFixedClipping)
    updates = [
        torch.tensor([100.0, 0, 0, 0]),
        torch.tensor([0, 0.5, 0, 0]),
        torch.tensor([0, 0, 0.3, 0]),
    ]
    # The first update is clipped to norm 1, the others are within the bound.
    expected = torch.tensor([1.0, 0.5, 0.3, 0.0]) / 3
    torch.testing.assert_close(run_round(strategy, 1, updates), expected, atol=1e-5, rtol=0)


def test_central_dp_epsilon_grows_with_rounds(server_identity: None) -> None:
    sigma, delta = 2.0, 1e-5
    defense = CentralDpFixed(CentralDpFixed.Params(noise_multiplier=sigma, delta=delta))
    strategy = defense.wrap(FedAvg(min_train_nodes=3, min_available_nodes=3), 3, total_rounds=3)
    assert defense.round_metrics(0) == {"epsilon": 0.0, "clipping_norm": 1.0}
    epsilons = []
    for server_round in (1, 2, 3):
        run_round(strategy, server_round, [torch.ones(4)] * 3)
        epsilons.append(defense.round_metrics(server_round)["epsilon"])
    assert epsilons[0] < epsilons[1] < epsilons[2]
    for releases, epsilon in enumerate(epsilons, start=1):
        assert epsilon == pytest.approx(gaussian_epsilon(sigma, releases, delta), rel=1e-9)
    assert strategy.privacy_spent().num_releases == 3


def test_central_dp_weighs_clients_equally_whatever_their_example_counts(server_identity: None) -> None:
    """Flower's accounted mode needs every client to weigh 1/m: fedsim averages by unit weight."""
    defense = CentralDpFixed(CentralDpFixed.Params(noise_multiplier=1.0, clipping_norm=1.0))
    inner = FedAvg(min_train_nodes=3, min_available_nodes=3)
    strategy = defense.wrap(inner, 3, total_rounds=1)
    assert inner.weighted_by_key == "unit-weight"
    run_round(strategy, 1, [torch.ones(4)] * 3, weights=(10, 20, 30))
    assert defense.round_metrics(1)["epsilon"] > 0


def test_adaptive_epsilon_is_the_gaussian_of_both_releases_per_round(server_identity: None) -> None:
    """Independently: Flower's z_d = (z^-2 - (2 s)^-2)^-1/2; with 0/1 bits (sensitivity 1) the
    round's two releases compose to z_eff = (z_d^-2 + s^-2)^-1/2, below the requested z."""
    z, s, delta = 1.0, 2.0, 1e-5
    defense = CentralDpAdaptive(
        CentralDpAdaptive.Params(noise_multiplier=z, clipped_count_stddev=s, delta=delta)
    )
    defense.wrap(FedAvg(min_train_nodes=3, min_available_nodes=3), 3, total_rounds=3)
    z_d = (z**-2 - (2 * s) ** -2) ** -0.5
    z_eff = (z_d**-2 + s**-2) ** -0.5
    assert z_eff < z
    for server_round in (1, 2, 3):
        run_round(defense._strategy, server_round, [torch.ones(4)] * 3)
        metrics = defense.round_metrics(server_round)
        assert metrics["effective_noise_multiplier"] == pytest.approx(z_eff, rel=1e-12)
        assert metrics["epsilon"] == pytest.approx(
            gaussian_epsilon(z_eff, server_round, delta), rel=1e-9
        )


def test_adaptive_clipping_norm_converges_to_the_target_quantile(server_identity: None) -> None:
    """Updates of norm 1, 2 and 3, target: clip half. C must grow from 0.1 to about 2 (Flower
    1.41's own update shrinks it towards 0 while every update is clipped)."""
    defense = CentralDpAdaptive(
        CentralDpAdaptive.Params(
            noise_multiplier=0.01, clipped_count_stddev=0.05, initial_clipping_norm=0.1
        )
    )
    defense.wrap(FedAvg(min_train_nodes=3, min_available_nodes=3), 3, total_rounds=80)
    updates = [torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 2.0, 0, 0]), torch.tensor([0, 0, 3.0, 0])]
    norms = []
    for server_round in range(1, 81):
        run_round(defense._strategy, server_round, updates)
        norms.append(defense.round_metrics(server_round)["clipping_norm"])
    assert norms[0] > 0.1 and norms[20] > norms[10] > norms[0]  # grows while all are clipped
    assert all(1.5 < c < 2.7 for c in norms[-20:])


@pytest.mark.parametrize("name", ["central_dp_fixed", "central_dp_adaptive"])
def test_server_side_clipping_tolerates_an_all_zero_update(server_identity: None, name: str) -> None:
    """Flower 1.41 divides by the update's norm; an unchanged client must not crash the run."""
    plugin = DEFENSES.get(name)
    defense = plugin(plugin.Params(noise_multiplier=1e-6))
    defense.wrap(FedAvg(min_train_nodes=3, min_available_nodes=3), 3, total_rounds=1)
    C = 1.0 if name == "central_dp_fixed" else 0.1  # the (initial) clipping norm
    average = run_round(defense._strategy, 1, [torch.zeros(4), torch.tensor([3.0, 0, 0, 0]), torch.zeros(4)])
    torch.testing.assert_close(average, torch.tensor([C / 3, 0, 0, 0]), atol=1e-4, rtol=0)


def test_central_dp_refuses_an_epsilon_for_a_strategy_that_changes_the_average() -> None:
    params = {"noise_multiplier": 1.0}
    with pytest.raises(UserError, match="central_dp_fixed: strategy FedAdam changes the average"):
        CentralDpFixed(CentralDpFixed.Params(**params)).wrap(FedAdam(), 3, total_rounds=1)
    unaccounted = CentralDpFixed(CentralDpFixed.Params(**params, accounting=False))
    unaccounted.wrap(FedAdam(), 3, total_rounds=1)
    assert "epsilon" not in unaccounted.round_metrics(1)
    with pytest.raises(UserError, match="central_dp_adaptive: .*clipped_count_stddev"):
        CentralDpAdaptive(CentralDpAdaptive.Params(noise_multiplier=1.0)).wrap(FedAvg(), 3, 1)
    with pytest.raises(ValidationError, match="noise_multiplier must be > 0"):
        CentralDpFixed.Params(noise_multiplier=0.0)


def test_central_dp_matches_flowers_rdp_accountant() -> None:
    """Flower's own RDP backend (its optional dependency dp-accounting is a test dependency)."""
    from flwr.serverapp import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        RdpAccountant,
        SamplingMethod,
    )

    from fedsim.defenses.central_dp import OpacusRdpAccountant

    config = PrivacyConfig(
        1e-5, 10, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION
    )
    flower, ours = RdpAccountant(config), OpacusRdpAccountant(config)
    for accountant in (flower, ours):
        accountant.compose(GaussianPrivacyEvent(1.5, 10, 10), count=20)
    assert ours.get_epsilon(1e-5) == pytest.approx(flower.get_epsilon(1e-5), rel=0.01)
    assert math.isfinite(ours.get_epsilon(1e-5))


def fresh_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))


def train_prox(mu: float, defenses: list[DpSgd], momentum: float) -> torch.Tensor:
    """The weights after fedsim's loop under FedProx's `mu`: 4 full-batch steps on 96 examples
    (full batches: the same steps whatever order a loader draws the examples in)."""
    model = fresh_model()
    data = TensorData(torch.randn(96, FEATURES), torch.randint(0, CLASSES, (96,)), CLASSES)
    hp = LocalHyperParams(lr=0.5, batch_size=96, local_epochs=4, local_steps=0, optimizer="sgd",
                          momentum=momentum, weight_decay=0.0, proximal_mu=mu)
    local = LocalTraining(96, 96, 4, None, 1, 1, 0)
    states: list[dict] = [{} for _ in defenses]
    train_locally(model, data, hp, local, torch.Generator().manual_seed(0), defenses, states)
    return flat_weights(defenses[0].unwrap(model) if defenses else model)


def flat_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fedprox_term_pulls_towards_the_global_weights_with_and_without_dp_sgd(momentum: float) -> None:
    """FedProx's mu (w - w_global) enters every step, also under DP-SGD, which replaces the
    data gradient: with no noise and a bound no example reaches, DP-SGD trains exactly as the
    plain loop, and a larger mu keeps the weights closer to where they started."""
    start = flat_weights(fresh_model())
    exact = {"noise_multiplier": 0.0, "max_grad_norm": 1e6}  # full batches: Poisson at q = 1
    for mu in (0.0, 1.0):
        plain = train_prox(mu, [], momentum)
        private = train_prox(mu, [DpSgd(DpSgd.Params(**exact))], momentum)
        torch.testing.assert_close(private, plain, rtol=1e-4, atol=1e-5)
    moved = {mu: (train_prox(mu, [], momentum) - start).norm() for mu in (0.0, 1.0)}
    assert moved[1.0] < 0.8 * moved[0.0], moved
