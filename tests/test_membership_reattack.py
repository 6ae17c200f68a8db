"""`fedsim attack` with a membership attack: other settings write their own result set
(`attacks/<name>-<hash>`) beside the scenario's, which stay untouched, and the summary shows
both; the same settings again recompute nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cli_helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

SCENARIO = {
    "name": "reattack",
    "data": {"dataset": "digits", "num_clients": 3},
    "model": {"name": "mlp", "hidden": [8]},
    "training": {"batch_size": 8, "local_steps": 2},
    "federation": {"rounds": 1},
    "attacks": ["update_membership"],  # score: alignment
}


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_membership_reattack_writes_a_new_result_set(tmp_path: Path) -> None:
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump({**SCENARIO, "output": {"dir": str(tmp_path)}}))
    root = tmp_path / "run"
    code, out, err = run_cli("run", path, "--run-dir", root)
    assert code == 0, err
    own_dir = root / "attacks" / "update_membership"
    own = files(own_dir)
    assert json.loads(own["round_0001_client_0000.json"])["attack"]["score"] == "alignment"

    code, out, err = run_cli("attack", root, "--attack", "update_membership", "--set", "score=loss_drop")
    assert (code, err) == (0, ""), out
    (new_dir,) = (root / "attacks").glob("update_membership-*")
    assert files(own_dir) == own  # the scenario's results are kept
    record = json.loads((new_dir / "round_0001_client_0000.json").read_text())
    assert record["attack"]["score"] == "loss_drop" and 0 <= record["auc"] <= 1
    assert (new_dir / "round_0001_client_0000.roc.png").exists()
    assert f"{new_dir.name} (1 targets)" in out and out.rstrip().endswith(f"results: {new_dir}")
    summary = json.loads((root / "summary.json").read_text())
    assert summary["attacks"][new_dir.name]["auc"] == record["auc"]
    assert summary["attacks"]["update_membership"]["auc"] == json.loads(own["round_0001_client_0000.json"])["auc"]

    before = files(new_dir)  # the same settings again: already done, nothing rewritten
    code, out, err = run_cli("attack", root, "--attack", "update_membership", "--set", "score=loss_drop")
    assert code == 0 and "attack update_membership on" not in out, (out, err)
    assert files(new_dir) == before and files(own_dir) == own
