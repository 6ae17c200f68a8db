"""Sweeps: files and cells, kill-and-resume of the real command, the results table, failures.

The kill test starts `python -m fedsim.cli sweep` as a subprocess, SIGKILLs it once one cell
has finished and another is half-way through training, and runs the same command again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from cli_helpers import run_cli
from rich.console import Console

from fedsim.core.errors import UserError
from fedsim.core.results import RunDirectory, read_json
from fedsim.pipeline.runner import run_scenario
from fedsim.experiments.sweep_spec import load_sweep
from fedsim.experiments.sweep_table import load_results

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "name": "tiny",
    "data": {"dataset": "digits", "num_clients": 4},
    "model": {"name": "mlp", "hidden": [16]},
    "training": {"batch_size": 1, "local_steps": 1, "lr": 0.5},
    "federation": {"rounds": 2},
    "observer": {"rounds": [1], "clients": [0]},
    "defenses": [{"name": "topk", "keep_fraction": 1.0}],
    "attacks": [{"name": "dlg", "iterations": 1, "evaluations_per_step": 5}],
}


def write_sweep(directory: Path, **fields: object) -> Path:
    spec = {
        "name": "s",
        "scenario": TINY,
        "axes": {"defenses.0.keep_fraction": [1.0, 0.5]},
        "output": str(directory / "out"),
        **fields,
    }
    path = directory / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"workerz": 2}, "workerz: unknown sweep field (check the spelling); allowed: name"),
        (
            {"axes": {"defenses.0.keep_fractoin": [0.5]}},
            "cell 0 (defenses.0.keep_fractoin=0.5): defenses.0: unknown parameter 'keep_fractoin'",
        ),
        (
            {"axes": {"federaton.rounds": [3]}},
            "cell 0 (federaton.rounds=3): federaton: unknown field",
        ),
        (
            {"axes": {"federation.rounds": [2, 0]}},
            "cell 1 (federation.rounds=0): federation.rounds: Input should be greater than or equal to 1",
        ),
        ({"axes": {"defenses.1.keep_fraction": [0.5]}}, "defenses.1.keep_fraction: no list item 1"),
        (
            {"axes": {"federation.rounds": []}},
            "axes.federation.rounds: List should have at least 1 item",
        ),
        (
            {"mode": "zip", "axes": {"federation.rounds": [1, 2], "training.lr": [0.1]}},
            "mode zip needs axes of equal length",
        ),
        ({"mode": "random"}, "'samples' is needed by mode: random and only by it"),
        ({"samples": 3}, "'samples' is needed by mode: random and only by it"),
        ({"mode": "random", "samples": 5}, "samples: 5 exceeds the 2 combinations of the axes"),
        ({"axes": {"training.lr": {"uniform": [0.1, 1.0]}}}, "a distribution needs mode: random"),
        ({"axes": {"seed": [1, 2]}}, "'seed' is set by 'seeds: [...]'"),
        ({"seeds": [0, 0]}, "seeds: [0, 0] repeats a seed"),
        ({"base": "missing.yaml"}, "give exactly one of 'base'"),
        ({"workers": 0}, "workers: Input should be greater than or equal to 1"),
    ],
)
def test_bad_sweep_files_fail_at_load_naming_the_field(
    tmp_path: Path, fields: dict, expected: str
) -> None:
    path = write_sweep(tmp_path, **fields)
    with pytest.raises(UserError) as err:
        load_sweep(path)
    message = str(err.value)
    assert expected in message and "\n" not in message, message
    assert message.startswith(str(path))


def test_missing_base_file_and_cli_exit_code(tmp_path: Path) -> None:
    spec = {"name": "s", "base": "nowhere.yaml", "axes": {"training.lr": [0.1]}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    code, out, err = run_cli("sweep", path, "--dry-run")
    assert code == 2, (out, err)
    assert (
        err.strip() == f"error: {path}: base: scenario file '{tmp_path / 'nowhere.yaml'}' not found"
    )


def test_grid_zip_and_random_cells(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({**TINY, "seed": 7}))
    axes = {"federation.rounds": [1, 2, 3], "training.lr": [0.1, 0.2, 0.3]}
    grid = load_sweep(
        write_sweep(tmp_path, scenario=None, base="base.yaml", axes=axes, seeds=[0, 1])
    )
    assert len(grid.cells) == 3 * 3 * 2
    assert [(c.index, c.seed) for c in grid.cells[:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert grid.cells[3].values == {"federation.rounds": 1, "training.lr": 0.2}
    assert grid.cells[3].scenario.training.lr == 0.2 and grid.cells[3].scenario.seed == 1
    names = [c.name for c in grid.cells]
    assert len(set(names)) == len(names) and names[0].startswith("cell-0000-seed0-")
    again = load_sweep(
        write_sweep(tmp_path, scenario=None, base="base.yaml", axes=axes, seeds=[0, 1])
    )
    assert [c.name for c in again.cells] == names  # deterministic: a rerun finds its cells

    default_seed = load_sweep(write_sweep(tmp_path, scenario=None, base="base.yaml", axes=axes))
    assert {c.seed for c in default_seed.cells} == {7}  # no `seeds`: the base scenario's seed

    zipped = load_sweep(write_sweep(tmp_path, mode="zip", axes=axes))
    assert [c.values for c in zipped.cells] == [
        {"federation.rounds": r, "training.lr": lr} for r, lr in zip([1, 2, 3], [0.1, 0.2, 0.3])
    ]

    fixed = load_sweep(
        write_sweep(tmp_path, axes=axes, **{"set": {"federation.clients_per_round": 2}})
    )
    assert {c.scenario.federation.clients_per_round for c in fixed.cells} == {2}

    drawn = write_sweep(tmp_path, mode="random", samples=6, axes=axes)
    random_cells = [c.values for c in load_sweep(drawn).cells]
    assert len(random_cells) == 6 and len({json.dumps(v) for v in random_cells}) == 6  # no repeats
    assert random_cells == [c.values for c in load_sweep(drawn).cells]  # seeded

    mixed = {
        "training.lr": {"loguniform": [0.01, 1.0]},
        "federation.rounds": {"randint": [1, 4]},
        "defenses": [[], [{"name": "topk", "keep_fraction": 0.5}]],
    }
    cells = load_sweep(write_sweep(tmp_path, mode="random", samples=20, axes=mixed)).cells
    lrs = [c.values["training.lr"] for c in cells]
    assert all(0.01 <= lr <= 1.0 for lr in lrs) and len(set(lrs)) == 20
    assert {c.values["federation.rounds"] for c in cells} <= {1, 2, 3}
    assert {len(c.scenario.defenses) for c in cells} == {0, 1}  # a list-valued axis


def test_dry_run_lists_cells_and_writes_nothing(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, seeds=[0, 1])
    code, out, err = run_cli("sweep", path, "--dry-run")
    assert code == 0, err
    assert "4 cells" in out and out.count("pending") == 4
    assert "cell-0001-seed1-" in out and "0.5" in out
    assert not (tmp_path / "out").exists()


def child_pids(pid: int) -> set[int]:
    """Processes whose parent is `pid` (from /proc)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.add(int(stat.parent.name))
    return children


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def snapshot(root: Path) -> dict[str, int]:
    """Every file under `root` -> its mtime (ns)."""
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


ROUNDS = 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and PR_SET_PDEATHSIG")
def test_sigkill_mid_sweep_then_rerun_resumes_without_loss_or_duplicates(tmp_path: Path) -> None:
    scenario = {**TINY, "federation": {"rounds": ROUNDS}}
    path = write_sweep(
        tmp_path,
        scenario=scenario,
        seeds=[0, 1],
        workers=2,
        axes={"defenses.0.keep_fraction": [1.0, 0.5]},
    )
    sweep = load_sweep(path)
    directory = sweep.directory
    command = [sys.executable, "-m", "fedsim.cli", "sweep", str(path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )

    def state() -> tuple[list[str], list[str]]:
        done = [c.name for c in sweep.cells if (directory / c.name / "summary.json").exists()]
        training = [
            c.name
            for c in sweep.cells
            if (directory / c.name / "metrics.jsonl").exists()
            and not (directory / c.name / "training.json").exists()
        ]
        return done, training

    deadline = time.monotonic() + 120
    while True:
        done, training = state()
        if done and training:
            break
        assert first.poll() is None, (
            f"the sweep ended before it could be killed: {first.stderr.read().decode()}"
        )
        assert time.monotonic() < deadline, "no finished cell and half-done cell within 120 s"
        time.sleep(0.02)
    workers = child_pids(first.pid)
    first.kill()  # SIGKILL: no cleanup runs in the sweep process
    first.wait()
    time.sleep(1.0)
    assert workers and not any(alive(pid) for pid in workers), "workers outlived the killed sweep"

    done, training = state()
    assert 0 < len(done) < len(sweep.cells) and training
    half_done = training[0]
    rounds_at_kill = len(list(RunDirectory(directory / half_done).metrics()))
    assert 0 < rounds_at_kill < ROUNDS + 1
    finished_before = {name: snapshot(directory / name) for name in done}

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"{len(sweep.cells)} cells ({len(done)} already done)" in second.stdout

    for name, files in finished_before.items():  # finished cells untouched
        assert snapshot(directory / name) == files, name
    for cell in sweep.cells:  # every cell complete, each round and each attack exactly once
        run = RunDirectory(directory / cell.name)
        assert run.summary_path.exists() and run.training_done
        assert [r["round"] for r in run.metrics()] == list(range(ROUNDS + 1))
        assert sorted(p.name for p in run.attacks_dir.rglob("*.json")) == [
            "round_0001_client_0000.json"
        ]
        leftovers = [p for p in run.root.rglob(".*") if p.name != ".lock"]
        assert not leftovers, leftovers

    # the killed cell restarted cleanly: the same numbers as an uninterrupted run of it
    cell = next(c for c in sweep.cells if c.name == half_done)
    fresh = run_scenario(cell.scenario, tmp_path / "fresh", Console(file=open(os.devnull, "w")))
    resumed = [r["test_accuracy"] for r in RunDirectory(directory / half_done).metrics()]
    assert resumed == [r["test_accuracy"] for r in fresh.metrics()]

    table = load_results(directory)
    assert len(table) == len(sweep.cells) and table["cell"].is_unique
    assert set(table["status"]) == {"done"}
    csv = pd.read_csv(directory / "results.csv")
    assert csv["cell"].tolist() == table["cell"].tolist()


def test_a_cell_that_validation_refuses_refuses_the_sweep_before_anything_runs(tmp_path: Path) -> None:
    """The contract: a cell that can never run (central DP's epsilon needs FedAvg's average)
    is a bad sweep file, refused at load naming the cell; per-cell failures (next test) are
    for what happens while a cell runs, which a rerun retries."""
    scenario = {**TINY, "defenses": [*TINY["defenses"], "central_dp_fixed"]}
    path = write_sweep(tmp_path, scenario=scenario, axes={"federation.strategy": ["fedavg", "fedadam"]})
    code, out, err = run_cli("sweep", path)
    assert code == 2 and err.count("\n") == 1, (out, err)
    assert "cell 1 (federation.strategy=fedadam): scenario: defenses.central_dp_fixed: strategy FedAdam" in err
    assert not (tmp_path / "out").exists()


def test_results_table_failures_and_retry(tmp_path: Path) -> None:
    # every client raises in the faults.rate=1 cells: no usable reply, the failure policy stops
    # their training (status failed), the others finish (one worker: the parallel path is the
    # kill test's)
    scenario = {**TINY, "attacks": [{"name": "idlg", "iterations": 1, "evaluations_per_step": 5}]}
    path = write_sweep(
        tmp_path,
        scenario=scenario,
        workers=1,
        seeds=[3],
        axes={"faults.rate": [0.0, 1.0], "defenses.0.keep_fraction": [1.0, 0.5]},
    )
    code, out, err = run_cli("sweep", path)
    assert code == 1, (out, err)
    assert out.count("failed") >= 2 and "training failed: round 1: 0 usable replies of 4" in out

    table = load_results(tmp_path / "out" / "s")
    assert len(table) == 4
    assert table["status"].tolist() == ["done", "done", "failed", "failed"]
    assert table["faults.rate"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert table["defenses.0.keep_fraction"].tolist() == [1.0, 0.5, 1.0, 0.5]
    for column in (
        "seed",
        "final_test_accuracy",
        "best_test_accuracy",
        "idlg_psnr",
        "idlg_ssim",
        "idlg_label_accuracy",
        "wall_time_s",
    ):
        assert column in table, column
    assert table["seed"].tolist() == [3, 3, 3, 3]
    for _, row in table[table["status"] == "done"].iterrows():
        summary = read_json(Path(row["run_dir"]) / "summary.json")
        assert row["final_test_accuracy"] == summary["training"]["final_test_accuracy"]
        assert row["idlg_psnr"] == summary["attacks"]["idlg"]["psnr"]
        assert row["idlg_label_accuracy"] == 1.0  # iDLG reads a batch-1 label exactly
        assert row["wall_time_s"] > summary["training"]["wall_time_s"]
    assert table.loc[table["status"] == "failed", "final_test_accuracy"].isna().all()
    error = (Path(table.loc[2, "run_dir"]) / "error.txt").read_text()
    assert error.startswith("training failed: round 1: 0 usable replies of 4") and error.count("\n") == 1
    assert (Path(table.loc[2, "run_dir"]) / "summary.json").exists()  # failed even with a summary

    parquet = pd.read_parquet(tmp_path / "out" / "s" / "results.parquet")
    pd.testing.assert_frame_equal(parquet, table)

    # rerun unchanged: finished cells are untouched, failed cells are tried again
    done_before = {
        n: snapshot(Path(d))
        for n, d, s in table[["cell", "run_dir", "status"]].values
        if s == "done"
    }
    code, out, err = run_cli("sweep", path)
    assert code == 1 and "4 cells (2 already done)" in out, (out, err)
    assert "training failed earlier (round 1: " in (Path(table.loc[2, "run_dir"]) / "log.txt").read_text()
    # drop the failing setting: the cells left are the finished ones, nothing runs
    fixed = write_sweep(
        tmp_path,
        scenario=scenario,
        workers=1,
        seeds=[3],
        axes={"faults.rate": [0.0], "defenses.0.keep_fraction": [1.0, 0.5]},
    )
    code, out, err = run_cli("sweep", fixed)
    assert code == 0 and "2 cells (2 already done)" in out, (out, err)
    for name, files in done_before.items():
        assert snapshot(tmp_path / "out" / "s" / name) == files
    assert load_results(tmp_path / "out" / "s")["status"].tolist() == ["done", "done"]
