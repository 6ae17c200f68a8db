"""The spine end to end: scenario -> Flower -> observer -> run directory."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fedsim.core.config import build_scenario
from fedsim.data.datasets import federated_data
from fedsim.core.defense import LocalTraining
from fedsim.models import build_model
from fedsim.federation.observer import load_ground_truth, load_observations
from fedsim.core.results import RunDirectory, read_json
from fedsim.pipeline.runner import run_scenario
from fedsim.federation.sampling import draw_cohort
from fedsim.core.seeding import client_secret, public_seed, torch_generator
from fedsim.federation.training import train_locally


def tiny(tmp_path: Path, **changes: object) -> dict:
    raw: dict = {
        "name": "tiny",
        "seed": 3,
        "data": {"dataset": "digits", "partitioner": "iid", "num_clients": 6},
        "model": {"name": "mlp", "hidden": [32]},
        "training": {"batch_size": 16, "lr": 0.1, "local_epochs": 1},
        "federation": {"rounds": 3, "clients_per_round": 3},
        "observer": {"rounds": "all", "clients": "all"},
        "output": {"dir": str(tmp_path / "runs")},
    }
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return raw


def run(tmp_path: Path, name: str, **changes: object) -> RunDirectory:
    scenario = build_scenario(tiny(tmp_path, **changes))
    return run_scenario(scenario, tmp_path / name)


def metrics_without_time(run_dir: RunDirectory) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in run_dir.metrics()]


def test_run_directory_holds_every_artifact(tmp_path: Path) -> None:
    run_dir = run(tmp_path, "a")
    rounds = list(run_dir.metrics())
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert rounds[-1]["test_accuracy"] > 0.5  # an MLP learns digits in 3 short rounds
    assert all(len(r["clients"]) == 3 for r in rounds[1:])
    assert run_dir.model_path.is_file() and run_dir.training_done
    summary = json.loads(run_dir.summary_path.read_text())
    assert summary["training"]["final_test_accuracy"] == rounds[-1]["test_accuracy"]
    assert len(load_observations(run_dir.root)) == 9  # 3 rounds x 3 sampled clients


def test_same_seed_same_numbers_and_other_seed_differs(tmp_path: Path) -> None:
    first = metrics_without_time(run(tmp_path, "a"))
    second = metrics_without_time(run(tmp_path, "b"))
    assert first == second
    other = metrics_without_time(run(tmp_path, "c", seed=4))
    assert other != first


def test_same_seed_same_model_in_fresh_processes_whatever_their_hash_seed(tmp_path: Path) -> None:
    """Cross-process reproducibility, with an update defense that draws noise (within one
    process set and dict orders repeat; across processes with other hash seeds they do not)."""
    scenario = tmp_path / "noisy.yaml"
    raw = tiny(tmp_path, federation__rounds=2, observer={"rounds": [], "clients": []})
    raw["defenses"] = [{"name": "gaussian_noise", "std": 0.01}, {"name": "topk", "keep_fraction": 0.5}]
    scenario.write_text(yaml.safe_dump(raw))
    models = []
    for hash_seed in ("1", "2"):
        run_dir = tmp_path / f"run{hash_seed}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        command = [sys.executable, "-m", "fedsim.cli", "run", str(scenario), "--run-dir", str(run_dir)]
        subprocess.run(command, env=env, check=True, capture_output=True)
        models.append((run_dir / "model.safetensors").read_bytes())
    assert models[0] == models[1]


def test_cohorts_are_seeded_by_partition_id(tmp_path: Path) -> None:
    run_dir = run(tmp_path, "a")
    for record in list(run_dir.metrics())[1:]:
        sampled = [c["partition-id"] for c in record["clients"]]
        assert sampled == draw_cohort(public_seed(3), "train", record["round"], 6, 3)
    seed = public_seed(3)  # the server holds only the public seed
    assert draw_cohort(seed, "train", 1, 6, 3) != draw_cohort(seed, "train", 2, 6, 3) or draw_cohort(
        seed, "train", 2, 6, 3
    ) != draw_cohort(seed, "train", 3, 6, 3)


def test_recorded_update_equals_recomputed_local_training(tmp_path: Path) -> None:
    run_dir = run(tmp_path, "a")
    scenario = build_scenario(tiny(tmp_path))
    data = federated_data(scenario.data, scenario.public().seed)
    for observation in load_observations(run_dir.root)[:4]:
        model = build_model(scenario.model, data.input_shape, data.num_classes)
        model.load_state_dict(observation.global_state)
        train, _ = data.client(observation.client)
        hp = observation.hyperparams
        result = train_locally(
            model,
            train,
            hp,
            LocalTraining(len(train), hp.batch_size, hp.local_epochs, None, 3, observation.server_round, 3),
            # the client's node secret: simulation-only knowledge, never in a message
            generator=torch_generator(client_secret(3, observation.client), "batches", observation.server_round),
        )
        assert result.steps == observation.local_steps
        for name, value in model.state_dict().items():
            assert torch.equal(value, observation.client_state[name]), name
        truth = load_ground_truth(run_dir.root, observation.server_round, observation.client)
        assert truth == result.batches


def test_observer_records_only_configured_rounds_and_clients(tmp_path: Path) -> None:
    run_dir = run(tmp_path, "a", observer={"rounds": [2], "clients": [0, 1, 2, 3, 4, 5]})
    observed = {(o.server_round, o.client) for o in load_observations(run_dir.root)}
    expected = {(2, c) for c in draw_cohort(public_seed(3), "train", 2, 6, 3)}
    assert observed == expected


def test_dlg_recovers_a_single_image_from_a_recorded_update(tmp_path: Path) -> None:
    run_dir = run(
        tmp_path,
        "a",
        model={"name": "lenet"},  # sigmoid, uniform init: the DLG setting
        training={"batch_size": 1, "local_steps": 1, "lr": 0.1},
        federation={"rounds": 1, "clients_per_round": 2},
        observer={"rounds": [1], "clients": "all"},
        attacks=[{"name": "dlg", "iterations": 5}],  # L-BFGS steps: 100 evaluations
    )
    summary = json.loads(run_dir.summary_path.read_text())
    assert summary["attacks"]["dlg"]["targets"] == 2
    assert summary["attacks"]["dlg"]["psnr"] > 30
    assert summary["attacks"]["dlg"]["label_accuracy"] == 1.0
    assert list((run_dir.attacks_dir / "dlg").glob("*.png"))


def test_cuda_request_falls_back_to_cpu(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    run_dir = run(tmp_path, "a", simulation={"device": "cuda"}, federation={"rounds": 1})
    assert run_dir.training_done
    assert "training on CPU instead" in caplog.text


DLG_SETUP = {
    "model": {"name": "lenet"},
    "training": {"batch_size": 1, "local_steps": 1, "lr": 0.1},
    "federation": {"rounds": 2, "clients_per_round": 2},
    "observer": {"rounds": [1], "clients": "all"},
    "attacks": [{"name": "dlg", "iterations": 5}],
}


def attacked(tmp_path: Path, name: str, defenses: list[dict]) -> tuple[RunDirectory, dict]:
    run_dir = run(tmp_path, name, defenses=defenses, **DLG_SETUP)
    return run_dir, json.loads(run_dir.summary_path.read_text())


def test_train_time_dp_sgd_composes_epsilon_and_stops_dlg(tmp_path: Path) -> None:
    _, plain = attacked(tmp_path, "plain", [])
    run_dir, summary = attacked(
        tmp_path, "dp", [{"name": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0}]
    )
    rounds = list(run_dir.metrics())
    assert rounds[2]["max_client_epsilon"] > 0
    (entry,) = [e for e in summary["privacy"] if e["key"] == "max_client_epsilon"]
    assert entry["epsilon"] == rounds[2]["max_client_epsilon"]
    assert plain["attacks"]["dlg"]["psnr"] > 30
    assert summary["attacks"]["dlg"]["psnr"] < 15


def test_update_time_topk_sends_exactly_the_kept_fraction(tmp_path: Path) -> None:
    run_dir, summary = attacked(tmp_path, "topk", [{"name": "topk", "keep_fraction": 0.1}])
    for observation in load_observations(run_dir.root):
        for name, update in observation.update.items():
            kept = int(torch.count_nonzero(update))
            assert kept <= max(1, round(0.1 * update.numel())), name
    assert summary["attacks"]["dlg"]["psnr"] < 30


def test_server_time_central_dp_reports_epsilon_but_server_still_sees_raw_updates(tmp_path: Path) -> None:
    _, plain = attacked(tmp_path, "plain", [])
    run_dir, summary = attacked(
        tmp_path, "central", [{"name": "central_dp_fixed", "noise_multiplier": 1.0, "clipping_norm": 1.0}]
    )
    rounds = list(run_dir.metrics())
    assert 0 < rounds[1]["central_epsilon"] < rounds[2]["central_epsilon"]
    # Central DP protects the released model, not the clients from the server itself.
    assert summary["attacks"]["dlg"]["psnr"] == pytest.approx(plain["attacks"]["dlg"]["psnr"], abs=1e-6)


@pytest.mark.ray
def test_ray_engine_gives_the_inline_numbers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Raising clients included (one Ray start-up for both): on Ray the same seeded clients
    fail, are recorded in metrics.jsonl, the run finishes, and each failure is one log line
    (Flower alone logs about 45 lines of tracebacks per failed client)."""
    changes = {
        "data": {"dataset": "digits", "num_clients": 4},
        "federation": {"rounds": 2, "clients_per_round": 2},
        "faults": {"kind": "raise", "rate": 0.3},  # seed 3: client 3 fails in round 1, 2 in round 2
    }
    inline = metrics_without_time(run(tmp_path, "inline", **changes))
    with caplog.at_level(logging.WARNING):
        on_ray_run = run(tmp_path, "ray", simulation={"engine": "ray"}, **changes)
    on_ray = metrics_without_time(on_ray_run)
    assert on_ray == inline
    assert [r["failures"] for r in on_ray[1:]] == [{"error": [3]}, {"error": [2]}]
    assert read_json(on_ray_run.training_path)["status"] == "finished"
    flower = [r.getMessage() for r in caplog.records if r.name.startswith("flwr") and r.levelno >= logging.ERROR]
    assert flower == [
        "client failed: fedsim fault: raise (client 3, round 1)",
        "client failed: fedsim fault: raise (client 2, round 2)",
    ]


def test_readme_commands_are_what_ci_runs() -> None:
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    assert "bash scripts/quickstart.sh" in readme and "bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in (root / ".ci/run").read_text()
    assert "fedsim run scenarios/quickstart.yaml" in (root / "scripts/quickstart.sh").read_text()
    assert "python -m pytest" in (root / "scripts/test.sh").read_text()


@pytest.mark.parametrize(
    "strategy",
    [{"name": "fedprox", "proximal_mu": 0.1}, {"name": "fedadam", "eta": 0.05}, {"name": "fedavgm"}],
)
def test_every_strategy_trains_and_differs_from_fedavg(tmp_path: Path, strategy: dict) -> None:
    baseline = metrics_without_time(run(tmp_path, "fedavg", federation={"rounds": 2}))
    other = metrics_without_time(run(tmp_path, strategy["name"], federation={"rounds": 2, "strategy": strategy}))
    assert other[-1]["test_accuracy"] > 0.2  # better than chance (0.1) after 2 rounds
    assert other[-1]["test_loss"] != baseline[-1]["test_loss"]


def test_clients_report_validation_metrics_each_round(tmp_path: Path) -> None:
    run_dir = run(tmp_path, "a", federation={"rounds": 2, "evaluate_clients_per_round": 2})
    for record in list(run_dir.metrics())[1:]:
        assert len(record["client_evaluation"]) == 2
        assert all(0 <= c["val-accuracy"] <= 1 for c in record["client_evaluation"])
