"""The sweep file: one base scenario, axes of values, seeds -> a list of cells.

    base: ../quickstart.yaml        # scenario file, relative to the sweep file
    # scenario: {...}               # ... or the scenario inline
    name: dp_tradeoff
    mode: grid                      # grid | zip | random
    samples: 8                      # random only: cells drawn
    seeds: [0, 1, 2]                # every cell runs once per seed (sets scenario.seed)
    set: {federation.rounds: 10}    # fixed overrides, applied to every cell
    axes:                           # dotted scenario field -> list of values
      defenses.0.noise_multiplier: [0.5, 1.0, 2.0]
    workers: 2                      # cells run at once (processes, or Ray tasks)
    ray_address: null               # run cells as tasks on this Ray cluster
    output: runs/sweeps             # the sweep directory is output/name

`grid` takes every combination of axis values, `zip` the i-th value of every axis together
(equal lengths), `random` draws `samples` combinations: a list axis is a uniform choice
(without replacement when every axis is a list), and in random mode an axis may instead be a
distribution `{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}` or `{randint: [lo, hi]}` (hi
excluded), drawn with scikit-learn's `ParameterSampler` from `sample_seed`.

Every cell's scenario is validated when the sweep is loaded, so an unknown axis field or a
bad value fails before anything runs, as one line naming the cell and the field.
`build_sweep` takes the same fields as a mapping (the Python API, `fedsim.sweep`).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedsim.core.config import DirectoryName, Scenario, apply_override, build_scenario, read_yaml
from fedsim.core.errors import UserError
from fedsim.core.results import scenario_hash
from fedsim.core.seeding import derive_seed

DISTRIBUTIONS = ("uniform", "loguniform", "randint")

AxisValues = Annotated[list[Any], Field(min_length=1)]
Distribution = dict[Literal["uniform", "loguniform", "randint"], tuple[float, float]]


class RayResources(BaseModel):
    """What one cell asks of the Ray cluster (Ray task resources)."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(1.0, gt=0, description="CPUs per cell")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per cell, fractional allowed")


class SweepFile(BaseModel):
    """A sweep file as written (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: DirectoryName = Field(description="sweep directory name")
    description: str = Field("", description="free text, shown in reports")
    base: Path | None = Field(None, description="base scenario file, relative to the sweep file")
    scenario: dict[str, Any] | None = Field(None, description="the base scenario inline")
    mode: Literal["grid", "zip", "random"] = "grid"
    samples: int | None = Field(None, ge=1, description="random mode: number of cells drawn")
    sample_seed: int = Field(0, ge=0, description="random mode: seed of the draws")
    seeds: list[int] | None = Field(
        None, min_length=1, description="scenario seeds per cell; default: the base seed"
    )
    fixed: dict[str, Any] = Field(
        default_factory=dict, alias="set", description="dotted field -> value for every cell"
    )
    axes: dict[str, AxisValues | Distribution] = Field(
        min_length=1, description="dotted scenario field -> values"
    )
    workers: int = Field(1, ge=1, description="cells run at the same time")
    ray_address: str | None = Field(None, description="run cells as tasks on this Ray cluster")
    ray_resources: RayResources = Field(default_factory=RayResources)
    output: Path = Field(Path("runs/sweeps"), description="sweeps are written to OUTPUT/NAME")

    @model_validator(mode="after")
    def _consistent(self) -> SweepFile:
        if (self.base is None) == (self.scenario is None):
            raise ValueError("give exactly one of 'base' (a scenario file) or 'scenario' (inline)")
        if "seed" in self.axes or "seed" in self.fixed:
            raise ValueError("'seed' is set by 'seeds: [...]', not by axes or set")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: {self.seeds} repeats a seed")
        if (self.mode == "random") != (self.samples is not None):
            raise ValueError("'samples' is needed by mode: random and only by it")
        for axis, values in self.axes.items():
            if isinstance(values, dict):
                check_distribution(axis, values, self.mode)
        lists = [v for v in self.axes.values() if isinstance(v, list)]
        if (
            self.samples
            and len(lists) == len(self.axes)
            and self.samples > math.prod(map(len, lists))
        ):
            raise ValueError(
                f"samples: {self.samples} exceeds the {math.prod(map(len, lists))} combinations "
                "of the axes; use mode: grid or fewer samples"
            )
        if self.mode == "zip":
            lengths = {axis: len(values) for axis, values in self.axes.items()}
            if len(set(lengths.values())) > 1:
                raise ValueError(f"mode zip needs axes of equal length, got {lengths}")
        return self


def check_distribution(axis: str, spec: Distribution, mode: str) -> None:
    if mode != "random":
        raise ValueError(f"axes.{axis}: a distribution needs mode: random; give a list of values")
    if len(spec) != 1:
        raise ValueError(
            f"axes.{axis}: one of {', '.join(DISTRIBUTIONS)}, e.g. {{uniform: [0, 1]}}"
        )
    ((kind, (low, high)),) = spec.items()
    if not low < high or (kind == "loguniform" and low <= 0):
        raise ValueError(f"axes.{axis}: {kind} needs 0 < lo < hi for loguniform, lo < hi otherwise")


def format_sweep_error(err: ValidationError) -> str:
    """One line: the first problem's field and message."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("list[", "dict[")))
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(f.alias or name for name, f in SweepFile.model_fields.items())
        return f"{where}: unknown sweep field (check the spelling); allowed: {allowed}"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


@dataclass(frozen=True)
class Cell:
    """One scenario of the sweep: a combination of axis values, at one seed."""

    index: int  # which combination of axis values (all seeds of it share the index)
    seed: int
    values: dict[str, Any]
    scenario: Scenario

    @property
    def name(self) -> str:
        """Stable run-directory name; the hash of the resolved scenario keeps an edited
        sweep from ever resuming a directory that holds other settings."""
        return f"cell-{self.index:04d}-seed{self.seed}-{scenario_hash(self.scenario)}"

    def describe(self) -> str:
        return "  ".join(f"{axis}={value_text(v)}" for axis, v in self.values.items())


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: its file (None when built from a mapping), its cells and where
    they are written."""

    path: Path | None
    spec: SweepFile
    cells: list[Cell]

    @property
    def directory(self) -> Path:
        return self.spec.output / self.spec.name

    @property
    def axes(self) -> list[str]:
        return list(self.spec.axes)


def value_text(value: Any) -> str:
    """A value as one short line of YAML (flow style)."""
    return (
        yaml.safe_dump(value, default_flow_style=True, width=10_000)
        .strip()
        .removesuffix("...")
        .strip()
    )


def short_names(axes: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each axis that no other axis ends with."""
    names = {}
    for axis in axes:
        parts = axis.split(".")
        for size in range(1, len(parts) + 1):
            name = ".".join(parts[-size:])
            if sum(other.endswith(name) for other in axes) == 1:
                break
        names[axis] = name
    return names


def combinations(spec: SweepFile) -> list[dict[str, Any]]:
    """The axis values of every cell, in order (before seeds)."""
    names = list(spec.axes)
    if spec.mode == "grid":
        return [dict(zip(names, combo)) for combo in itertools.product(*spec.axes.values())]
    if spec.mode == "zip":
        return [dict(zip(names, combo)) for combo in zip(*spec.axes.values())]
    return random_combinations(spec)


def random_combinations(spec: SweepFile) -> list[dict[str, Any]]:
    """`samples` draws from the axes (scikit-learn's ParameterSampler, seeded)."""
    from sklearn.model_selection import ParameterSampler

    space = {
        axis: values if isinstance(values, list) else distribution(values)
        for axis, values in spec.axes.items()
    }
    seed = derive_seed(spec.sample_seed, "sweep", spec.name) % 2**32
    draws = ParameterSampler(space, n_iter=spec.samples, random_state=seed)
    return [{axis: plain(draw[axis]) for axis in spec.axes} for draw in draws]


def distribution(spec: Distribution) -> Any:
    """A scipy.stats distribution from `{kind: [lo, hi]}`."""
    from scipy import stats

    ((kind, (low, high)),) = spec.items()
    if kind == "uniform":
        return stats.uniform(low, high - low)
    if kind == "loguniform":
        return stats.loguniform(low, high)
    return stats.randint(int(low), int(high))


def plain(value: Any) -> Any:
    """numpy scalars (from scipy draws) as Python numbers, for YAML and JSON."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict)) else value


def cell_scenario(
    base: dict[str, Any], fixed: dict[str, Any], values: dict[str, Any], seed: int
) -> Scenario:
    raw = copy.deepcopy(base)
    for path, value in [*fixed.items(), *values.items(), ("seed", seed)]:
        apply_override(raw, path.split("."), copy.deepcopy(value))
    return build_scenario(raw)


def load_sweep(path: Path | str, workers: int | None = None) -> Sweep:
    """Read and validate a sweep file and every cell's scenario (UserError on any problem)."""
    path = Path(path)
    return build_sweep(read_yaml(path, "sweep"), workers, path)


def build_sweep(raw: Mapping[str, Any], workers: int | None = None, path: Path | None = None) -> Sweep:
    """Validate a sweep mapping, as a sweep file holds it, and every cell's scenario.

    `path` is the file it came from: `base` is relative to it (else to the working
    directory) and errors name it. `raw` is left unchanged.
    """
    where = str(path) if path else "sweep"
    try:
        spec = SweepFile.model_validate(raw)
    except ValidationError as err:
        raise UserError(f"{where}: {format_sweep_error(err)}") from None
    if workers is not None:
        spec = spec.model_copy(update={"workers": workers})
    if spec.base is not None:
        try:
            base = read_yaml(path.parent / spec.base if path else spec.base)
        except UserError as err:
            raise UserError(f"{where}: base: {err}") from None
    else:
        base = spec.scenario or {}
    try:
        seeds = spec.seeds or [build_scenario(base).seed]
    except UserError as err:
        raise UserError(f"{where}: base scenario: {err}") from None
    cells = []
    for index, values in enumerate(combinations(spec)):
        for seed in seeds:
            try:
                scenario = cell_scenario(base, spec.fixed, values, seed)
            except UserError as err:
                what = "  ".join(f"{k}={value_text(v)}" for k, v in values.items())
                reason = str(err).removeprefix("--set ")
                raise UserError(f"{where}: cell {index} ({what}): {reason}") from None
            cells.append(Cell(index, seed, values, scenario))
    return Sweep(path, spec, cells)
