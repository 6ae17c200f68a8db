"""Hostile input, table-driven: every case ends as exit 2 and ONE stderr line "error: ...",
with no traceback and no directory left behind (everything a scenario can know is checked
before a run directory exists).

Scenario and sweep cases run `fedsim run` / `fedsim sweep` in this process, in an empty
working directory (the default `output.dir` is relative to it). Run-directory cases corrupt a
private copy of one tiny trained run (trained once per module) and run `fedsim attack`,
`fedsim report` or a resume (`fedsim run --run-dir`) on it.
"""

from __future__ import annotations

import fcntl
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file

from cli_helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "name": "tiny",
    "seed": 1,
    "data": {"dataset": "digits", "num_clients": 2},
    "model": "mlp",
    "training": {"batch_size": 2, "local_steps": 1},  # 2 images to attack and draw
    "federation": {"rounds": 1},
    "observer": {"rounds": [1], "clients": [0]},
    "attacks": [{"name": "dlg", "iterations": 1, "evaluations_per_step": 2}],
}
OBSERVATION = "observations/round_0001/client_0000.safetensors"
RESULT = "attacks/dlg/round_0001_client_0000.json"


def tiny(**sections: object) -> str:
    """TINY with some sections replaced, as YAML."""
    return yaml.safe_dump({**TINY, **sections})


def nested(depth: int) -> str:
    return "a: " + "[" * depth + "]" * depth + "\n"


@dataclass
class Case:
    """`fedsim run FILE ARGS` (or `fedsim sweep FILE` with `sweep=True`) on a file holding `text`.

    `setup` may prepare the working directory further (e.g. a file where a directory goes).
    """

    id: str
    text: str | bytes
    args: list[str] = field(default_factory=list)
    expected: str = ""  # a substring of the error line
    sweep: bool = False
    setup: Callable[[Path], None] | None = None


def sweep_text(**fields: object) -> str:
    return yaml.safe_dump({"name": "s", "scenario": TINY, "axes": {"training.lr": [0.1]}, **fields})


def touch(name: str) -> Callable[[Path], None]:
    return lambda cwd: (cwd / name).write_text("not a directory\n")


def foreign_folder(cwd: Path) -> None:
    (cwd / "mine").mkdir()
    (cwd / "mine" / "thesis.tex").write_text("months of work\n")


LATIN1 = "name: café\n".encode("latin-1")
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"
RANDOM = bytes(random.Random(0).randrange(256) for _ in range(512))

CASES = [
    Case("latin-1", LATIN1, expected="UTF-8"),
    Case("utf-16", "name: x\n".encode("utf-16"), expected="UTF-8"),
    Case("random-bytes", RANDOM, expected="UTF-8"),
    Case("png", PNG, expected="UTF-8"),
    Case("deep-list-nesting", nested(10_000), expected="nest"),
    Case("deep-mapping-nesting", "{a: " * 10_000 + "1" + "}" * 10_000 + "\n", expected="nest"),
    Case("empty-file", "", expected="empty"),
    Case("comments-only", "# nothing here\n", expected="empty"),
    Case("duplicate-key", "name: a\nname: b\n", expected="duplicate key 'name'"),
    Case("duplicate-nested-key", "federation:\n  rounds: 1\n  rounds: 2\n", expected="duplicate key 'rounds'"),
    Case("top-level-list", "- name\n", expected="mapping"),
    Case("top-level-scalar", "3\n", expected="mapping"),
    Case("python-tag", "name: !!python/object/apply:os.system [true]\n", expected="invalid YAML"),
    Case("seed-2^63", tiny(seed=2**63), expected="seed"),
    Case("seed-2^64", tiny(seed=2**64), expected="seed"),
    Case("secret-seed-2^63", tiny(simulation={"secret_seed": 2**63}), expected="simulation.secret_seed"),
    Case("rounds-true", tiny(federation={"rounds": True}), expected="federation.rounds"),
    Case("num-clients-true", tiny(data={"num_clients": True}), expected="data.num_clients"),
    Case("batch-size-false", tiny(training={"batch_size": False}), expected="training.batch_size"),
    Case("observer-round-true", tiny(observer={"rounds": [True]}), expected="observer.rounds"),
    Case("plugin-int-true", tiny(attacks=[{"name": "dlg", "iterations": True}]), expected="iterations"),
    Case("lr-inf", "training: {lr: .inf}\n", expected="training.lr"),
    Case("lr-nan", "training: {lr: .nan}\n", expected="training.lr"),
    Case("weight-decay-inf", "training: {weight_decay: .inf}\n", expected="training.weight_decay"),
    Case("momentum-nan", "training: {momentum: .nan}\n", expected="training.momentum"),
    Case("client-cpus-inf", "simulation: {client_cpus: .inf}\n", expected="simulation.client_cpus"),
    Case("client-gpus-nan", "simulation: {client_gpus: .nan}\n", expected="simulation.client_gpus"),
    Case("test-fraction-nan", "data: {test_fraction: .nan}\n", expected="data.test_fraction"),
    Case("attack-lr-inf", "attacks: [{name: dlg, lr: .inf}]\n", expected="attacks.0"),
    Case("noise-std-inf", "defenses: [{name: gaussian_noise, std: .inf}]\n", expected="defenses.0"),
    Case("dp-noise-nan", "defenses: [{name: dp_sgd, noise_multiplier: .nan}]\n", expected="defenses.0"),
    Case("dirichlet-alpha-inf", "data: {partitioner: {name: dirichlet, alpha: .inf}}\n",
         expected="data.partitioner"),
    Case("set-lr-inf", tiny(), ["--set", "training.lr=.inf"], expected="training.lr"),
    Case("set-seed-huge", tiny(), ["--set", f"seed={2**70}"], expected="seed"),
    Case("local-steps-10^12", tiny(training={"local_steps": 10**12}), expected="training.local_steps"),
    Case("local-epochs-10^9", tiny(training={"local_epochs": 10**9}), expected="training.local_epochs"),
    Case("batch-size-10^12", tiny(training={"batch_size": 10**12}), expected="training.batch_size"),
    Case("torch-threads-10^6", tiny(simulation={"torch_threads": 10**6}), expected="simulation.torch_threads"),
    Case("dlg-on-regression",
         tiny(data={"dataset": "regression", "num_clients": 2}), expected="regression"),
    Case("idlg-batch-2", tiny(attacks=[{"name": "idlg"}]), expected="idlg"),
    Case("evaluate-without-validation",
         tiny(data={"num_clients": 2, "val_fraction": 0},
              federation={"rounds": 1, "evaluate_clients_per_round": 1}),
         expected="val_fraction"),
    Case("secagg-with-central-dp",
         tiny(defenses=[{"name": "secagg_plus"}, {"name": "central_dp_fixed"}]), expected="secagg_plus"),
    Case("central-dp-with-fedadam", tiny(federation={"rounds": 1, "strategy": "fedadam"},
                                         defenses=["central_dp_fixed"]), expected="strategy FedAdam"),
    Case("central-dp-adaptive-count-noise-too-low", tiny(defenses=["central_dp_adaptive"]),
         expected="central_dp_adaptive: If not specified, `clipped_count_stddev`"),
    Case("unreachable-ray-address",
         tiny(simulation={"engine": "ray", "ray_address": "127.0.0.1:1"}), expected="simulation.ray_address"),
    Case("unreachable-ray-address-for-ray-workers",
         tiny(simulation={"engine": "vectorized", "ray_workers": 2, "ray_address": "127.0.0.1:1"}),
         expected="simulation.ray_address"),
    Case("name-dot-dot", tiny(name=".."), expected="name"),
    Case("name-dot", tiny(name="."), expected="name"),
    Case("name-slash", tiny(name="a/b"), expected="name"),
    Case("set-name-dot-dot", tiny(), ["--set", "name=.."], expected="name"),
    Case("output-dir-is-a-file", tiny(output={"dir": "taken"}), expected="output.dir",
         setup=touch("taken")),
    Case("run-dir-is-a-file", tiny(), ["--run-dir", "taken"], expected="--run-dir", setup=touch("taken")),
    Case("run-dir-foreign-folder", tiny(), ["--run-dir", "mine"], expected="not a fedsim run",
         setup=foreign_folder),
    Case("fault-rate-above-1", tiny(faults={"rate": 1.5}), expected="faults.rate"),
    Case("fault-rate-negative", tiny(faults={"rate": -0.1}), expected="faults.rate"),
    Case("fault-rate-nan", tiny(faults={"rate": float("nan")}), expected="faults.rate"),
    Case("fault-kind-unknown", tiny(faults={"kind": "explode"}), expected="faults.kind"),
    Case("fault-client-outside", tiny(faults={"rate": 1, "clients": [5]}), expected="faults.clients"),
    Case("fault-from-round-late", tiny(faults={"rate": 1, "from_round": 9}), expected="faults.from_round"),
    Case("round-timeout-zero", tiny(federation={"rounds": 1, "round_timeout": 0}),
         expected="federation.round_timeout"),
    Case("min-replies-above-cohort", tiny(federation={"rounds": 1, "min_replies": 3}),
         expected="federation.min_replies"),
    Case("ray-discovery-timeout-inf", tiny(simulation={"ray_discovery_timeout": float("inf")}),
         expected="simulation.ray_discovery_timeout"),
    Case("sweep-latin-1", LATIN1, expected="UTF-8", sweep=True),
    Case("sweep-png", PNG, expected="UTF-8", sweep=True),
    Case("sweep-deep-nesting", nested(10_000), expected="nest", sweep=True),
    Case("sweep-duplicate-key", sweep_text() + "name: t\n", expected="duplicate key 'name'", sweep=True),
    Case("sweep-empty", "", expected="empty", sweep=True),
    Case("sweep-name-dot-dot", sweep_text(name=".."), expected="name", sweep=True),
    Case("sweep-output-is-a-file", sweep_text(output="taken"), expected="output", sweep=True,
         setup=touch("taken")),
    Case("sweep-cell-seed-huge", sweep_text(seeds=[2**63]), expected="seed", sweep=True),
    Case("sweep-axis-lr-inf", sweep_text(axes={"training.lr": [float("inf")]}), expected="training.lr",
         sweep=True),
    Case("sweep-cell-secagg-central-dp",
         sweep_text(axes={"defenses": [[{"name": "secagg_plus"}, {"name": "central_dp_fixed"}]]}),
         expected="secagg_plus", sweep=True),
    Case("sweep-cell-central-dp-fedadam",
         sweep_text(axes={"federation.strategy": ["fedavg", "fedadam"]}, set={"defenses": ["central_dp_fixed"]}),
         expected="cell 1 (federation.strategy=fedadam)", sweep=True),
]


def directories(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_dir()}


def one_error_line(code: int, out: str, err: str) -> str:
    assert "Traceback" not in out + err, err
    assert code == 2, (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hostile_file(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "input.yaml"
    path.write_bytes(case.text if isinstance(case.text, bytes) else case.text.encode())
    if case.setup:
        case.setup(tmp_path)
    before = directories(tmp_path)
    line = one_error_line(*run_cli("sweep" if case.sweep else "run", path, *case.args))
    assert case.expected in line
    assert directories(tmp_path) == before


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-client, 1-round run with a 2-step DLG result, once per module."""
    tmp = tmp_path_factory.mktemp("hostile")
    scenario = tmp / "tiny.yaml"
    scenario.write_text(tiny(output={"dir": str(tmp / "runs")}))
    code, out, err = run_cli("run", scenario, "--run-dir", tmp / "run")
    assert (code, err) == (0, ""), out
    return tmp / "run"


def truncate(relative: str) -> Callable[[Path], None]:
    def corrupt(run: Path) -> None:
        path = run / relative
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return corrupt


def write(relative: str, content: str | bytes) -> Callable[[Path], None]:
    def corrupt(run: Path) -> None:
        data = content if isinstance(content, bytes) else content.encode()
        (run / relative).write_bytes(data)

    return corrupt


def remove(relative: str) -> Callable[[Path], None]:
    return lambda run: (run / relative).unlink()


def observation_metadata(meta: dict[str, object] | None | str) -> Callable[[Path], None]:
    """Rewrite client 0's observation with other `fedsim` metadata (None: no metadata)."""

    def corrupt(run: Path) -> None:
        from safetensors.torch import load_file

        path = run / OBSERVATION
        tensors = load_file(path)
        header = None if meta is None else {"fedsim": meta if isinstance(meta, str) else json.dumps(meta)}
        save_file(tensors, path, metadata=header)

    return corrupt


def both(*corruptions: Callable[[Path], None]) -> Callable[[Path], None]:
    def corrupt(run: Path) -> None:
        for corruption in corruptions:
            corruption(run)

    return corrupt


def bad_metrics_line(run: Path) -> None:
    with (run / "metrics.jsonl").open("a") as f:
        f.write("{garbage\n")


@dataclass
class RunCase:
    """`corrupt` a copy of the trained run, then run `command` on it."""

    id: str
    corrupt: Callable[[Path], None]
    command: str  # attack | report | resume
    expected: str = ""


ATTACK, REPORT, RESUME = "attack", "report", "resume"
CORRUPTIONS = [
    RunCase("truncated-observation", truncate(OBSERVATION), ATTACK, "client_0000.safetensors"),
    RunCase("truncated-global", truncate("observations/round_0001/global.safetensors"), ATTACK,
            "global.safetensors"),
    RunCase("garbage-observation", write(OBSERVATION, RANDOM), ATTACK, "client_0000.safetensors"),
    RunCase("observation-without-metadata", observation_metadata(None), ATTACK, "client_0000.safetensors"),
    RunCase("observation-partial-metadata", observation_metadata({"server_round": 1}), ATTACK,
            "client_0000.safetensors"),
    RunCase("observation-garbage-metadata", observation_metadata("{not json"), ATTACK,
            "client_0000.safetensors"),
    RunCase("observation-wrong-types",
            observation_metadata({"server_round": "one", "client": [], "num_examples": None,
                                  "local_steps": 1, "hyperparams": 3}),
            ATTACK, "client_0000.safetensors"),
    RunCase("garbage-ground-truth",  # read when the attack is recomputed
            both(write("ground_truth/round_0001/client_0000.json", "{"), remove(RESULT)), ATTACK,
            "client_0000.json"),
    RunCase("ground-truth-a-list",
            both(write("ground_truth/round_0001/client_0000.json", "[1]"), remove(RESULT)), ATTACK,
            "client_0000.json"),
    RunCase("garbage-result", write(RESULT, "{truncated"), ATTACK, "round_0001_client_0000.json"),
    RunCase("result-a-list", write(RESULT, "[]"), ATTACK, "round_0001_client_0000.json"),
    RunCase("scenario-not-utf8", write("scenario.yaml", LATIN1), ATTACK, "scenario.yaml"),
    RunCase("scenario-garbage-yaml", write("scenario.yaml", "a: [\n"), ATTACK, "scenario.yaml"),
    RunCase("half-trained", remove("training.json"), ATTACK, "not finished training"),
    RunCase("attack-garbage-training", write("training.json", "{"), ATTACK, "training.json"),
    RunCase("attack-garbage-metrics", bad_metrics_line, ATTACK, "metrics.jsonl"),
    RunCase("garbage-summary", write("summary.json", "{"), REPORT, "summary.json"),
    RunCase("truncated-summary", truncate("summary.json"), REPORT, "summary.json"),
    RunCase("summary-a-list", write("summary.json", "[]"), REPORT, "summary.json"),
    RunCase("summary-not-utf8", write("summary.json", b"\xff\xfe{}"), REPORT, "summary.json"),
    RunCase("report-garbage-metrics", bad_metrics_line, REPORT, "metrics.jsonl"),
    RunCase("report-truncated-metrics", truncate("metrics.jsonl"), REPORT, "metrics.jsonl"),
    RunCase("summary-missing-fields", write("summary.json", '{"scenario": "tiny"}'), REPORT, "summary.json"),
    RunCase("report-garbage-result", write(RESULT, "{"), REPORT, "round_0001_client_0000.json"),
    RunCase("resume-garbage-metrics", bad_metrics_line, RESUME, "metrics.jsonl"),
    RunCase("resume-garbage-training", write("training.json", "[1, 2"), RESUME, "training.json"),
    RunCase("resume-garbage-result", write(RESULT, "]"), RESUME, "round_0001_client_0000.json"),
]


def command_line(command: str, run: Path) -> list[str | Path]:
    if command == ATTACK:  # the scenario's own settings: its results are read, not recomputed
        return ["attack", run, "--attack", "dlg"]
    if command == REPORT:
        return ["report", run]
    return ["run", run / "scenario.yaml", "--run-dir", run]  # resume: the run's own scenario


@pytest.mark.parametrize("case", CORRUPTIONS, ids=lambda c: c.id)
def test_corrupted_run_directory(case: RunCase, trained: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    if case.command == RESUME:  # the scenario file must be readable for a resume
        shutil.copy(run / "scenario.yaml", tmp_path / "scenario.yaml")
    case.corrupt(run)
    args = command_line(case.command, run)
    if case.command == RESUME:
        args[1] = tmp_path / "scenario.yaml"
    before = directories(tmp_path)
    line = one_error_line(*run_cli(*args))
    assert case.expected in line
    assert directories(tmp_path) == before


def test_report_garbage_cells_manifest(tmp_path: Path) -> None:
    (tmp_path / "cells.json").write_text('{"axes": ')
    line = one_error_line(*run_cli("report", tmp_path))
    assert "cells.json" in line


def test_locked_run_directory_refuses_a_second_writer(trained: Path, tmp_path: Path) -> None:
    """A run directory held by another fedsim process (its lock taken) is refused, not shared."""
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    with (run / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = one_error_line(*run_cli("attack", run, "--attack", "dlg", "--set", "iterations=1"))
        assert "in use by another fedsim process" in line
        line = one_error_line(*run_cli("run", run / "scenario.yaml", "--run-dir", run))
        assert "in use by another fedsim process" in line


def standard_json(text: str) -> object:
    """`text` parsed as standard JSON: a bare NaN or Infinity fails the test."""
    return json.loads(text, parse_constant=lambda constant: pytest.fail(f"bare {constant} in JSON"))


def test_diverged_run_ends_with_its_status_and_exit_code_1(tmp_path: Path) -> None:
    """lr 1e30 turns the weights into NaN: the run says so and exits 1, its files stay standard
    JSON, round 0 (the untrained model) is never the best, and no attack runs on the failed
    training (tests/test_faults.py: an attack skips a NaN update of a finished one)."""
    scenario = tmp_path / "diverging.yaml"
    scenario.write_text(tiny(training={"batch_size": 2, "local_steps": 2, "lr": 1e30}, federation={"rounds": 2}))
    run = tmp_path / "run"
    code, out, err = run_cli("run", scenario, "--run-dir", run)
    assert code == 1 and "Traceback" not in out + err
    assert err.startswith("error: training diverged") and err.count("\n") == 1
    training = standard_json((run / "training.json").read_text())
    assert training["status"] == "diverged"
    rounds = [standard_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # the NaN updates are dropped before they reach the model, and the round that lost them all says so
    assert "non_finite [0, 1]" in training["reason"]
    assert training["best_test_accuracy"] == max((r["test_accuracy"] for r in rounds[1:]), default=None)
    assert not (run / RESULT).exists() and "attacks skipped until a rerun trains it" in out
    assert standard_json((run / "summary.json").read_text())["training"]["status"] == "diverged"


def test_automatic_run_ids_are_unique_within_one_second(tmp_path: Path) -> None:
    from fedsim.core.config import build_scenario
    from fedsim.core.results import new_run_root

    scenario = build_scenario({"output": {"dir": str(tmp_path)}})
    assert len({new_run_root(scenario) for _ in range(3)}) == 3


def test_markdown_report_shows_user_text_as_written() -> None:
    from fedsim.reporting.report import markdown_text

    assert markdown_text("<script>x</script> a|b *c* [d](e)") == (
        "&lt;script&gt;x&lt;/script&gt; a\\|b \\*c\\* \\[d\\](e)"
    )
