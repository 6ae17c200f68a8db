"""DP-SGD in the vectorised engine: the inline (Opacus) engine's steps, noise and epsilon."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, grad, vmap

from fedsim.core.config import build_scenario
from fedsim.core.defense import LocalTraining
from fedsim.core.results import RunDirectory
from fedsim.core.seeding import torch_generator
from fedsim.data.datasets import TensorData
from fedsim.defenses.dp_sgd import DpSgd
from fedsim.federation.cohort.engine import fallback_reason
from fedsim.federation.cohort.executor import per_example_loss, train_cohort
from fedsim.federation.cohort.private import linear_probes
from fedsim.federation.simulation import run_federation
from fedsim.federation.training import LocalHyperParams, train_locally

TOLERANCE = 1e-6  # float32: max abs parameter difference after 2 epochs (measured ~3e-8)
CPU = torch.device("cpu")


def tiny_model(hidden: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3))


def tiny_convnet() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 3)]
    return torch.nn.Sequential(*layers)


def cohort(sizes: list[int], shape: tuple[int, ...] = (6,)) -> list[TensorData]:
    torch.manual_seed(1)
    return [TensorData(torch.randn(n, *shape), torch.randint(0, 3, (n,)), 3) for n in sizes]


def test_linear_layers_are_book_kept() -> None:
    """Both nn.Linear of the MLP get probes (no per-example weight gradients); a layer called
    twice (shared) does not."""
    assert linear_probes(tiny_model(), torch.randn(1, 6)) == {"0": (1, 5), "2": (1, 3)}
    shared = torch.nn.Linear(6, 6)
    assert linear_probes(torch.nn.Sequential(shared, torch.nn.ReLU(), shared), torch.randn(1, 6)) == {}


@pytest.mark.parametrize(("noise", "mode", "build"), [(0.0, "hooks", tiny_model), (1.0, "auto", tiny_model), (1.0, "hooks", tiny_convnet)])
def test_vectorized_dp_sgd_equals_opacus(noise: float, mode: str, build: object) -> None:
    """Unequal clients (different Poisson batch sizes and step counts), momentum and weight
    decay, clipping active: parameters, batches, the accountant state and epsilon agree (the
    MLP book-kept; the ConvNet's convolution by per-example gradients, its head book-kept)."""
    hp = LocalHyperParams(lr=0.1, batch_size=4, local_epochs=2, local_steps=0, optimizer="sgd", momentum=0.5, weight_decay=1e-3)
    sizes, max_grad_norm = [5, 12, 20], 0.1
    datas = cohort(sizes, (6,) if build is tiny_model else (1, 6, 6))
    accountant = "prv" if mode == "auto" else "rdp"  # prv's first epsilon costs seconds (imports)
    dp = DpSgd(DpSgd.Params(noise_multiplier=noise, max_grad_norm=max_grad_norm, grad_sample_mode=mode, accountant=accountant))
    trainings = [LocalTraining(n, hp.batch_size, hp.local_epochs, None, 3, 1, 0) for n in sizes]
    steps = [dp.private_steps(t, torch_generator(7, "batches", c), CPU) for c, t in enumerate(trainings)]
    model = build()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    per_example = vmap(grad(lambda p, x, y: per_example_loss(functional_call(model, p, (x[None],)), y[None], False)[0]), (None, 0, 0))
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_example(start, datas[2].x, datas[2].y).values()]).norm(dim=0)
    assert (norms > max_grad_norm).float().mean() > 0.5  # clipping acts on most examples
    done = train_cohort(model, [start] * len(sizes), datas, [s.batches for s in steps], hp, CPU, steps)
    for c, data in enumerate(datas):
        inline, state, vectorized_state = build(), {}, {}
        result = train_locally(inline, data, hp, trainings[c], torch_generator(7, "batches", c), [dp], [state])
        assert result.batches == [b.tolist() for b in steps[c].batches]
        assert steps[c].record(vectorized_state) == result.metrics  # the same epsilon, exactly
        assert vectorized_state == state
        assert result.mean_loss == pytest.approx(done.mean_losses[c], abs=TOLERANCE)
        for k, v in inline.state_dict().items():
            assert (v - done.client_params(c)[k]).abs().max() <= TOLERANCE, (c, k)


def test_vectorized_dp_sgd_noise_has_the_accounted_std() -> None:
    """One SGD step at lr 1: noisy minus noiseless update is the noise / expected batch size,
    of std noise_multiplier * C / expected_batch_size, independent across clients."""
    hp = LocalHyperParams(lr=1.0, batch_size=5, local_epochs=1, local_steps=1, optimizer="sgd", momentum=0.0, weight_decay=0.0)
    sizes = [20] * 12
    datas, model = cohort(sizes), tiny_model(hidden=64)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    training = LocalTraining(20, hp.batch_size, 1, 1, 1, 1, 0)

    def updates(noise: float) -> torch.Tensor:
        dp = DpSgd(DpSgd.Params(noise_multiplier=noise, max_grad_norm=0.5))
        steps = [dp.private_steps(training, torch_generator(3, "batches", c), CPU) for c in range(len(sizes))]
        done = train_cohort(model, [start] * len(sizes), datas, [s.batches for s in steps], hp, CPU, steps)
        assert {s.expected_batch_size for s in steps} == {5}
        return torch.stack([torch.cat([done.client_params(c)[k].flatten() for k in start]) for c in range(len(sizes))])

    noise = updates(0.0) - updates(2.0)  # [clients, parameters]
    want = 2.0 * 0.5 / 5
    assert noise.std().item() == pytest.approx(want, rel=0.03)  # 12 x 643 draws: 4 sigma ~ 3%
    assert abs(noise.mean().item()) < 0.05 * want
    correlation = torch.corrcoef(noise)[~torch.eye(len(sizes), dtype=torch.bool)]
    assert correlation.abs().max() < 0.2  # each client draws from its own generator


def scenario(engine: str, out: Path, defenses: list[dict]) -> object:
    return build_scenario(
        {
            "name": "vdp",
            "data": {"num_clients": 5, "partitioner": {"name": "dirichlet", "alpha": 0.5}},
            "model": {"name": "mlp", "hidden": [16]},
            "training": {"batch_size": 8, "lr": 0.05, "momentum": 0.9, "local_epochs": 1},
            "federation": {"rounds": 2},
            "observer": {"rounds": "none"},
            "simulation": {"engine": engine, "max_clients_per_batch": 3},
            "output": {"dir": str(out), "save_model": False},
            "defenses": defenses,
        }
    )


def test_vectorized_dp_sgd_run_matches_inline(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Whole runs: each client's epsilon (composed over both rounds) is identical, and the
    global model's test metrics agree; nothing falls back to inline."""
    dp = [{"name": "dp_sgd", "noise_multiplier": 1.1, "max_grad_norm": 0.5, "accountant": "rdp"}]
    with caplog.at_level(logging.WARNING, logger="fedsim"):
        for engine in ("inline", "vectorized"):
            run_federation(scenario(engine, tmp_path, dp), RunDirectory(tmp_path / engine))
    assert "runs inline" not in caplog.text
    inline, vectorized = ([json.loads(line) for line in (tmp_path / e / "metrics.jsonl").read_text().splitlines()] for e in ("inline", "vectorized"))
    assert len(inline) == len(vectorized) == 3
    for a, b in zip(inline, vectorized):
        assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-5)
        assert [c.get("epsilon") for c in a["clients"]] == [c.get("epsilon") for c in b["clients"]]
    epsilons = [[c["epsilon"] for c in r["clients"]] for r in vectorized[1:]]
    assert all(0 < e1 < e2 for e1, e2 in zip(*epsilons))  # composed over the rounds


def test_what_the_vectorised_engine_leaves_to_inline(tmp_path: Path) -> None:
    def reason(defenses: list[dict]) -> str | None:
        return fallback_reason(scenario("vectorized", tmp_path, defenses).public().to_yaml())

    assert reason([{"name": "dp_sgd", "target_epsilon": 8.0}]) is None
    assert "secure_mode" in reason([{"name": "dp_sgd", "secure_mode": True}])
    assert reason([{"name": "mid"}]) is None  # its KL term and noise run batched (test_vectorized_engine.py)
    assert "compose only in the inline" in reason([{"name": "dp_sgd"}, {"name": "mid"}])
