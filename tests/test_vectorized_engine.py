"""The vectorised cohort engine trains each client exactly as the inline engine does."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedsim.core.config import build_scenario
from fedsim.core.defense import LocalTraining
from fedsim.core.results import RunDirectory
from fedsim.core.seeding import torch_generator
from fedsim.data.datasets import TensorData
from fedsim.defenses.mid import Mid
from fedsim.federation.cohort.engine import fallback_reason
from fedsim.federation.client_call import client_setup
from fedsim.federation.cohort.executor import batch_schedule, train_cohort
from fedsim.federation.cohort.plan import chunk_size
from fedsim.federation.server import train_config
from fedsim.federation.simulation import run_federation
from fedsim.federation.training import LocalHyperParams, train_locally

TOLERANCE = 1e-5  # float32: max abs difference of any parameter after a few local steps
ADAM_TOLERANCE = 5e-5  # Adam divides by sqrt(v): float32 rounding of the batched sums grows

COMBINATIONS = {
    "sgd": dict(optimizer="sgd", momentum=0.0, weight_decay=0.0),
    "sgd_momentum_wd": dict(optimizer="sgd", momentum=0.9, weight_decay=1e-3),
    "adam": dict(optimizer="adam", momentum=0.0, weight_decay=1e-3),
    "fedprox": dict(optimizer="sgd", momentum=0.5, weight_decay=0.0, proximal_mu=0.3),
}


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


@pytest.mark.parametrize("name", COMBINATIONS)
@pytest.mark.parametrize("local_steps", [0, 4])
def test_per_client_updates_match_inline(name: str, local_steps: int) -> None:
    hp = LocalHyperParams(lr=0.1, batch_size=4, local_epochs=2, local_steps=local_steps, **COMBINATIONS[name])
    sizes = [3, 9, 14]  # unequal: different step counts and partial last batches
    datas = [TensorData(torch.randn(n, 6), torch.randint(0, 3, (n,)), 3) for n in sizes]
    model = tiny_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    schedules = [batch_schedule(n, hp, torch_generator(7, "batches", c)) for c, n in enumerate(sizes)]
    done = train_cohort(model, [start] * len(sizes), datas, schedules, hp, torch.device("cpu"))
    for c, data in enumerate(datas):
        inline = tiny_model()
        training = LocalTraining(len(data), hp.batch_size, hp.local_epochs, local_steps or None, 1, 1, 0)
        result = train_locally(inline, data, hp, training, torch_generator(7, "batches", c))
        assert result.batches == [b.tolist() for b in schedules[c]]
        assert result.mean_loss == pytest.approx(done.mean_losses[c], abs=TOLERANCE)
        for k, v in inline.state_dict().items():
            assert (v - done.client_params(c)[k]).abs().max() <= (ADAM_TOLERANCE if name == "adam" else TOLERANCE), (name, c, k)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_mid_updates_match_inline(momentum: float) -> None:
    """MID's KL term and bottleneck noise (each client's eps from its own stream, seeded as
    `prepare` seeds torch's generator) give the inline parameters, losses and mean KL."""
    hp = LocalHyperParams(lr=0.2, batch_size=4, local_epochs=2, local_steps=0, optimizer="sgd", momentum=momentum, weight_decay=0.0)
    mid = Mid(Mid.Params(beta=0.5, bottleneck=2))
    sizes = [3, 9, 14]
    datas = [TensorData(torch.randn(n, 6), torch.randint(0, 3, (n,)), 3) for n in sizes]
    model = mid.wrap_model(tiny_model())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    generators = [torch_generator(7, "batches", c) for c in range(len(sizes))]
    terms = [mid.batched_loss(model, g) for g in generators]
    schedules = [batch_schedule(n, hp, g) for n, g in zip(sizes, generators)]
    done = train_cohort(model, [start] * len(sizes), datas, schedules, hp, torch.device("cpu"), extra=terms)
    for c, data in enumerate(datas):
        inline = Mid(mid.params)
        net = inline.wrap_model(tiny_model())
        training = LocalTraining(len(data), hp.batch_size, hp.local_epochs, None, 1, 1, 0)
        result = train_locally(net, data, hp, training, torch_generator(7, "batches", c), [inline], [{}])
        assert result.batches == [b.tolist() for b in schedules[c]]
        assert result.mean_loss == pytest.approx(done.mean_losses[c], abs=TOLERANCE)
        assert inline.finish({})["mid_kl"] == pytest.approx(terms[c].metrics(done.term_means[c])["mid_kl"], abs=TOLERANCE)
        for k, v in net.state_dict().items():
            assert (v - done.client_params(c)[k]).abs().max() <= TOLERANCE, (c, k)
    moved = max((done.client_params(0)[k] - start[k]).abs().max() for k in start)
    assert moved > 0.01  # the clients trained


def scenario(engine: str, out: Path, **extra: object) -> object:
    return build_scenario(
        {
            "name": "v",
            "data": {"num_clients": 6, "partitioner": {"name": "dirichlet", "alpha": 0.5}},
            "model": {"name": "mlp", "hidden": [16]},
            "training": {"batch_size": 8, "lr": 0.05, "momentum": 0.9},
            "federation": {"rounds": 2},
            "observer": {"rounds": "none"},
            "simulation": {"engine": engine, "max_clients_per_batch": 4},
            "output": {"dir": str(out), "save_model": False},
            **extra,
        }
    )


def rounds(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_vectorized_run_matches_inline(tmp_path: Path) -> None:
    """Whole runs (chunks of 4 of 6 clients, an update-time defense on the reply) agree."""
    defenses = {"defenses": [{"name": "norm_clip", "max_norm": 1.0}]}
    for engine in ("inline", "vectorized"):
        run_federation(scenario(engine, tmp_path, **defenses), RunDirectory(tmp_path / engine))
    inline, vectorized = rounds(tmp_path / "inline"), rounds(tmp_path / "vectorized")
    assert len(inline) == len(vectorized) == 3
    for a, b in zip(inline, vectorized):
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-3)
        assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-4)
        for ca, cb in zip(a["clients"], b["clients"]):
            assert ca["local-steps"] == cb["local-steps"] and ca["partition-id"] == cb["partition-id"]
            assert ca["train-loss"] == pytest.approx(cb["train-loss"], abs=1e-4)


def test_vectorized_mid_run_matches_inline(tmp_path: Path) -> None:
    """A whole MID run trains vectorised (no fallback) and reports the inline mean KL."""
    mid = {"defenses": [{"name": "mid", "beta": 0.1}]}
    assert fallback_reason(scenario("vectorized", tmp_path, **mid).public().to_yaml()) is None
    for engine in ("inline", "vectorized"):
        run_federation(scenario(engine, tmp_path, **mid), RunDirectory(tmp_path / engine))
    inline, vectorized = rounds(tmp_path / "inline"), rounds(tmp_path / "vectorized")
    for a, b in zip(inline, vectorized):
        assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-4)
        for ca, cb in zip(a["clients"], b["clients"]):
            assert ca["train-loss"] == pytest.approx(cb["train-loss"], abs=1e-4)
            assert ca["mid_kl"] == pytest.approx(cb["mid_kl"], abs=1e-4)


def test_unsupported_scenarios_fall_back_with_reason(tmp_path: Path) -> None:
    both = scenario("vectorized", tmp_path, defenses=[{"name": "mid"}, {"name": "dp_sgd", "noise_multiplier": 1.0}])
    assert fallback_reason(both.public().to_yaml()) == "train-time defenses (Mid, DpSgd) compose only in the inline training loop"
    assert fallback_reason(scenario("vectorized", tmp_path).public().to_yaml()) is None


@pytest.mark.ray
def test_ray_workers_give_the_in_process_numbers(tmp_path: Path) -> None:
    """Shards of 3 clients on two Ray actors train as the in-process chunks of 3 do: the same
    global model (test loss) and DP-SGD steps and epsilons (accounted on the driver), bit for bit."""
    dp = {"defenses": [{"name": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0}]}
    runs = {}
    for name, workers in (("local", 0), ("ray", 2)):
        sim = {"engine": "vectorized", "max_clients_per_batch": 3, "ray_workers": workers}
        run_federation(scenario("vectorized", tmp_path, simulation=sim, **dp), RunDirectory(tmp_path / name))
        runs[name] = rounds(tmp_path / name)
    for a, b in zip(runs["local"], runs["ray"]):
        assert a["test_loss"] == b["test_loss"]
        for key in ("local-steps", "epsilon"):
            assert [c[key] for c in a["clients"]] == [c[key] for c in b["clients"]]
    assert runs["ray"][-1]["clients"][0]["epsilon"] > runs["ray"][1]["clients"][0]["epsilon"] > 0


def test_cuda_chunks_follow_the_free_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA (faked here: only the memory query is), a chunk holds as many clients as a share
    of the free memory fits: twice the memory, twice the clients; a full GPU still trains one."""
    setup = client_setup(scenario("vectorized", tmp_path, simulation={"engine": "vectorized"}).public().to_yaml())
    on_gpu = replace(setup, device=torch.device("cuda"))
    hp = LocalHyperParams.from_config(train_config(setup.scenario))
    sizes = {}
    for free in (1, 2**26, 2**27):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 2**34))
        sizes[free] = chunk_size(on_gpu, hp)
    assert sizes[1] == 1 and sizes[2**26] > 100
    assert abs(sizes[2**27] - 2 * sizes[2**26]) <= 1
    assert chunk_size(setup, hp) == 1 << 30  # CPU, no max_clients_per_batch: the whole cohort
