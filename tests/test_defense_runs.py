"""Defenses end to end, from a scenario through Flower to the run directory: client mods act
only when a scenario enables them, client epsilons match an independent accountant over all
rounds, and DP-SGD's modes and module fixes train the same federation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from dp_reference import pld_epsilon, within
from fedsim.core.config import build_scenario
from fedsim.data.datasets import federated_data
from fedsim.core.errors import UserError
from fedsim.models import federated_model
from fedsim.federation.observer import load_observations
from fedsim.core.results import RunDirectory
from fedsim.pipeline.runner import run_scenario
from fedsim.federation.training import LocalHyperParams

pytestmark = pytest.mark.filterwarnings(
    "ignore:Secure RNG turned off",
    "ignore:Optimal order is the",
    "ignore:Full backward hook is firing",
)


def scenario(tmp_path: Path, defenses: list[dict], **sections: Any) -> dict:
    raw: dict = {
        "name": "defended",
        "seed": 1,
        "data": {"dataset": "digits", "num_clients": 6},
        "model": {"name": "mlp", "hidden": [32]},
        "training": {"batch_size": 16, "lr": 0.1},
        "federation": {"rounds": 2, "clients_per_round": 3},
        "observer": {"rounds": "all", "clients": "all"},
        "output": {"dir": str(tmp_path / "runs")},
        "defenses": defenses,
    }
    raw.update(sections)
    return raw


def run(tmp_path: Path, name: str, defenses: list[dict], **sections: Any) -> RunDirectory:
    built = build_scenario(scenario(tmp_path, defenses, **sections))
    return run_scenario(built, tmp_path / name, console=Console(quiet=True))


def update_norms(run_dir: RunDirectory) -> dict[tuple[int, int], float]:
    return {
        (o.server_round, o.client): float(torch.cat([u.flatten() for u in o.update.values()]).norm())
        for o in load_observations(run_dir.root)
    }


def without_time(run_dir: RunDirectory) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in run_dir.metrics()]


def test_client_side_clipping_mods_act_only_when_enabled(tmp_path: Path) -> None:
    plain = run(tmp_path, "plain", [])
    assert min(update_norms(plain).values()) > 0.2
    assert not any("norm_bit" in c for r in plain.metrics() for c in r["clients"])

    fixed = run(tmp_path, "fixed", [{"name": "central_dp_fixed_client", "clipping_norm": 0.1}])
    assert max(update_norms(fixed).values()) <= 0.1 * (1 + 1e-5)  # the server saw clipped updates
    rounds = list(fixed.metrics())
    assert 0 < rounds[1]["central_epsilon"] < rounds[2]["central_epsilon"]

    adaptive = run(
        tmp_path,
        "adaptive",
        [{"name": "central_dp_adaptive_client", "noise_multiplier": 0.5,
          "clipped_count_stddev": 1.0, "initial_clipping_norm": 0.05}],
    )
    norms = update_norms(adaptive)
    assert max(n for (r, _), n in norms.items() if r == 1) <= 0.05 * (1 + 1e-5)
    rounds = list(adaptive.metrics())
    assert all(c["norm_bit"] == 1 for c in rounds[1]["clients"])  # every update was clipped
    assert rounds[1]["central_clipping_norm"] > 0.05  # so the norm grows for round 2
    assert max(n for (r, _), n in norms.items() if r == 2) <= rounds[1]["central_clipping_norm"] * (1 + 1e-5)


def test_client_epsilon_equals_an_independent_accountant_over_all_rounds(tmp_path: Path) -> None:
    """Clients are sampled 3 of 6 per round: each one's epsilon covers the rounds it trained in,
    and `max_client_epsilon` keeps the clients that sat a round out at their last value. The
    reference is dp-accounting's tight PLD: the default PRV figure is never below it and
    within 5% (+0.02) of it."""
    sigma, delta = 1.0, 1e-5
    raw = scenario(tmp_path, [{"name": "dp_sgd", "noise_multiplier": sigma, "delta": delta}],
                   federation={"rounds": 4, "clients_per_round": 3})
    run_dir = run_scenario(build_scenario(raw), tmp_path / "dp", console=Console(quiet=True))
    built = build_scenario(raw)
    data = federated_data(built.data, built.public().seed)  # the partitions the clients hold
    hp = LocalHyperParams(lr=0.1, batch_size=16, local_epochs=1, local_steps=0, optimizer="sgd",
                          momentum=0.0, weight_decay=0.0)
    rounds_trained: dict[int, int] = {}
    latest: dict[int, float] = {}
    for record in list(run_dir.metrics())[1:]:
        for client in record["clients"]:
            pid = int(client["partition-id"])
            rounds_trained[pid] = rounds_trained.get(pid, 0) + 1
            n = len(data.client(pid)[0])
            q = 1 / math.ceil(n / hp.batch_size)  # Opacus's sample rate for the client's loader
            steps = rounds_trained[pid] * hp.steps_for(n)
            independent = pld_epsilon(q, sigma, steps, delta)
            assert within(client["epsilon"], independent, "prv")
            latest[pid] = client["epsilon"]
        assert record["max_client_epsilon"] == max(latest.values())
    assert max(rounds_trained.values()) > 1 and len(rounds_trained) > 3  # composition and sampling


def test_local_dp_runs_reproducibly_and_reports_the_composed_epsilon(tmp_path: Path) -> None:
    defenses = [{"name": "local_dp", "clipping_norm": 1.0, "epsilon": 8.0}]
    first, second = run(tmp_path, "a", defenses), run(tmp_path, "b", defenses)
    assert without_time(first) == without_time(second)
    from fedsim.defenses.local_dp import LocalDp

    once = LocalDp(LocalDp.Params(clipping_norm=1.0, epsilon=8.0)).composed_epsilon(1)
    rounds = list(first.metrics())
    assert all(c["local_dp_epsilon"] == pytest.approx(once) for c in rounds[1]["clients"])
    assert rounds[2]["max_client_local_dp_epsilon"] >= once


def test_ghost_clipping_and_physical_batches_train_the_same_federation(tmp_path: Path) -> None:
    hooks = run(tmp_path, "hooks", [{"name": "dp_sgd", "noise_multiplier": 0.5}])
    ghost = run(tmp_path, "ghost", [{"name": "dp_sgd", "noise_multiplier": 0.5,
                                      "grad_sample_mode": "ghost", "max_physical_batch_size": 4}])
    for a, b in zip(hooks.metrics(), ghost.metrics(), strict=True):
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)
        assert a.get("max_client_epsilon") == b.get("max_client_epsilon")
        assert [c["local-steps"] for c in a["clients"]] == [c["local-steps"] for c in b["clients"]]


def test_batchnorm_model_is_refused_or_fixed_for_every_party(tmp_path: Path) -> None:
    resnet = {"name": "resnet20", "norm": "batch"}
    training = {"batch_size": 16, "lr": 0.05, "local_steps": 2}
    with pytest.raises(UserError, match=r"layer 'stem.1' \(BatchNorm2d\), .* and 18 more\. .*fix_modules: true"):
        run(tmp_path, "refused", [{"name": "dp_sgd"}], model=resnet, training=training)
    fixed = [{"name": "dp_sgd", "fix_modules": True}]
    run_dir = run(tmp_path, "fixed", fixed, model=resnet, training=training,
                  federation={"rounds": 1, "clients_per_round": 2})
    built = build_scenario(scenario(tmp_path, fixed, model=resnet))
    model = federated_model(built, (1, 8, 8), 10)  # what the server and the attacks build
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for observation in load_observations(run_dir.root):
        model.load_state_dict(observation.client_state)  # every update fits the fixed model
    assert list(run_dir.metrics())[-1]["max_client_epsilon"] > 0
