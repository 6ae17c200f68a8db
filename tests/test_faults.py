"""Seeded client faults and the failure policy: failing clients are dropped, recorded in
metrics.jsonl and the observer's records, the run finishes (or fails with a clear status
below `federation.min_replies`), and central-DP epsilon counts only released rounds."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from rich.console import Console

from fedsim.core.config import FaultsConfig, Scenario, build_scenario
from fedsim.core.results import FAILED, RunDirectory, atomic_write_json, read_record
from fedsim.federation.faults import fault_strikes
from fedsim.federation.observer import _finite
from fedsim.federation.simulation import OneLineFaults
from fedsim.pipeline.runner import run_scenario

pytestmark = pytest.mark.usefixtures("one_thread")

CLIENTS, ROUNDS = 4, 3


def scenario(tmp_path: Path, **sections: Any) -> Scenario:
    base: dict[str, Any] = {
        "name": "faults",
        "seed": 2,  # rate 0.4: some clients fail in rounds 1 and 3, none in 2
        "data": {"dataset": "digits", "num_clients": CLIENTS},
        "training": {"batch_size": 8, "local_steps": 2},
        "federation": {"rounds": ROUNDS},
        "observer": {"rounds": "all", "clients": "all"},
        "output": {"dir": str(tmp_path)},
    }
    return build_scenario({**base, **sections})


def train(s: Scenario, tmp_path: Path, name: str) -> tuple[RunDirectory, list[dict[str, Any]]]:
    run = run_scenario(s, tmp_path / name, Console(quiet=True))
    return run, [r for r in run.metrics() if r["round"] > 0]


def expected_failures(s: Scenario) -> dict[int, list[int]]:
    """The partition ids `fault_strikes` fails per round, as the server's public seed draws."""
    seed = s.public().seed
    return {
        r: [p for p in range(CLIENTS) if fault_strikes(s.faults, seed, r, p)] for r in range(1, ROUNDS + 1)
    }


def test_strikes_are_seeded_and_follow_the_rate() -> None:
    faults = FaultsConfig(rate=0.3, from_round=2, clients=None)
    draws = [fault_strikes(faults, 11, r, p) for r in range(2, 202) for p in range(50)]
    assert draws == [fault_strikes(faults, 11, r, p) for r in range(2, 202) for p in range(50)]
    assert draws != [fault_strikes(faults, 12, r, p) for r in range(2, 202) for p in range(50)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.02  # 10,000 draws: std 0.0046
    assert not any(fault_strikes(faults, 11, 1, p) for p in range(50))  # before from_round
    only = FaultsConfig(rate=1.0, clients=[2])
    assert [p for p in range(5) if fault_strikes(only, 0, 1, p)] == [2]


@pytest.mark.parametrize(("kind", "recorded"), [("raise", "error"), ("drop", "dropped"), ("nan", "non_finite")])
def test_fault_is_dropped_recorded_and_run_finishes(kind: str, recorded: str, tmp_path: Path) -> None:
    s = scenario(tmp_path, faults={"kind": kind, "rate": 0.4})
    expected = expected_failures(s)
    assert 0 < sum(map(len, expected.values())) < CLIENTS * ROUNDS  # the seed makes some fail
    run, rounds = train(s, tmp_path, "run")
    assert read_record(run.training_path)["status"] == "finished"
    for record in rounds:
        failed = expected[record["round"]]
        assert record["failures"] == ({recorded: failed} if failed else {})
        seen = list(range(CLIENTS)) if kind == "nan" else [p for p in range(CLIENTS) if p not in failed]
        assert sorted(c["partition-id"] for c in record["clients"]) == seen  # nan: seen, not averaged
        observed = sorted(run.observations_dir.glob(f"round_{record['round']:04d}/client_*.safetensors"))
        assert [int(p.stem.split("_")[1]) for p in observed] == seen
        marker = run.observations_dir / f"round_{record['round']:04d}" / "failures.json"
        assert (json.loads(marker.read_text())["failures"] if failed else {}) == record["failures"]
    assert all(r["test_accuracy"] is not None for r in rounds)  # NaN replies never reached the average
    _, again = train(s, tmp_path, "again")
    assert [(r["failures"], r["test_accuracy"]) for r in again] == [(r["failures"], r["test_accuracy"]) for r in rounds]


def test_hung_client_is_dropped_after_the_round_timeout(tmp_path: Path) -> None:
    s = scenario(
        tmp_path,
        federation={"rounds": 2, "round_timeout": 1.5},
        faults={"kind": "hang", "rate": 1.0, "clients": [1], "from_round": 2},
    )
    run, rounds = train(s, tmp_path, "run")
    assert [r["failures"] for r in rounds] == [{}, {"timeout": [1]}]
    assert read_record(run.training_path)["status"] == "finished"


@pytest.mark.parametrize(
    ("federation", "faults"),
    [
        ({"rounds": ROUNDS, "min_replies": CLIENTS}, {"kind": "drop", "rate": 0.4}),
        ({"rounds": ROUNDS, "accept_failures": False}, {"kind": "raise", "rate": 0.4}),
    ],
)
def test_too_few_replies_fail_the_run_with_a_status(
    federation: dict[str, Any], faults: dict[str, Any], tmp_path: Path
) -> None:
    s = scenario(tmp_path, federation=federation, faults=faults)
    first = min(r for r, failed in expected_failures(s).items() if failed)
    run, rounds = train(s, tmp_path, "run")
    record = read_record(run.training_path)
    assert record["status"] == FAILED and record["rounds"] == first - 1 == len(rounds)
    assert f"round {first}:" in record["reason"] and run.failure == record["reason"]


def test_central_dp_epsilon_counts_only_released_rounds(tmp_path: Path) -> None:
    dp = [{"name": "central_dp_fixed", "noise_multiplier": 1.0, "clipping_norm": 0.5}]
    faulty = scenario(tmp_path, defenses=dp, faults={"kind": "drop", "rate": 0.2})
    released = [not failed for failed in expected_failures(faulty).values()]
    assert 0 < sum(released) < ROUNDS
    _, with_faults = train(faulty, tmp_path, "faulty")
    _, clean = train(scenario(tmp_path, defenses=dp), tmp_path, "clean")
    clean_eps = [0.0] + [r["central_epsilon"] for r in clean]
    # after round r, the epsilon of as many releases as rounds that had every reply
    assert [r["central_epsilon"] for r in with_faults] == [
        clean_eps[sum(released[: i + 1])] for i in range(ROUNDS)
    ]
    assert clean_eps[1] > 0


def test_resume_trains_a_failed_run_again(tmp_path: Path) -> None:
    """A run the failure policy stopped is not finished: a resume trains it again (a failure
    may be transient), with no round written twice and no attack on the failed training."""
    failing = scenario(tmp_path, federation={"rounds": 2}, faults={"rate": 1.0}, attacks=[{"name": "dlg", "iterations": 2}])
    out = io.StringIO()
    for _ in range(2):
        run = run_scenario(failing, tmp_path / "failing", Console(file=out, width=400))
        assert read_record(run.training_path)["status"] == FAILED and run.failure.startswith("round 1: 0 usable")
        assert [r["round"] for r in run.metrics()] == [0] and not run.attacks_dir.exists()
    assert out.getvalue().count("training failed earlier (round 1: 0 usable replies of 4") == 1
    assert out.getvalue().count("attacks skipped until a rerun trains it") == 2

    clean = scenario(tmp_path, federation={"rounds": 2})
    run, rounds = train(clean, tmp_path, "transient")
    atomic_write_json(run.training_path, {"status": FAILED, "reason": "round 2: 0 usable replies of 4", "rounds": 1})
    again, retrained = train(clean, tmp_path, "transient")  # as if round 2 had timed out
    assert read_record(again.training_path)["status"] == "finished" and again.failure is None
    assert [r["test_accuracy"] for r in retrained] == [r["test_accuracy"] for r in rounds]


def test_flowers_records_of_a_raise_fault_become_one_line() -> None:
    """What Flower's Ray engine logs for one raising client (a generic line, the Ray task
    error, the driver's traceback) is one line for a fault; a real error keeps its traceback."""
    task_error = (
        "ray::ClientAppActor.run() (pid=1)\n  File \"faults.py\", line 65, in fault_mod\n"
        "RuntimeError: fedsim fault: raise (client 1, round 2)\n\nClientAppException: \n"
        "Exception ClientAppException occurred. Message: fedsim fault: raise (client 1, round 2)"
    )
    flower = [
        "An exception was raised when processing a message by RayBackend",
        task_error,
        f"Traceback (most recent call last):\n  File \"vce_api.py\"\n{task_error}",
        "Traceback (most recent call last):\nValueError: a real bug",
    ]
    records = [logging.LogRecord("flwr", logging.ERROR, __file__, 1, text, (), None) for text in flower]
    keep = OneLineFaults()
    assert [r.getMessage() for r in records if keep.filter(r)] == [
        "client failed: fedsim fault: raise (client 1, round 2)",
        "Traceback (most recent call last):\nValueError: a real bug",
    ]


def test_an_attack_skips_a_nan_update_of_a_finished_run(tmp_path: Path) -> None:
    s = scenario(
        tmp_path,
        federation={"rounds": 1},
        faults={"kind": "nan", "rate": 1.0, "clients": [0]},
        observer={"rounds": [1], "clients": [0, 1]},
        attacks=[{"name": "dlg", "iterations": 1}],
    )
    run, (record,) = train(s, tmp_path, "run")
    assert record["failures"] == {"non_finite": [0]} and run.failure is None
    results = run.attacks_dir / "dlg"
    assert read_record(results / "round_0001_client_0000.json")["skipped"] == "non-finite update"
    assert "psnr" in read_record(results / "round_0001_client_0001.json")


@pytest.mark.parametrize(
    ("array", "finite"),
    [
        (np.ones((3, 4), np.float32), True),
        (np.asfortranarray(np.where(np.eye(3, 4) > 0, np.nan, 1.0).astype(np.float32)), False),
        (np.array(np.inf, np.float32), False),
        (np.array([1.0, -np.inf], ">f8"), False),  # big-endian
        (np.ones(7, np.float16), True),
        (np.ones((0, 3), np.float32), True),
        (np.array([2**62, -1], np.int64), True),  # integers are never non-finite
    ],
)
def test_finite_check_reads_the_stored_array(array: np.ndarray, finite: bool) -> None:
    """The observer's in-place check agrees with decoding (NaN, infinities, any order, byte order)."""
    record = ArrayRecord({"w": Array.from_numpy_ndarray(array)})
    assert _finite(record) is finite
    assert bool(np.isfinite(record["w"].numpy()).all()) is finite
