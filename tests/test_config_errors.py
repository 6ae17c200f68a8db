"""Every malformed scenario ends as ONE line on stderr that names the field, and exit code 2.

Most cases call the console entry point `fedsim.cli.main` in this process (a fresh Python
with torch and Flower takes ~5 s to start); three run `python -m fedsim.cli validate` as a
real subprocess, started together, to prove the same holds for the installed command.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from cli_helpers import run_cli
from fedsim.core.config import build_scenario

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "scenarios" / "quickstart.yaml"


@dataclass
class Case:
    id: str
    text: str | None  # the scenario file's content; None: the file does not exist
    expected: list[str]  # substrings of the error line; "{path}" is the scenario file
    overrides: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)  # must NOT appear in the error line


CASES = [
    Case("unknown-top-level-key", "name: x\nrounds: 3\n",
         ["error: rounds: unknown field", "allowed: name, description, seed, data, model"]),
    Case("typo-in-section-name", "federaton:\n  rounds: 3\n",
         ["federaton: unknown field", "allowed:", "federation"], absent=["fedsim list"]),
    Case("typo-in-nested-key", "federation:\n  roundz: 3\n",
         ["federation.roundz: unknown field", "allowed: strategy, rounds, clients_per_round"]),
    Case("unknown-model", "model: perceptron\n",
         ["model: unknown model 'perceptron'", "allowed: ", "convnet", "lenet", "mlp"]),
    Case("unknown-dataset", "data: {dataset: cifar11}\n",
         ["data.dataset: unknown dataset 'cifar11'", "allowed:", "digits", "synthetic"]),
    Case("unknown-partitioner", "data: {partitioner: {name: zipf, alpha: 1.0}}\n",
         ["data.partitioner: unknown partitioner 'zipf'", "allowed: ", "classes", "dirichlet", "iid"]),
    Case("unknown-strategy", "federation: {strategy: fedsgd}\n",
         ["federation.strategy: unknown strategy 'fedsgd'", "allowed:", "fedavg", "fedprox"]),
    Case("unknown-attack", "attacks:\n  - {name: dlg, iterations: 5}\n  - {name: gradinversion}\n",
         ["attacks.1: unknown attack 'gradinversion'", "allowed: ", "dlg", "idlg"]),
    Case("unknown-defense", "defenses: [{name: dp}]\n",
         ["defenses.0: unknown defense 'dp'", "allowed:", "dp_sgd", "topk"]),
    Case("unknown-plugin-parameter", "model: {name: lenet, activaton: relu}\n",
         ["model: unknown parameter 'activaton' for model 'lenet'", "allowed: activation, init"]),
    Case("bad-plugin-parameter-value", "attacks: [{name: dlg, iterations: many}]\n",
         ["attacks.0: attack 'dlg' parameter 'iterations'", "valid integer"]),
    Case("plugin-not-a-name", "model: 3\n",
         ["model: expected a model name or a mapping with 'name'", "allowed names:", "lenet"]),
    Case("gradient-attack-without-weight-updates",
         "federation: {strategy: diff2}\nattacks: [{name: ig}, {name: mi_face}]\n",
         ["scenario: attacks ['ig'] invert recorded weight updates", "strategy 'diff2'",
          "use a weight-averaging strategy"]),
    Case("wrong-type", "federation: {rounds: three}\n",
         ["federation.rounds: Input should be a valid integer"]),
    Case("section-not-a-mapping", "federation: 3\n",
         ["federation: Input should be a valid dictionary"]),
    Case("rounds-zero", "federation: {rounds: 0}\n",
         ["federation.rounds: Input should be greater than or equal to 1"]),
    Case("negative-lr", "training: {lr: -1}\n",
         ["training.lr: Input should be greater than 0"]),
    Case("test-fraction-above-one", "data: {test_fraction: 1.5}\n",
         ["data.test_fraction: Input should be less than 1"]),
    Case("no-clients", "data: {num_clients: 0}\n",
         ["data.num_clients: Input should be greater than or equal to 1"]),
    Case("bad-engine", "simulation: {engine: spark}\n",
         ["simulation.engine:", "'inline', 'vectorized' or 'ray'", "got 'spark'"]),
    Case("ray-workers-without-vectorized", "simulation: {ray_workers: 2}\n",
         ["scenario: simulation.ray_workers=2 shards the vectorized engine's cohorts",
          "engine is 'inline'", "set engine: vectorized, or ray_workers: 0"]),
    Case("bad-optimizer", "training: {optimizer: rmsprop}\n",
         ["training.optimizer:", "'sgd' or 'adam'", "got 'rmsprop'"]),
    Case("observer-rounds-bad-word", "observer: {rounds: some}\n",
         ["observer.rounds:", "valid list", "'all' or 'none'", "got 'some'"],
         absent=["list[int]", "literal["]),
    Case("cohort-larger-than-federation", "data: {num_clients: 4}\nfederation: {clients_per_round: 5}\n",
         ["federation.clients_per_round=5 exceeds data.num_clients=4"]),
    Case("observer-client-out-of-range", "data: {num_clients: 4}\nobserver: {clients: [0, 4]}\n",
         ["observer.clients [4] outside 0..3"]),
    Case("observer-round-beyond-rounds", "federation: {rounds: 2}\nobserver: {rounds: [1, 3]}\n",
         ["observer.rounds [3] outside 1..2"]),
    Case("invalid-name-characters", "name: 'my run!'\n",
         ["error: name: 'my run!' names a directory", "letters, digits, '_', '-' and '.'"]),
    Case("yaml-syntax-error", "name: x\ndata:\n  num_clients: 4\n  partitioner: [iid\nseed: 1\n",
         ["error: {path}:", "invalid YAML"]),
    Case("yaml-bad-indentation", "name: x\n  seed: 1\n",
         ["error: {path}:2: invalid YAML", "mapping values are not allowed"]),
    Case("top-level-list", "- name: x\n- seed: 1\n",
         ["error: {path}: a scenario must be a YAML mapping", "got list"]),
    Case("missing-file", None, ["error: scenario file '{path}' not found"]),
    Case("set-without-equals", "name: x\n",
         ["error: --set 'federation.rounds': expected FIELD=VALUE", "--set federation.rounds=5"],
         overrides=["federation.rounds"]),
    Case("set-empty-field", "name: x\n", ["--set '=5': empty field name"], overrides=["=5"]),
    Case("set-unknown-field", "name: x\n",
         ["federation.roundz: unknown field", "allowed:", "rounds"],
         overrides=["federation.roundz=5"]),
    Case("set-below-a-value", "federation: {rounds: 3}\n",
         ["--set federation.rounds.max: 'federation.rounds' is a value (3), not a section"],
         overrides=["federation.rounds.max=5"]),
    Case("set-missing-list-item", "attacks: [dlg]\n",
         ["--set attacks.3.iterations: no list item 3"], overrides=["attacks.3.iterations=5"]),
    Case("set-out-of-range-value", "name: x\n",
         ["training.batch_size: Input should be greater than or equal to 1"],
         overrides=["training.batch_size=0"]),
    Case("attack-listed-twice", "attacks: [dlg, {name: dlg, iterations: 5}]\n",
         ["attacks ['dlg'] listed more than once", "fedsim attack RUN --attack NAME --set"]),
]

# started as real `python -m fedsim.cli` subprocesses (all three at once)
SUBPROCESS_CASES = ["unknown-top-level-key", "yaml-syntax-error", "set-without-equals"]


def scenario_file(tmp_path: Path, case: Case) -> Path:
    path = tmp_path / f"{case.id}.yaml"
    if case.text is not None:
        path.write_text(case.text)
    return path


def validate_args(path: Path, case: Case) -> list[str]:
    args = ["validate", str(path)]
    for override in case.overrides:
        args += ["--set", override]
    return args


def assert_one_line_error(code: int, out: str, err: str, case: Case, path: Path) -> str:
    assert "Traceback" not in out + err
    assert code == 2, (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: ") and line.removeprefix("error: ").strip()
    for text in case.expected:
        assert text.replace("{path}", str(path)) in line, line
    for text in case.absent:
        assert text not in line, line
    assert out.strip() == ""  # nothing half-printed on stdout
    return line


def test_cases_cover_every_required_kind() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 18
    assert set(SUBPROCESS_CASES) <= {c.id for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_scenario_is_one_line_naming_the_field(tmp_path: Path, case: Case) -> None:
    path = scenario_file(tmp_path, case)
    code, out, err = run_cli(*validate_args(path, case))
    assert_one_line_error(code, out, err, case, path)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    case = next(c for c in CASES if c.id == "yaml-syntax-error")
    path = scenario_file(tmp_path, case)
    line = assert_one_line_error(*run_cli("validate", str(path)), case, path)
    line_number = int(line.removeprefix(f"error: {path}:").split(":")[0])
    assert 4 <= line_number <= 6  # the unclosed '[' on line 4; the parser notices by line 5-6


@pytest.fixture(scope="module")
def subprocess_results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple]]:
    """The SUBPROCESS_CASES run by the real console command, concurrently (start-up is slow)."""
    tmp = tmp_path_factory.mktemp("subprocess")
    started = {}
    for case in (c for c in CASES if c.id in SUBPROCESS_CASES):
        path = scenario_file(tmp, case)
        process = subprocess.Popen(
            [sys.executable, "-m", "fedsim.cli", *validate_args(path, case)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp,
        )
        started[case.id] = (case, path, process)
    results = {}
    for case_id, (case, path, process) in started.items():
        out, err = process.communicate(timeout=120)
        results[case_id] = (process.returncode, out, err, case, path)
    yield results


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_console_command_prints_one_line_and_exits_2(subprocess_results: dict, case_id: str) -> None:
    code, out, err, case, path = subprocess_results[case_id]
    assert_one_line_error(code, out, err, case, path)


def resolved(out: str) -> dict:
    """The YAML that `fedsim validate` printed before its final 'ok:' line."""
    text, ok = out.rsplit("ok: ", 1)
    assert "is a valid scenario" in ok
    return yaml.safe_load(text)


def test_validate_quickstart_prints_the_resolved_scenario() -> None:
    code, out, err = run_cli("validate", str(QUICKSTART))
    assert (code, err) == (0, "")
    scenario = resolved(out)
    assert scenario["name"] == "quickstart"
    assert scenario["federation"]["rounds"] == 20
    assert scenario["federation"]["clients_per_round"] == 5
    # defaults are filled in, plugins are expanded to name + every parameter
    assert scenario["training"]["optimizer"] == "sgd"
    assert scenario["simulation"]["engine"] == "inline"
    assert scenario["data"]["partitioner"] == {
        "name": "dirichlet", "alpha": 1.0, "min_partition_size": 2, "self_balancing": True,
    }
    assert scenario["attacks"][0]["name"] == "dlg"
    assert scenario["attacks"][0]["iterations"] == 5
    assert set(scenario["attacks"][0]) > {"name", "iterations", "lr", "restarts"}


def test_validate_with_set_shows_the_override() -> None:
    code, out, err = run_cli("validate", str(QUICKSTART), "--set", "federation.rounds=7",
                             "--set", "attacks.0.iterations=9")
    assert (code, err) == (0, "")
    assert "  rounds: 7\n" in out
    scenario = resolved(out)
    assert scenario["federation"]["rounds"] == 7
    assert scenario["attacks"][0]["iterations"] == 9
    assert QUICKSTART.read_text().count("rounds: 20") == 1  # the file itself is untouched


def test_set_reaches_into_a_plugin_given_by_name(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ndefenses: [topk]\nattacks: [dlg]\n")
    code, out, err = run_cli("validate", str(path), "--set", "defenses.0.keep_fraction=0.5",
                             "--set", "attacks.1=ig")
    assert (code, err) == (0, "")
    scenario = resolved(out)
    assert scenario["defenses"] == [{"name": "topk", "keep_fraction": 0.5, "scope": "per_tensor"}]
    assert [a["name"] for a in scenario["attacks"]] == ["dlg", "ig"]


@pytest.mark.parametrize("path", sorted((REPO / "scenarios").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_scenario_validates(path: Path) -> None:
    """Each scenario file in scenarios/ builds (a sweep file's base scenario, under `scenario:`)."""
    text = yaml.safe_load(path.read_text())
    scenario = build_scenario(text["scenario"] if "scenario" in text else text)
    assert scenario.name
