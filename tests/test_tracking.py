"""MLflow tracking: `--mlflow` copies finished runs and sweep cells into MLflow's local store,
with the run directory's numbers, once each (a rerun adds nothing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from cli_helpers import run_cli
from test_sweep import TINY as SWEEP_TINY

from fedsim.core.results import read_json
from fedsim.experiments.sweep_table import load_results

TINY = {**SWEEP_TINY, "name": "tiny_tracked"}


def runs_of(store: str, experiment: str) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(store)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def test_a_run_is_logged_with_its_numbers_params_and_images(tmp_path: Path) -> None:
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(yaml.safe_dump(TINY))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"

    code, out, err = run_cli("run", scenario, "--run-dir", run_dir, "--mlflow", store)
    assert code == 0, out + err

    (logged,) = runs_of(store, "tiny_tracked")
    summary = read_json(run_dir / "summary.json")
    metrics = logged.data.metrics
    assert metrics["final_test_accuracy"] == pytest.approx(summary["training"]["final_test_accuracy"])
    assert metrics["dlg.psnr"] == pytest.approx(summary["attacks"]["dlg"]["psnr"])
    assert metrics["dlg.label_accuracy"] == pytest.approx(summary["attacks"]["dlg"]["label_accuracy"])
    assert logged.data.params["training.batch_size"] == "1"
    assert logged.data.params["defenses.0.keep_fraction"] == "1.0"
    assert logged.data.tags["fedsim.run_dir"] == str(run_dir.resolve())

    client = mlflow.MlflowClient(store)
    history = client.get_metric_history(logged.info.run_id, "test_accuracy")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    per_round = [json.loads(line)["test_accuracy"] for line in lines]
    assert [m.step for m in history] == [0, 1, 2]
    assert [m.value for m in history] == pytest.approx(per_round)
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"scenario.yaml", "summary.json", "attacks"} <= artifacts
    images = client.list_artifacts(logged.info.run_id, "attacks/dlg")
    assert [a.path for a in images] == ["attacks/dlg/round_0001_client_0000.png"]


def test_a_sweep_logs_every_cell_once_even_when_rerun(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "name": "tracked",
                "scenario": TINY,
                "axes": {"defenses.0.keep_fraction": [1.0, 0.5]},
                "output": str(tmp_path / "out"),
            }
        )
    )
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"

    for _ in range(2):  # the second run resumes: all cells done, nothing new to log
        code, out, err = run_cli("sweep", sweep, "--mlflow", store)
        assert code == 0, out + err

    logged = runs_of(store, "tracked")
    table = load_results(tmp_path / "out" / "tracked")
    assert sorted(r.data.tags["fedsim.cell"] for r in logged) == sorted(table["cell"])
    for run in logged:
        row = table.set_index("cell").loc[run.data.tags["fedsim.cell"]]
        assert run.data.params["defenses.0.keep_fraction"] == str(row["defenses.0.keep_fraction"])
        assert run.data.metrics["dlg.psnr"] == pytest.approx(row["dlg_psnr"])


def test_missing_mlflow_is_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(yaml.safe_dump(TINY))
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    code, out, err = run_cli("run", scenario, "--run-dir", tmp_path / "run", "--mlflow", "sqlite:///x.db")
    assert code == 2
    assert "pip install 'fedsim[tracking]'" in err
    assert not (tmp_path / "run").exists()  # refused before training


def test_an_unusable_store_is_one_line_and_exit_2(tmp_path: Path) -> None:
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(yaml.safe_dump(TINY))
    under_a_file = f"sqlite:///{scenario}/mlflow.db"  # a database inside a regular file
    code, out, err = run_cli("run", scenario, "--run-dir", tmp_path / "run", "--mlflow", under_a_file)
    assert code == 2, out + err
    assert not (tmp_path / "run").exists()
    assert "--mlflow" in err and "sqlite:///mlflow.db" in err
