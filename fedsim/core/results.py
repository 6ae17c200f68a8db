"""The run directory: one run's files, always written atomically, so a killed run never
leaves a half-written file and a rerun can tell what is already done.

Layout (`runs/<scenario-name>/<run-id>/`; `runs/<scenario-name>/latest` links the newest):

    scenario.yaml          the resolved scenario (every default filled in)
    metrics.jsonl          one JSON line per round, appended as the round ends
    observations/          what the honest-but-curious server saw (see fedsim.federation.observer)
    ground_truth/          simulation-only: which examples each observed client used
    model.safetensors      the final global model
    training.json          written last by training: marks training complete
    attacks/<attack>/      per attacked target: scores (JSON), images (PNG), tensors (safetensors)
    summary.json           utility, privacy spent and leakage of the whole run
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsim.core.errors import UserError

if TYPE_CHECKING:
    from fedsim.core.config import PluginSpec, Scenario


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


DIVERGED = "diverged"
"""training.json's status when the final model holds NaN or infinite weights."""

FAILED = "failed"
"""training.json's status when a round had too few usable replies (its `reason` says why)."""

NON_FINITE = "non_finite"
"""The key under which a written record names its fields that were NaN or infinite."""


def _finite(obj: Any, where: str, replaced: list[str]) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        replaced.append(where)
        return None
    if isinstance(obj, dict):
        return {k: _finite(v, f"{where}.{k}" if where else str(k), replaced) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v, f"{where}.{i}", replaced) for i, v in enumerate(obj)]
    return obj


def standard_json(obj: Any, indent: int | None = None) -> str:
    """JSON every reader parses (jq, browsers: no bare NaN or Infinity): a non-finite number
    is written as null, and a mapping lists those fields under `non_finite`."""
    replaced: list[str] = []
    clean = _finite(obj, "", replaced)
    if replaced and isinstance(clean, dict):
        clean[NON_FINITE] = replaced
    return json.dumps(clean, indent=indent, allow_nan=False)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (standard_json(obj, indent=2) + "\n").encode())


REWRITE = "delete it and rerun to write it again"
RETRAIN = "a record of training: delete the run's training.json and rerun it to train again"


def damaged(path: Path, reason: str, fix: str = REWRITE) -> UserError:
    """The one-line error for a run file that cannot be read as fedsim wrote it."""
    return UserError(f"{path}: damaged or not written by fedsim ({reason}); {fix}")


def read_json(path: Path, fix: str = REWRITE) -> Any:
    """A JSON file's content, or a one-line UserError naming the file."""
    try:
        return json.loads(path.read_bytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise damaged(path, str(err).splitlines()[0], fix) from None


def read_record(path: Path, *keys: str, fix: str = REWRITE) -> dict[str, Any]:
    """A JSON object holding `keys`, or a one-line UserError naming the file."""
    record = read_json(path, fix)
    if not isinstance(record, dict):
        raise damaged(path, f"a JSON {type(record).__name__}, not an object", fix)
    missing = [key for key in keys if key not in record]
    if missing:
        raise damaged(path, f"no {', '.join(missing)}", fix)
    return record


LOCK = ".lock"
_held: set[Path] = set()


@contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (released by the OS even if the process is killed).

    Re-entrant within a process: a sweep cell's lock is also its run directory's lock.
    """
    key = path.resolve()
    if key in _held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{what} is in use by another fedsim process ({path} is locked)"
            ) from None
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)


def ensure_directory(path: Path, what: str) -> None:
    """`mkdir -p path`, or a one-line UserError naming `what` if a file is in the way."""
    in_the_way = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if in_the_way is not None:
        raise UserError(
            f"{what} '{path}': '{in_the_way}' is a file, not a directory; move it or choose another"
        )
    path.mkdir(parents=True, exist_ok=True)


class RunDirectory:
    """Paths and readers/writers of one run directory."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    scenario_path = property(lambda self: self.root / "scenario.yaml")
    metrics_path = property(lambda self: self.root / "metrics.jsonl")
    observations_dir = property(lambda self: self.root / "observations")
    ground_truth_dir = property(lambda self: self.root / "ground_truth")
    model_path = property(lambda self: self.root / "model.safetensors")
    training_path = property(lambda self: self.root / "training.json")
    attacks_dir = property(lambda self: self.root / "attacks")
    summary_path = property(lambda self: self.root / "summary.json")

    def attack_dir(self, spec: PluginSpec, scenario: Scenario) -> Path:
        """Where an attack's results go: `attacks/<name>`, unless the scenario runs that attack
        with other settings, or (an attack the scenario does not run) that folder holds results
        of other settings; then `attacks/<name>-<hash of the settings>`, so `fedsim attack
        --set ...` never overwrites earlier results."""
        params = spec.model_dump(mode="json")
        own = [a.model_dump(mode="json") for a in scenario.attacks if a.name == spec.name]
        plain = self.attacks_dir / spec.name
        if params in own or not (own or self._holds_other_settings(plain, params)):
            return plain
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
        return self.attacks_dir / f"{spec.name}-{digest}"

    @staticmethod
    def _holds_other_settings(folder: Path, params: dict[str, Any]) -> bool:
        """Whether a result record in `folder` was written by an attack with other settings."""
        return any(
            isinstance(record := read_json(path), dict) and record.get("attack", params) != params
            for path in folder.glob("*.json")
        )

    @property
    def training_done(self) -> bool:
        return self.training_path.is_file()

    @property
    def diverged(self) -> bool:
        """Whether training ended with NaN or infinite weights (training.json says so)."""
        return self.training_done and read_record(self.training_path).get("status") == DIVERGED

    @property
    def failure(self) -> str | None:
        """Why training stopped before its last round under the failure policy (training.json's
        `reason`: status failed, or diverged when every failure was a NaN update), else None."""
        if not self.training_done:
            return None
        record = read_record(self.training_path)
        return str(record["reason"]) if record.get("status") in (FAILED, DIVERGED) and "reason" in record else None

    @property
    def needs_training(self) -> bool:
        """Whether a resume must train: never finished, or stopped early by the failure policy
        (a failure may be transient, e.g. a timeout; a failed run is not a finished one)."""
        return not self.training_done or self.failure is not None

    def require(self) -> RunDirectory:
        """This run directory, or a UserError if it is not one."""
        if not self.scenario_path.is_file():
            raise UserError(f"'{self.root}' is not a fedsim run directory (no scenario.yaml)")
        return self

    def require_trained(self) -> RunDirectory:
        """This run directory with its training finished, or a UserError."""
        if not self.require().training_done:
            raise UserError(
                f"'{self.root}' has not finished training (no training.json); resume it first: "
                f"fedsim run {self.scenario_path} --run-dir {self.root}"
            )
        return self

    def lock(self) -> AbstractContextManager[None]:
        """Held while a fedsim process writes here: a second writer gets a one-line error."""
        return exclusive(self.root / LOCK, f"run directory '{self.root}'")

    def refuse_foreign(self) -> None:
        """A UserError unless this is a fedsim run, an empty directory or nothing yet: fedsim
        would delete and overwrite another folder's files (hidden ones, e.g. a lock, aside, and
        a pre-seeded `cache/`: its entries are keyed by what they depend on)."""
        ensure_directory(self.root, "run directory (--run-dir)")
        if not self.scenario_path.exists() and any(
            not path.name.startswith(".") and path.name != "cache" for path in self.root.iterdir()
        ):
            raise UserError(
                f"'{self.root}' is not a fedsim run (no scenario.yaml) and not empty; "
                "fedsim would overwrite its files: give a new or empty --run-dir"
            )

    def reset_training(self) -> None:
        """Forget a half-done training (a killed run) or a failed one, and what was computed
        from it, so it restarts cleanly."""
        for path in (self.metrics_path, self.training_path, self.summary_path):
            path.unlink(missing_ok=True)
        if self.attacks_dir.exists():
            shutil.rmtree(self.attacks_dir)
        for directory in (self.observations_dir, self.ground_truth_dir):
            for path in sorted(directory.rglob("*"), reverse=True) if directory.exists() else []:
                path.rmdir() if path.is_dir() else path.unlink()

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one round's line; the whole file is rewritten atomically (rounds are few)."""
        old = self.metrics_path.read_bytes() if self.metrics_path.exists() else b""
        atomic_write_bytes(self.metrics_path, old + (standard_json(record) + "\n").encode())

    def metrics(self) -> Iterator[dict[str, Any]]:
        """Each round's record; a one-line UserError names a damaged line."""
        if not self.metrics_path.exists():
            return
        try:
            lines = self.metrics_path.read_bytes().decode().splitlines()
        except UnicodeDecodeError as err:
            raise damaged(self.metrics_path, str(err), RETRAIN) from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise damaged(self.metrics_path, f"line {number}: {err}", RETRAIN) from None
            if not isinstance(record, dict) or "round" not in record:
                raise damaged(self.metrics_path, f"line {number} is no round record", RETRAIN)
            yield record


def scenario_hash(scenario: Scenario) -> str:
    return hashlib.sha256(scenario.to_yaml().encode()).hexdigest()[:8]


LATEST = "latest"
"""`<output.dir>/<scenario>/latest`: a symlink to the scenario's newest run directory."""


def link_latest(run_dir: Path) -> None:
    """Point `latest` beside `run_dir` at it, atomically (a new link renamed over the old),
    so a reader never finds the link missing. Relative, so the tree can move."""
    link = run_dir.parent / LATEST
    temporary = run_dir.parent / f".{LATEST}.{os.getpid()}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(temporary, link)


def new_run_root(scenario: Scenario) -> Path:
    """A new empty directory `<output.dir>/<scenario>/<time>-<hash>`, with `-2`, `-3`, ...
    when runs of the same scenario start in the same second: mkdir is atomic, so parallel
    runs never share one."""
    family = scenario.output.dir / scenario.name
    ensure_directory(family, "output.dir")
    stem = f"{datetime.now():%Y%m%d-%H%M%S}-{scenario_hash(scenario)}"
    count = 1
    while True:
        root = family / (stem if count == 1 else f"{stem}-{count}")
        try:
            root.mkdir()
            return root
        except FileExistsError:
            count += 1


def prepare_run_directory(scenario: Scenario, run_dir: str | Path | None = None) -> RunDirectory:
    """A new run directory, or `run_dir` to resume if it holds this same scenario.

    A new run in the default place (`<output.dir>/<scenario>/<time>-<hash>`) becomes the
    scenario's `latest`.
    """
    new_default = run_dir is None
    run = RunDirectory(new_run_root(scenario) if run_dir is None else run_dir)
    run.refuse_foreign()
    if run.scenario_path.exists():
        if not holds_scenario(run, scenario):
            raise UserError(
                f"'{run.root}' holds a different scenario; pick another --run-dir "
                "or use `fedsim attack` to attack an existing run"
            )
        return run
    atomic_write_bytes(run.scenario_path, scenario.to_yaml().encode())
    if new_default:
        link_latest(run.root)
    return run


def holds_scenario(run: RunDirectory, scenario: Scenario) -> bool:
    """Whether `run`'s scenario.yaml is `scenario`: the same text, or a file written before
    fedsim gained a field that reads back as `scenario` with today's defaults (then rewritten
    in today's form, so a run or cache of an older fedsim resumes)."""
    text = scenario.to_yaml().encode()
    if run.scenario_path.read_bytes() == text:
        return True
    from fedsim.core.config import build_scenario, read_yaml  # config is above results

    try:
        same = build_scenario(read_yaml(run.scenario_path)).to_yaml().encode() == text
    except UserError:
        return False
    if same:
        atomic_write_bytes(run.scenario_path, text)
    return same


@contextmanager
def locked_run_directory(scenario: Scenario, run_dir: str | Path | None = None) -> Iterator[RunDirectory]:
    """`prepare_run_directory`, with the run directory's lock held (from before its scenario
    is checked) until the block ends, so two processes never write one run."""
    if run_dir is None:  # a new directory: no other process knows it yet
        run = prepare_run_directory(scenario)
        with run.lock():
            yield run
        return
    run = RunDirectory(run_dir)
    run.refuse_foreign()  # before a lock file goes into someone else's folder
    with run.lock():
        yield prepare_run_directory(scenario, run.root)
