"""The `fedsim` command end to end: list, run (and resume), attack an existing run.

Commands run through the console entry point `fedsim.cli.main` in this process (a fresh
Python with torch and Flower takes ~5 s to start); `tests/test_config_errors.py` runs the
real console command as a subprocess.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cli_helpers import run_cli
from fedsim.core.config import PluginSpec, build_scenario
from fedsim.core.registry import ALL_REGISTRIES, ATTACKS
from fedsim.core.results import RunDirectory
from fedsim.pipeline.runner import load_run_scenario

TINY = {
    "name": "tiny",
    "seed": 1,
    "data": {"dataset": "digits", "num_clients": 4},
    "model": "mlp",
    "training": {"batch_size": 16},
    "federation": {"rounds": 2},
    "simulation": {"engine": "inline"},
    "observer": {"rounds": [1], "clients": "all"},
    "attacks": [{"name": "dlg", "iterations": 1, "evaluations_per_step": 5}],
}


def one_line_error(code: int, out: str, err: str) -> str:
    """The single 'error: ...' line of a command that failed on bad input."""
    assert "Traceback" not in out + err
    assert code == 2, (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def json_files(directory: Path) -> dict[str, int]:
    """name -> mtime (ns) of the attack result files in `directory`."""
    return {p.name: p.stat().st_mtime_ns for p in sorted(directory.glob("*.json"))}


@dataclass
class TrainedRun:
    scenario: Path
    root: Path
    out: str


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """`fedsim run` of a 4-client, 2-round digits federation with a 5-step DLG, once per module."""
    tmp = tmp_path_factory.mktemp("cli")
    scenario = tmp / "tiny.yaml"
    scenario.write_text(yaml.safe_dump({**TINY, "output": {"dir": str(tmp / "runs")}}))
    code, out, err = run_cli("run", scenario)
    assert (code, err) == (0, ""), out
    runs = [p for p in (tmp / "runs" / "tiny").iterdir() if p.name != "latest"]
    assert len(runs) == 1
    assert (tmp / "runs" / "tiny" / "latest").resolve() == runs[0].resolve()  # the newest run
    assert str(runs[0]) in out.replace("\n", "")  # the summary names the run directory whole
    return TrainedRun(scenario, runs[0], out)


@pytest.fixture
def run_copy(trained: TrainedRun, tmp_path: Path) -> Path:
    """A private copy of the trained run (mtimes kept) for tests that add attack results."""
    return Path(shutil.copytree(trained.root, tmp_path / "run"))


def test_list_shows_every_plugin_and_parameter() -> None:
    code, out, err = run_cli("list")
    assert (code, err) == (0, "")
    for registry in ALL_REGISTRIES:
        names = registry.names()
        assert names, registry.kind
        for name in names:
            assert f"│ {name} " in out, f"{registry.kind} '{name}' missing from `fedsim list`"
            for param in registry.get(name).Params.model_fields:
                assert f"{param}=" in out, f"{registry.kind} '{name}' parameter '{param}'"
    assert "proximal_mu=0.01: weight of the proximal term" in out  # with its description
    assert "hidden=[128, 64]" in out  # a list default as written, not eaten as rich markup
    for param, registry_kind, plugin in (("alpha", "partitioner", "dirichlet"),
                                         ("noise_multiplier", "defense", "dp_sgd")):
        registry = next(r for r in ALL_REGISTRIES if r.kind == registry_kind)
        if plugin in registry.names():
            assert f"{param}=" in out


def test_run_writes_a_complete_run_directory(trained: TrainedRun) -> None:
    root = trained.root
    assert f"-> {root}" in trained.out
    assert "round   2/2" in trained.out

    scenario = yaml.safe_load((root / "scenario.yaml").read_text())
    assert scenario["name"] == "tiny" and scenario["federation"]["rounds"] == 2
    assert scenario["data"]["num_clients"] == 4 and scenario["model"]["name"] == "mlp"

    rounds = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rounds)
    assert [len(r["clients"]) for r in rounds] == [0, 4, 4]

    weights = load_file(root / "model.safetensors")
    assert weights and all(torch.isfinite(t).all() for t in weights.values())

    summary = json.loads((root / "summary.json").read_text())
    final = summary["training"]["final_test_accuracy"]
    assert 0.0 < final <= 1.0 and final == rounds[-1]["test_accuracy"]
    assert summary["attacks"]["dlg"]["targets"] == 4  # every client of round 1 was recorded
    assert 0.0 <= summary["attacks"]["dlg"]["label_accuracy"] <= 1.0

    observed = sorted(p.name for p in (root / "observations" / "round_0001").glob("*.safetensors"))
    assert [f"client_{c:04d}.safetensors" for c in range(4)] == [n for n in observed if n.startswith("client")]
    attack_dir = root / "attacks" / "dlg"
    stems = [f"round_0001_client_{c:04d}" for c in range(4)]
    assert sorted(p.stem for p in attack_dir.glob("*.png")) == stems
    assert sorted(json_files(attack_dir)) == [f"{s}.json" for s in stems]
    record = json.loads((attack_dir / f"{stems[0]}.json").read_text())
    assert record["attack"]["name"] == "dlg" and record["attack"]["evaluations_per_step"] == 5
    assert (record["round"], record["client"]) == (1, 0)


def test_rerun_on_the_same_run_dir_resumes_without_redoing_work(trained: TrainedRun) -> None:
    root = trained.root
    metrics = (root / "metrics.jsonl").read_bytes()
    model = (root / "model.safetensors").read_bytes()
    attacks = json_files(root / "attacks" / "dlg")

    code, out, err = run_cli("run", trained.scenario, "--run-dir", root)
    assert (code, err) == (0, ""), out
    assert "training already finished" in out
    assert "round " not in out and "attack dlg on" not in out  # nothing retrained or re-attacked
    assert (root / "metrics.jsonl").read_bytes() == metrics
    assert (root / "model.safetensors").read_bytes() == model
    assert json_files(root / "attacks" / "dlg") == attacks
    assert json.loads((root / "summary.json").read_text())["attacks"]["dlg"]["targets"] == 4


def test_run_dir_holding_another_scenario_is_refused(trained: TrainedRun) -> None:
    metrics = (trained.root / "metrics.jsonl").read_bytes()
    code, out, err = run_cli("run", trained.scenario, "--set", "federation.rounds=3",
                             "--run-dir", trained.root)
    line = one_line_error(code, out, err)
    assert f"'{trained.root}' holds a different scenario" in line
    assert (trained.root / "metrics.jsonl").read_bytes() == metrics


def test_run_dir_of_an_older_fedsim_resumes_and_takes_todays_form(trained: TrainedRun, run_copy: Path) -> None:
    """A scenario.yaml written before fedsim gained a section (here `faults`, all defaults) is
    the same scenario: the run resumes (nothing retrained) and the file is rewritten whole."""
    scenario_path = run_copy / "scenario.yaml"
    today = scenario_path.read_text()
    older = yaml.safe_load(today)
    del older["faults"]
    scenario_path.write_text(yaml.safe_dump(older, sort_keys=False))
    code, out, err = run_cli("run", trained.scenario, "--run-dir", run_copy)
    assert (code, err) == (0, ""), out
    assert "training already finished" in out and "round " not in out
    assert scenario_path.read_text() == today


def test_attack_idlg_on_batched_updates_is_a_one_line_error(run_copy: Path) -> None:
    line = one_line_error(*run_cli("attack", run_copy, "--attack", "idlg"))
    assert "attack 'idlg' needs batch size 1" in line and "batch_size=16" in line
    assert not list((run_copy / "attacks" / "idlg").glob("*.json"))


def other_result_set(run: Path, attack: str) -> Path:
    """The one result folder of `attack` run with settings other than the scenario's."""
    (folder,) = (run / "attacks").glob(f"{attack}-*")
    return folder


def test_attack_existing_run_with_new_parameters(run_copy: Path) -> None:
    metrics = (run_copy / "metrics.jsonl").read_bytes()
    own = json_files(run_copy / "attacks" / "dlg")
    code, out, err = run_cli("attack", run_copy, "--attack", "dlg", "--set", "evaluations_per_step=3")
    assert (code, err) == (0, ""), out
    assert out.count("attack dlg on round 1") == 4  # the new parameters redo every target
    assert json_files(run_copy / "attacks" / "dlg") == own  # the scenario's results are kept
    attack_dir = other_result_set(run_copy, "dlg")
    assert f"fedsim attack dlg: {run_copy}" in out and '"evaluations_per_step": 3' in out  # the header
    assert "fedsim summary: tiny" in out and f"{attack_dir.name} (4 targets)" in out
    assert out.rstrip().endswith(f"results: {attack_dir}")
    records = [json.loads(p.read_text()) for p in sorted(attack_dir.glob("*.json"))]
    assert len(records) == 4 and len(list(attack_dir.glob("*.png"))) == 4
    assert all(r["attack"]["evaluations_per_step"] == 3 for r in records)
    assert all(0.0 <= r["label_accuracy"] <= 1.0 for r in records)
    assert (run_copy / "metrics.jsonl").read_bytes() == metrics  # no retraining
    summary = json.loads((run_copy / "summary.json").read_text())
    assert summary["attacks"]["dlg"]["targets"] == summary["attacks"][attack_dir.name]["targets"] == 4

    # the same attack again is already done: nothing is rewritten
    before = json_files(attack_dir)
    code, out, err = run_cli("attack", run_copy, "--attack", "dlg", "--set", "evaluations_per_step=3")
    assert (code, err) == (0, "") and "attack dlg on" not in out
    assert json_files(attack_dir) == before


def test_an_attack_the_scenario_does_not_run_keeps_each_settings_results(run_copy: Path) -> None:
    """The first settings of `fedsim attack --attack ig` write attacks/ig, others their own set."""
    run = RunDirectory(run_copy)
    base = load_run_scenario(run)
    raw = base.model_dump(mode="json")

    def spec(iterations: int) -> PluginSpec:
        return build_scenario({**raw, "attacks": [{"name": "ig", "iterations": iterations}]}).attacks[0]

    assert run.attack_dir(spec(2), base) == run.attacks_dir / "ig"  # nothing there yet
    (run.attacks_dir / "ig").mkdir()
    record = {"attack": spec(2).model_dump(mode="json")}
    (run.attacks_dir / "ig" / "round_1_client_0.json").write_text(json.dumps(record))
    assert run.attack_dir(spec(2), base) == run.attacks_dir / "ig"  # the same settings resume
    other = run.attack_dir(spec(3), base)
    assert other.parent == run.attacks_dir and other.name.startswith("ig-")


def test_attack_set_changes_only_the_named_parameter_of_the_scenario_attack(run_copy: Path) -> None:
    """The scenario runs dlg with evaluations_per_step=5 (default 20): `--set labels=inferred` keeps 5."""
    code, out, err = run_cli("attack", run_copy, "--attack", "dlg", "--set", "labels=inferred")
    assert (code, err) == (0, ""), out
    records = [json.loads(p.read_text()) for p in other_result_set(run_copy, "dlg").glob("*.json")]
    assert records and all(r["attack"]["labels"] == "inferred" for r in records)
    assert all(r["attack"]["evaluations_per_step"] == 5 for r in records)


def test_attack_on_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    for directory in (Path("/nonexistent"), tmp_path):
        line = one_line_error(*run_cli("attack", directory, "--attack", "dlg"))
        assert f"'{directory}' is not a fedsim run directory" in line


def test_attack_unknown_name_lists_allowed_attacks(run_copy: Path) -> None:
    line = one_line_error(*run_cli("attack", run_copy, "--attack", "nope"))
    assert f"unknown attack 'nope'; allowed: {', '.join(ATTACKS.names())}" in line
    assert "dlg, " in line and "idlg" in line
    assert not (run_copy / "attacks" / "nope").exists()


def test_attack_unknown_parameter_lists_allowed_parameters(run_copy: Path) -> None:
    line = one_line_error(*run_cli("attack", run_copy, "--attack", "dlg", "--set", "iterationz=3"))
    assert "unknown parameter 'iterationz' for attack 'dlg'" in line
    assert "allowed: " in line and "iterations" in line.split("allowed: ")[1]
