"""The scenario: one validated, fully defaulted description of a run.

A scenario file is YAML. Every field has a default and a description (`fedsim list` and
`fedsim validate` show them). Plugin fields (dataset, partitioner, model, strategy, each
defense and attack) are written as a name plus that plugin's own parameters, e.g.
`model: {name: lenet, activation: sigmoid}` or just `model: lenet`; the parameters are
validated against the plugin's `Params` when the file is loaded.

`load_scenario(path, overrides)` is the front door: it reads the file, applies `--set a.b=c`
overrides and turns every problem into a one-line `UserError` naming the field.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from fedsim.core.attack import GradientAttack
from fedsim.core.errors import UserError
from fedsim.core.registry import (
    ATTACKS,
    DATASETS,
    DEFENSES,
    MODELS,
    PARTITIONERS,
    STRATEGIES,
    Registry,
)
from fedsim.core.seeding import public_seed


MAX_SEED = 2**63 - 1
"""Seeds are 63-bit (a root of secrets must not be guessable by trying 2**32 values); every
library that takes a smaller seed gets one derived from it (`fedsim.core.seeding`)."""


def _types_in(annotation: Any) -> set[Any]:
    """Every type an annotation names, through unions, containers, Literal and Annotated."""
    args = get_args(annotation)
    if get_origin(annotation) is Literal:
        return {type(arg) for arg in args}
    return set().union(*map(_types_in, args)) if args else {annotation}


def refuse_lax_value(annotation: Any, value: Any) -> None:
    """Refuse what lax validation would quietly accept for a field of type `annotation`: a
    YAML boolean where a number goes (`rounds: true` would become 1) and a non-finite float
    (a NaN or infinite lr trains nothing, and JSON has no infinity). Items of lists are
    checked too; mappings are plugin specs, which check their own parameters."""
    values = value if isinstance(value, list) else [value]
    for item in values:
        if isinstance(item, list):
            refuse_lax_value(annotation, item)
        elif isinstance(item, bool) and not {bool, Any} & _types_in(annotation):
            raise ValueError(f"expected a number, got the boolean {str(item).lower()}")
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"expected a finite number, got {item}")


def _directory_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", name):
        raise ValueError(
            f"{name!r} names a directory: use letters, digits, '_', '-' and '.', "
            "not starting with '.'"
        )
    return name


DirectoryName = Annotated[str, AfterValidator(_directory_name)]
"""A scenario's or sweep's name, which becomes a directory: never '.', '..' or a path."""


class Section(BaseModel):
    """A scenario section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_numbers(cls, value: Any, info: Any) -> Any:
        refuse_lax_value(cls.model_fields[info.field_name].annotation, value)
        return value


class PluginSpec(BaseModel):
    """A registered plugin's name and its validated parameters."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    params: BaseModel

    @model_serializer
    def _flat(self) -> dict[str, Any]:
        return {"name": self.name, **self.params.model_dump(mode="json")}


def _plugin_validator(registry: Registry[Any]) -> BeforeValidator:
    def parse(value: Any) -> PluginSpec:
        if isinstance(value, PluginSpec):
            return value
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            raise ValueError(
                f"expected a {registry.kind} name or a mapping with 'name'; "
                f"allowed names: {', '.join(registry.names())}"
            )
        raw = dict(value)
        name = raw.pop("name")
        try:
            plugin = registry.get(name)
        except UserError as err:
            raise ValueError(str(err)) from None
        for key, item in raw.items():
            if key in plugin.Params.model_fields:
                try:
                    refuse_lax_value(plugin.Params.model_fields[key].annotation, item)
                except ValueError as err:
                    raise ValueError(f"{registry.kind} '{name}' parameter '{key}': {err}") from None
        try:
            params = plugin.Params.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            allowed = ", ".join(plugin.Params.model_fields) or "none"
            if first["type"] == "extra_forbidden":
                raise ValueError(
                    f"unknown parameter '{where}' for {registry.kind} '{name}'; "
                    f"allowed: {allowed}"
                ) from None
            raise ValueError(f"{registry.kind} '{name}' parameter '{where}': {first['msg']}") from None
        return PluginSpec(name=getattr(plugin, "registered_name", name), params=params)

    return BeforeValidator(parse)


DatasetSpec = Annotated[PluginSpec, _plugin_validator(DATASETS)]
PartitionerSpec = Annotated[PluginSpec, _plugin_validator(PARTITIONERS)]
ModelSpec = Annotated[PluginSpec, _plugin_validator(MODELS)]
StrategySpec = Annotated[PluginSpec, _plugin_validator(STRATEGIES)]
DefenseSpec = Annotated[PluginSpec, _plugin_validator(DEFENSES)]
AttackSpec = Annotated[PluginSpec, _plugin_validator(ATTACKS)]


class CanaryConfig(Section):
    """Audit canaries: mislabelled test examples (input) or Dirac per-example gradients
    (gradient), each in a client's training with some probability."""

    kind: Literal["input", "gradient", "client"] = Field(
        "input", description="input: mislabelled test examples added to the client's data; "
        "gradient: a per-example gradient of norm max_grad_norm on one parameter, added inside "
        "DP-SGD before the noise (white-box audits; needs dp_sgd); client: a canary client "
        "whose update is the clipping norm on one parameter (or zero when left out), joining "
        "every round's cohort (client-level audits of central DP; needs a central_dp_* defense)"
    )
    count: int = Field(0, ge=0, description="canaries (0: none); drawn from the test set, which loses them")
    clients: list[Annotated[int, Field(ge=0)]] | Literal["all"] = Field(
        "all", description="partition ids the canaries are designated to, round-robin (a client "
        "trains on its included ones)"
    )
    probability: float = Field(
        0.5, gt=0, lt=1, description="each canary's inclusion probability (1/2 for the one-run audit)"
    )


class DataConfig(Section):
    """Which data, how it is split between clients, and what is held out."""

    dataset: DatasetSpec = Field("digits", description="registered dataset and its params")
    partitioner: PartitionerSpec = Field("iid", description="how examples go to clients")
    num_clients: int = Field(10, ge=1, le=100_000, description="number of partitions")
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of all examples held out as the global test set"
    )
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of each client's examples kept for validation"
    )
    public_classes: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list,
        description="classes kept out of the federation (train and test) and given to "
        "model-inversion attackers as public auxiliary data; the rest are private",
    )
    canaries: CanaryConfig = Field(
        default_factory=CanaryConfig, description="DP-audit canaries (fedsim.data.canaries)"
    )
    train_pool: list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        description="pool indices the clients train on, the rest being the test set (replaces "
        "test_fraction; set by shadow federations, fedsim.pipeline.shadows)",
    )


class TrainingConfig(Section):
    """Local training on each client (what the server sends as hyper-parameters)."""

    local_epochs: int = Field(1, ge=1, le=10_000, description="passes over the local data per round")
    local_steps: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="if set, exactly this many batches per round (overrides epochs)",
    )
    batch_size: int = Field(16, ge=1, le=1_000_000, description="local mini-batch size")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="local optimizer")
    lr: float = Field(0.05, gt=0, description="local learning rate")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay")
    clear_text_metrics: bool = Field(
        False,
        description="under a client-side DP defense (dp_sgd, local_dp, dp_gd, diff2), still send "
        "train-loss, defense statistics (mid_kl) and the true num-examples; the epsilon then "
        "does not cover them (the privacy record says so)",
    )


class FederationConfig(Section):
    """The server side: strategy, rounds and cohorts."""

    strategy: StrategySpec = Field("fedavg", description="Flower strategy and its params")
    rounds: int = Field(3, ge=1, le=100_000, description="federated rounds")
    clients_per_round: int | None = Field(
        None, ge=1, description="clients sampled per round (seeded); null = all clients"
    )
    evaluate_clients_per_round: int = Field(
        0, ge=0, description="clients that evaluate on their validation split each round"
    )
    round_timeout: float = Field(
        3600.0, gt=0, le=10**7, description="seconds a round waits for replies; later ones are dropped"
    )
    accept_failures: bool = Field(
        True, description="aggregate a round without its failed replies (false: a failure fails the run)"
    )
    min_replies: int = Field(
        1, ge=1, description="fewest usable train replies a round aggregates; fewer fail the run"
    )


class FaultsConfig(Section):
    """Seeded client faults, for testing how a run copes with failing clients (client side)."""

    kind: Literal["raise", "hang", "drop", "nan"] = Field(
        "raise",
        description="raise: the client errors; hang: it sleeps past federation.round_timeout; "
        "drop: it drops out (no update); nan: it returns a NaN update",
    )
    rate: float = Field(0.0, ge=0, le=1, description="chance that a client in the cohort fails in a round")
    clients: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="only these partition ids fail (each at `rate`; null: any client)"
    )
    from_round: int = Field(1, ge=1, description="first round in which faults happen")


class SimulationConfig(Section):
    """How the federation is executed."""

    engine: Literal["inline", "vectorized", "ray"] = Field(
        "inline",
        description="inline: one process, no Ray (fast, small runs); vectorized: one process, "
        "each round's cohort trained as one batched computation; ray: Flower's simulation engine",
    )
    max_clients_per_batch: int | None = Field(
        None,
        ge=1,
        le=10**6,
        description="vectorized engine: clients trained together at most (null: all on CPU, "
        "from free memory on CUDA)",
    )
    client_cpus: float = Field(1.0, gt=0, description="CPUs per client (Ray backend)")
    client_gpus: float = Field(0.0, ge=0, description="GPUs per client, fractional allowed")
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="where clients train; cuda falls back to cpu with a message"
    )
    ray_workers: int = Field(
        0,
        ge=0,
        le=10**4,
        description="vectorized engine: Ray actors that each train a shard of the cohort, with "
        "client_cpus / client_gpus each (0: train in this process)",
    )
    ray_address: str | None = Field(None, description="join this Ray cluster instead of starting one")
    torch_threads: int = Field(1, ge=1, le=1024, description="torch threads per client process")
    ray_discovery_timeout: float | None = Field(
        None,
        gt=0,
        le=10**6,
        description="seconds Ray waits for every client node to connect (null: 60 + 2 per client)",
    )
    secret_seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="root of the simulated clients' secret randomness, never sent (null: "
        "derived from seed, secret only while seed is unguessable)",
    )


class ObserverConfig(Section):
    """What the honest-but-curious server records to disk for attacks."""

    rounds: list[int] | Literal["all", "none"] = Field(
        default_factory=lambda: [1], description="rounds to record ('all', 'none' or a list)"
    )
    clients: list[int] | Literal["all"] = Field(
        default_factory=lambda: [0], description="partition ids to record ('all' or a list)"
    )


class OutputConfig(Section):
    """Where run directories go."""

    dir: Path = Field(Path("runs"), description="runs are written to DIR/<name>/<run-id>")
    save_model: bool = Field(True, description="save the final global model as model.safetensors")


class Scenario(Section):
    """A complete fedsim run."""

    name: DirectoryName = Field("scenario", description="run family name")
    description: str = Field("", description="free text, shown in reports")
    seed: int = Field(
        0,
        ge=0,
        le=MAX_SEED,
        description="derives every other seed; keeps client noise secret only if unguessable",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSpec = Field("mlp", description="registered model and its params")
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    observer: ObserverConfig = Field(default_factory=ObserverConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    defenses: list[DefenseSpec] = Field(default_factory=list, description="active defenses")
    attacks: list[AttackSpec] = Field(
        default_factory=list, description="attacks run on every recorded observation"
    )
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        n = self.data.num_clients
        if self.simulation.ray_workers and self.simulation.engine != "vectorized":
            raise ValueError(
                f"simulation.ray_workers={self.simulation.ray_workers} shards the vectorized "
                f"engine's cohorts, but engine is '{self.simulation.engine}'; set engine: "
                "vectorized, or ray_workers: 0"
            )
        if self.federation.clients_per_round is not None and self.federation.clients_per_round > n:
            raise ValueError(
                f"federation.clients_per_round={self.federation.clients_per_round} exceeds "
                f"data.num_clients={n}"
            )
        if self.federation.evaluate_clients_per_round > n:
            raise ValueError(
                f"federation.evaluate_clients_per_round exceeds data.num_clients={n}"
            )
        if self.federation.evaluate_clients_per_round and self.data.val_fraction == 0:
            raise ValueError(
                "federation.evaluate_clients_per_round needs validation data: set "
                "data.val_fraction above 0, or evaluate_clients_per_round: 0"
            )
        if self.federation.min_replies > self.cohort_size:
            raise ValueError(
                f"federation.min_replies={self.federation.min_replies} exceeds the cohort of "
                f"{self.cohort_size} clients; lower it or sample more clients per round"
            )
        if self.faults.clients is not None:
            bad = [c for c in self.faults.clients if not 0 <= c < n]
            if bad:
                raise ValueError(f"faults.clients {bad} outside 0..{n - 1}")
        if self.faults.from_round > self.federation.rounds:
            raise ValueError(
                f"faults.from_round={self.faults.from_round} is after the last round "
                f"({self.federation.rounds}); lower it or set faults.rate: 0"
            )
        if isinstance(self.observer.clients, list):
            bad = [c for c in self.observer.clients if not 0 <= c < n]
            if bad:
                raise ValueError(f"observer.clients {bad} outside 0..{n - 1}")
        if isinstance(self.observer.rounds, list):
            bad = [r for r in self.observer.rounds if not 1 <= r <= self.federation.rounds]
            if bad:
                raise ValueError(f"observer.rounds {bad} outside 1..{self.federation.rounds}")
        names = [a.name for a in self.attacks]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:  # results live in attacks/<name>/, so a second entry would overwrite the first
            raise ValueError(
                f"attacks {repeated} listed more than once; a run keeps one result per attack: "
                "keep one entry each and try other settings with `fedsim attack RUN --attack NAME --set ...` or a sweep"
            )
        strategy = self.federation.strategy.name
        inverting = [a.name for a in self.attacks if issubclass(ATTACKS.get(a.name), GradientAttack)]
        if inverting and not getattr(STRATEGIES.get(strategy), "releases_weights", True):
            raise ValueError(
                f"attacks {inverting} invert recorded weight updates, but under strategy "
                f"'{strategy}' clients release noised gradients, which the observer does not "
                "record; drop those attacks or use a weight-averaging strategy (e.g. fedavg)"
            )
        dataset = self.data.dataset.name
        if getattr(DATASETS.get(dataset), "regression", False):
            classifying = [a.name for a in self.attacks if ATTACKS.get(a.name).needs_classes]
            if classifying:
                raise ValueError(
                    f"attacks {classifying} recover class labels, but data.dataset '{dataset}' "
                    "is a regression task; drop them or use a classification dataset"
                )
        canaries = self.data.canaries
        if canaries.kind == "gradient" and canaries.count and not any(
            getattr(DEFENSES.get(d.name), "takes_gradient_canaries", False) for d in self.defenses
        ):
            raise ValueError(
                "data.canaries.kind: gradient canaries are per-example gradients that DP-SGD adds "
                "before its noise; add the dp_sgd defense, or use kind: input"
            )
        if canaries.kind == "client" and canaries.count and not any(
            getattr(DEFENSES.get(d.name), "takes_client_canaries", False) for d in self.defenses
        ):
            raise ValueError(
                "data.canaries.kind: client canaries are extra clients whose updates central DP "
                "clips and noises with the cohort's; add a central_dp_* defense, or use kind: input"
            )
        model_check = getattr(MODELS.get(self.model.name), "check_scenario", None)
        if model_check is not None:  # models that need other sections (e.g. kde's pca: public classes)
            model_check(self.model.params, self)
        strategy_check = getattr(STRATEGIES.get(strategy), "check_scenario", None)
        if strategy_check is not None:  # strategies that need a kind of model (e.g. dp_kde: a sketch)
            strategy_check(self.federation.strategy.params, self)
        for spec in self.attacks:
            ATTACKS.get(spec.name).check_scenario(spec.params, self)
        for spec in self.defenses:
            DEFENSES.get(spec.name).check_scenario(spec.params, self)
        return self

    @property
    def cohort_size(self) -> int:
        return self.federation.clients_per_round or self.data.num_clients

    def observes(self, server_round: int, client: int) -> bool:
        rounds, clients = self.observer.rounds, self.observer.clients
        round_ok = rounds == "all" or (isinstance(rounds, list) and server_round in rounds)
        return round_ok and (clients == "all" or client in clients)

    def public(self) -> Scenario:
        """The scenario as the federation sees it: the seed replaced by its one-way public
        seed, which the server and every message may hold (see `fedsim.core.seeding`)."""
        simulation = self.simulation.model_copy(update={"secret_seed": None})
        return self.model_copy(update={"seed": public_seed(self.seed), "simulation": simulation})

    @property
    def client_secret_root(self) -> int:
        """The root of the simulated nodes' secrets: `simulation.secret_seed`, else the seed."""
        return self.simulation.secret_seed if self.simulation.secret_seed is not None else self.seed

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _section_fields(loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed in the scenario section at `loc` (empty if not a section)."""
    model: Any = Scenario
    for part in loc:
        field = model.model_fields.get(str(part))
        model = field.annotation if field else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return list(model.model_fields)


def _is_union_tag(part: Any) -> bool:
    """Pydantic names each member of a union in the location, e.g. 'list[int]'."""
    return isinstance(part, str) and bool(re.fullmatch(r"[\w-]+\[.*\]", part))


def format_validation_error(err: ValidationError) -> str:
    """One line: the first problem's dotted field path and message."""
    errors = err.errors()
    first = errors[0]

    def loc(error: Any) -> tuple[Any, ...]:
        return tuple(p for p in error["loc"] if not _is_union_tag(p))

    where = ".".join(str(p) for p in loc(first)) or "scenario"
    # a value that fits no member of a union fails once per member: report them together
    same = [e for e in errors if loc(e) == loc(first) and e["type"] != "extra_forbidden"]
    msg = ", or ".join(
        e["msg"].removeprefix("Value error, ").removeprefix("Input should be " if i else "")
        for i, e in enumerate(same or [first])
    )
    if first["type"] == "extra_forbidden":
        allowed = _section_fields(loc(first)[:-1])
        msg = "unknown field (check the spelling)" + (
            f"; allowed: {', '.join(allowed)}" if allowed else ""
        )
        same = [first]
    elif (first["type"] == "literal_error" or len(same) > 1) and not isinstance(
        first["input"], (dict, list)
    ):
        msg = f"{msg}, got {first['input']!r}"
    more = len(errors) - max(len(same), 1)
    return f"{where}: {msg}" + (f" (and {more} more)" if more else "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse 'a.b.0.c=value' into a path and a YAML-typed value."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected FIELD=VALUE, e.g. --set federation.rounds=5")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise UserError(f"--set {text!r}: empty field name")
    try:
        value = yaml.load(raw, Loader=StrictLoader) if raw else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    return key.strip().split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set `value` at the dotted `path` inside the raw scenario mapping."""
    node: Any = data
    for i, part in enumerate(path):
        key: Any = part
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node) or (
                int(part) == len(node) and i < len(path) - 1
            ):
                raise UserError(f"--set {'.'.join(path)}: no list item {part}")
            key = int(part)
            if key == len(node):  # the last item plus one: append
                node.append(None)
        elif not isinstance(node, dict):
            raise UserError(
                f"--set {'.'.join(path)}: '{'.'.join(path[:i])}' is a value ({node!r}), "
                "not a section"
            )
        if i == len(path) - 1:
            node[key] = value
            return
        child = node.get(key) if isinstance(node, dict) else node[key]
        if child is None:
            child = [] if path[i + 1].isdigit() else {}
        elif isinstance(child, str):  # a plugin given by name only: expand it
            child = {"name": child}
        node[key] = child
        node = child


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (YAML would silently
    keep the last value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}; give each field once", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


MAX_DEPTH = 32
"""Deeper YAML is no scenario (sections, plugin specs and lists nest a few levels)."""


def _too_deep(data: Any) -> bool:
    """Whether `data` nests more than MAX_DEPTH levels (iterative: deep input would overflow
    a recursive walk; shared YAML aliases are visited once)."""
    stack, seen = [(data, 1)], set()
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)) or id(node) in seen:
            continue
        if depth > MAX_DEPTH:
            return True
        seen.add(id(node))
        stack += [(child, depth + 1) for child in (node.values() if isinstance(node, dict) else node)]
    return False


def read_yaml(path: Path, what: str = "scenario") -> dict[str, Any]:
    """A YAML mapping from `path` (a `what` file), or a one-line UserError naming the file."""
    if not path.is_file():
        raise UserError(f"{what} file '{path}' not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
        data = yaml.load(text, Loader=StrictLoader)
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: not UTF-8 text (byte {err.start}); a {what} file is YAML saved as UTF-8"
        ) from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply; a {what} nests at most {MAX_DEPTH} levels") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise UserError(f"{path}{line}: invalid YAML: {problem}") from None
    if data is None:
        raise UserError(f"{path}: the file is empty; a {what} file needs at least a name, e.g. 'name: mine'")
    if not isinstance(data, dict):
        raise UserError(f"{path}: a {what} must be a YAML mapping of fields, got {type(data).__name__}")
    if _too_deep(data):
        raise UserError(f"{path}: nested too deeply; a {what} nests at most {MAX_DEPTH} levels")
    return data


def build_scenario(data: Mapping[str, Any], overrides: list[str] = ()) -> Scenario:
    """Validate a raw mapping plus `--set` overrides into a Scenario (UserError on failure).

    `data` is left as it was: overrides go to a deep copy, so one mapping can seed many scenarios.
    """
    data = copy.deepcopy(dict(data))
    for text in overrides:
        path, value = parse_override(text)
        apply_override(data, path, value)
    try:
        return Scenario.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err)) from None


def load_scenario(path: Path | str, overrides: list[str] = ()) -> Scenario:
    """Read, override and validate a scenario file."""
    return build_scenario(read_yaml(Path(path)), list(overrides))
