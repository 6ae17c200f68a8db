"""fedsim's Python API: the one module that composes the layers for library use.

    import fedsim

    scenario = fedsim.scenario({"data": {"num_clients": 2}, "attacks": ["dlg"]}, "federation.rounds=2")
    run = fedsim.run(scenario)                  # train -> attack -> summary, quietly
    run.rounds, run.scores, run.model(), run.reconstructions("dlg")
    fedsim.Run.open(run.path)                   # the same, from the run directory
    fedsim.attack("dlg", fedsim.from_gradient(model, grads, 1, (1, 8, 8), 10), iterations=3)
    fedsim.sweep({"scenario": {...}, "name": "s", "axes": {"training.lr": [0.05, 0.1]}})

Everything here is what the CLI does (`fedsim.pipeline.runner`, `fedsim.experiments.sweep`),
returned as objects and pandas DataFrames instead of printed. Nothing prints unless asked
(`progress=True`); Flower's log goes to Python logging, warnings only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import TypeAdapter, ValidationError
from rich.console import Console
from torch import Tensor, nn

from fedsim.core.attack import GradientAttack, GradientTarget, Reconstruction, from_gradient
from fedsim.core.config import AttackSpec, PluginSpec, Scenario, build_scenario, load_scenario
from fedsim.core.errors import UserError
from fedsim.core.registry import ATTACKS
from fedsim.core.results import RunDirectory, read_json
from fedsim.data.datasets import federated_data
from fedsim.evaluation.metrics import score_reconstruction
from fedsim.experiments.sweep import LOG, cells_frame, run_sweep
from fedsim.experiments.sweep_spec import build_sweep, load_sweep
from fedsim.pipeline.model_leakage import model_target
from fedsim.pipeline.reconstructions import SUFFIX, load_reconstruction
from fedsim.pipeline.runner import load_run_scenario, run_scenario

__all__ = ["AttackResult", "Run", "Scenario", "attack", "from_gradient", "run", "scenario", "sweep"]

log = logging.getLogger("fedsim")


def console(progress: bool) -> Console:
    """The CLI's rich output when asked for, else a console that prints nothing."""
    return Console() if progress else Console(quiet=True)


def scenario(source: Scenario | Mapping[str, Any] | str | Path, *overrides: str) -> Scenario:
    """A validated Scenario from a mapping or a YAML file, plus `"field=value"` overrides
    (the CLI's `--set`); a mapping given is never changed. UserError names a bad field."""
    if isinstance(source, Scenario):
        source = source.model_dump(mode="json")
    if isinstance(source, Mapping):
        return build_scenario(source, list(overrides))
    return load_scenario(source, list(overrides))


_scenario = scenario  # `run`'s parameter shadows it


@dataclass(frozen=True)
class Run:
    """A run directory, read back as Python objects (each property reads the files anew, so
    a resumed or re-attacked run shows its latest results)."""

    path: Path
    scenario: Scenario

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """An existing run directory (written by `fedsim.run`, `fedsim run` or a sweep)."""
        directory = RunDirectory(path).require()
        return cls(directory.root, load_run_scenario(directory))

    @property
    def directory(self) -> RunDirectory:
        return RunDirectory(self.path)

    @property
    def summary(self) -> dict[str, Any]:
        """summary.json: utility, privacy spent (each epsilon with its unit), mean leakage."""
        if not self.directory.summary_path.is_file():
            raise UserError(f"'{self.path}' has no summary.json yet; run it to the end first")
        return read_json(self.directory.summary_path)

    @property
    def rounds(self) -> pd.DataFrame:
        """metrics.jsonl: one row per round (round 0 is the initial model's evaluation)."""
        return pd.DataFrame(list(self.directory.metrics()))

    @property
    def scores(self) -> pd.DataFrame:
        """One row per attack and target (observation `round_R_client_C`, or `class_CC` of
        a model inversion): the attack's JSON record, its parameters under `params`."""
        rows = []
        attacks_dir = self.directory.attacks_dir
        for path in sorted(attacks_dir.glob("*/*.json")) if attacks_dir.is_dir() else []:
            record = read_json(path)
            params = record.pop("attack")
            rows.append({"attack": path.parent.name, "target": path.stem, "params": params, **record})
        return pd.DataFrame(rows)

    def model(self) -> nn.Module:
        """The final global model, built as the federation built it (defense wrappers
        included) and loaded from model.safetensors, in eval mode."""
        data = federated_data(self.scenario.data, self.scenario.public().seed)
        return model_target(self.directory, self.scenario, data).model.requires_grad_(True)

    def reconstructions(self, attack: str) -> dict[str, Reconstruction]:
        """What `attack` reconstructed, by target (the stems of `scores`)."""
        directory = self.directory.attacks_dir / attack
        if not directory.is_dir():
            attacked = sorted(p.name for p in self.directory.attacks_dir.glob("*"))
            raise UserError(f"'{self.path}' holds no results of attack '{attack}'; attacked: {attacked}")
        return {p.stem: load_reconstruction(p) for p in sorted(directory.glob(f"*{SUFFIX}"))}


def run(
    scenario: Scenario | Mapping[str, Any] | str | Path,
    run_dir: str | Path | None = None,
    progress: bool = False,
) -> Run:
    """Train, attack and summarise `scenario` (resuming `run_dir` if it holds the same one).

    Quiet unless `progress`, which prints what `fedsim run` prints.
    """
    resolved = _scenario(scenario)
    written = run_scenario(resolved, run_dir, console(progress))
    return Run(written.root, resolved)


@dataclass(frozen=True)
class AttackResult:
    """An attack's reconstruction of each target, and their scores when the truth was given
    (one row per target, as `Run.scores`)."""

    reconstructions: list[Reconstruction]
    scores: pd.DataFrame | None = None


def attack_spec(name: str, params: Mapping[str, Any]) -> PluginSpec:
    """`name` and `params` validated as a scenario's attack entry is (one-line UserError)."""
    try:
        return TypeAdapter(AttackSpec).validate_python({"name": name, **params})
    except ValidationError as err:
        raise UserError(err.errors()[0]["msg"].removeprefix("Value error, ")) from None


def attack(
    name: str,
    targets: GradientTarget | Sequence[GradientTarget],
    truth: tuple[Tensor, Tensor] | Sequence[tuple[Tensor, Tensor]] | None = None,
    seed: int = 0,
    **params: Any,
) -> AttackResult:
    """Run the registered gradient attack `name` (with its `params`) on your own targets,
    e.g. `from_gradient(model, gradient, ...)`; several targets go to the attack together.

    `truth` is (images, labels) per target, used only to score the reconstructions.
    """
    spec = attack_spec(name, params)
    attacker = ATTACKS.get(spec.name)(spec.params, seed=seed)
    if not isinstance(attacker, GradientAttack):
        raise UserError(f"attack '{name}' inverts a final model, not a gradient; run it in a scenario")
    single = isinstance(targets, GradientTarget)
    recons = attacker.reconstruct_many([targets] if single else list(targets))
    if truth is None:
        return AttackResult(recons)
    pairs = [truth] if single else list(truth)
    scores = [
        {"target": i, **score_reconstruction(r.images, x, r.labels, y, r.details)}
        for i, (r, (x, y)) in enumerate(zip(recons, pairs, strict=True))
    ]
    return AttackResult(recons, pd.DataFrame(scores))


def pooled_audit(runs: list[str | Path], attack: str, beta: float = 0.05) -> dict[str, Any]:
    """The multi-run audit of `attack` over `runs` (one scenario's run directories, seeds
    apart): Jagielski et al.'s bound and the Gaussian-trade-off bound on the pooled canaries
    (`fedsim.pipeline.pooled_audit`)."""
    from fedsim.pipeline.pooled_audit import pooled_audit as pool

    return pool(runs, attack, beta)


def sweep(
    spec: Mapping[str, Any] | str | Path,
    workers: int | None = None,
    dry_run: bool = False,
    progress: bool = False,
) -> pd.DataFrame:
    """Run a sweep (a mapping with a sweep file's fields, or the file) and return its
    results table (`fedsim.experiments.sweep_table`), one row per cell; rerunning resumes.

    `dry_run` runs nothing and returns the cells with their status on disk.
    """
    plan = build_sweep(spec, workers) if isinstance(spec, Mapping) else load_sweep(spec, workers)
    if dry_run:
        return cells_frame(plan)
    outcome = run_sweep(plan, console(progress))
    for name, error in outcome.failures.items():
        log.warning("sweep cell %s failed: %s (log: %s)", name, error, outcome.directory / name / LOG)
    return outcome.table
