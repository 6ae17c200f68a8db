"""The run directory: one run's files, always written atomically, so a killed run never
leaves a half-written file and a rerun can tell what is already done.

Layout (`runs/<scenario-name>/<run-id>/`):

    scenario.yaml          the resolved scenario (every default filled in)
    metrics.jsonl          one JSON line per round, appended as the round ends
    observations/          what the honest-but-curious server saw (see fedsim.federation.observer)
    ground_truth/          simulation-only: which examples each observed client used
    model.safetensors      the final global model
    training.json          written last by training: marks training complete
    attacks/<attack>/      one JSON + one PNG per attacked observation
    summary.json           utility, privacy spent and leakage of the whole run
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsim.core.errors import UserError

if TYPE_CHECKING:
    from fedsim.core.config import Scenario


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


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


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

    @property
    def training_done(self) -> bool:
        return self.training_path.is_file()

    def require(self) -> RunDirectory:
        """This run directory, or a UserError if it is not one."""
        if not self.scenario_path.is_file():
            raise UserError(f"'{self.root}' is not a fedsim run directory (no scenario.yaml)")
        return self

    def reset_training(self) -> None:
        """Forget a half-done training (a killed run) so it restarts cleanly."""
        self.metrics_path.unlink(missing_ok=True)
        for directory in (self.observations_dir, self.ground_truth_dir):
            for path in sorted(directory.rglob("*"), reverse=True) if directory.exists() else []:
                path.rmdir() if path.is_dir() else path.unlink()

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one round's line; the whole file is rewritten atomically (rounds are few)."""
        old = self.metrics_path.read_bytes() if self.metrics_path.exists() else b""
        atomic_write_bytes(self.metrics_path, old + (json.dumps(record) + "\n").encode())

    def metrics(self) -> Iterator[dict[str, Any]]:
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                if line.strip():
                    yield json.loads(line)


def scenario_hash(scenario: Scenario) -> str:
    return hashlib.sha256(scenario.to_yaml().encode()).hexdigest()[:8]


def prepare_run_directory(scenario: Scenario, run_dir: str | Path | None = None) -> RunDirectory:
    """A new run directory, or `run_dir` to resume if it holds this same scenario."""
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = scenario.output.dir / scenario.name / f"{stamp}-{scenario_hash(scenario)}"
    run = RunDirectory(run_dir)
    if run.scenario_path.exists():
        if run.scenario_path.read_text() != scenario.to_yaml():
            raise UserError(
                f"'{run.root}' holds a different scenario; pick another --run-dir "
                "or use `fedsim attack` to attack an existing run"
            )
        return run
    atomic_write_bytes(run.scenario_path, scenario.to_yaml().encode())
    return run
