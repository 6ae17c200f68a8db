"""Flower strategies by name, each with its own validated parameters.

A scenario names a strategy by fedsim's short name (`fedavg`), by Flower's class name
(`FedAvg`), or by the import path of its own Flower Message-API strategy
(`mypkg.module:MyStrategy`); the latter two resolve to a registered name when the scenario is
validated. Strategies without hand-written `Params` take the scalar keyword arguments of
their `__init__` (bool, int, float, str), described from the class's numpydoc docstring.

fedsim samples cohorts itself (see `fedsim.federation.sampling`), so every strategy here is built to
train and evaluate on all nodes it is shown: fraction 1.0 and minimums of 1.
"""

from __future__ import annotations

import inspect
import re
import typing
from importlib import import_module
from typing import Any, ClassVar

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)
from pydantic import BaseModel, ConfigDict, Field, create_model

from fedsim.core.errors import UserError
from fedsim.core.registry import STRATEGIES, NoParams

TAKE_ALL_NODES: dict[str, Any] = {
    "fraction_train": 1.0,
    "fraction_evaluate": 1.0,
    "min_train_nodes": 1,
    "min_evaluate_nodes": 1,
    "min_available_nodes": 1,
}
"""Sampling arguments that make a Flower strategy use every node it is shown."""

MESSAGE_LAYOUT = ("weighted_by_key", "arrayrecord_key", "configrecord_key")
"""Keys of fedsim's messages that a strategy must keep at Flower's defaults."""

SCALARS = (bool, int, float, str)


class FlowerStrategy:
    """A registered Flower strategy: `flower_class` built with the scenario's params."""

    flower_class: ClassVar[type[Strategy]]
    releases_weights: ClassVar[bool] = True
    """Clients send weights, which the observer records and gradient attacks invert."""
    Params: ClassVar[type[BaseModel]]

    @classmethod
    def build(cls, params: BaseModel) -> Strategy:
        accepted = inspect.signature(cls.flower_class).parameters
        sampling = {k: v for k, v in TAKE_ALL_NODES.items() if k in accepted}
        return cls.flower_class(**sampling, **params.model_dump())


@STRATEGIES.register("fedavg")
class FedAvgStrategy(FlowerStrategy):
    """FedAvg (McMahan et al. 2017): example-weighted average of client weights."""

    flower_class = FedAvg
    Params = NoParams


@STRATEGIES.register("fedprox")
class FedProxStrategy(FlowerStrategy):
    """FedProx (Li et al. 2020): FedAvg plus a proximal term mu/2*||w - w_global||^2 on clients."""

    flower_class = FedProx

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        proximal_mu: float = Field(0.01, ge=0, description="weight of the proximal term")


@STRATEGIES.register("fedadam")
class FedAdamStrategy(FlowerStrategy):
    """FedAdam (Reddi et al. 2021): Adam on the server over the averaged update."""

    flower_class = FedAdam

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        eta: float = Field(0.01, gt=0, description="server learning rate")
        eta_l: float = Field(0.1, gt=0, description="client learning rate (reported only)")
        beta_1: float = Field(0.9, ge=0, lt=1, description="first-moment decay")
        beta_2: float = Field(0.99, ge=0, lt=1, description="second-moment decay")
        tau: float = Field(1e-3, gt=0, description="adaptivity (epsilon)")


@STRATEGIES.register("fedavgm")
class FedAvgMStrategy(FlowerStrategy):
    """FedAvgM (Hsu et al. 2019): FedAvg with server momentum."""

    flower_class = FedAvgM

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        server_learning_rate: float = Field(1.0, gt=0, description="server step size")
        server_momentum: float = Field(0.9, ge=0, lt=1, description="server momentum")


def docstring_descriptions(doc: str) -> dict[str, str]:
    """First sentence of each parameter's entry in a numpydoc `Parameters` section."""
    found: dict[str, str] = {}
    current = None
    for line in inspect.cleandoc(doc).splitlines():
        if entry := re.match(r"(\w+) : ", line):
            current = entry.group(1)
            found[current] = ""
        elif current and line.startswith(" "):
            found[current] = f"{found[current]} {line.strip()}".strip()
        elif line.strip():
            current = None
    return {name: text.split(". ")[0].rstrip(".") for name, text in found.items()}


def signature_params(strategy: type) -> type[BaseModel]:
    """A Params model of `strategy.__init__`'s scalar keyword arguments, with their defaults.

    Sampling and message keys stay fedsim's (see TAKE_ALL_NODES, MESSAGE_LAYOUT), and
    callables are left out: a scenario file cannot hold them.
    """
    try:
        hints = typing.get_type_hints(strategy.__init__)
    except (NameError, TypeError):  # unresolvable annotations: such arguments are left out
        hints = {}
    described = docstring_descriptions(strategy.__doc__ or "")
    fields: dict[str, Any] = {}
    for name, parameter in inspect.signature(strategy.__init__).parameters.items():
        kind_ok = parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        hint = hints.get(name)
        if name == "self" or not kind_ok or name in (*TAKE_ALL_NODES, *MESSAGE_LAYOUT) or hint not in SCALARS:
            continue
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[name] = (hint, Field(default, description=described.get(name, "")))
    return create_model(
        f"{strategy.__name__}Params", __config__=ConfigDict(extra="forbid"), **fields
    )


def wrap_flower_class(flower_class: type[Strategy], doc: str) -> type[FlowerStrategy]:
    """A registrable FlowerStrategy for `flower_class`, its Params read from its signature."""
    attributes = {
        "flower_class": flower_class,
        "Params": signature_params(flower_class),
        "__doc__": doc,
        "__module__": __name__,
    }
    return type(f"{flower_class.__name__}Strategy", (FlowerStrategy,), attributes)


for _name, _flower_class, _doc in (
    ("fedyogi", FedYogi, "FedYogi (Reddi et al. 2021): Yogi on the server over the averaged update."),
    ("fedadagrad", FedAdagrad, "FedAdagrad (Reddi et al. 2021): Adagrad on the server over the averaged update."),
    ("krum", Krum, "Krum (Blanchard et al. 2017): the one update closest to its neighbours (robust)."),
    ("multikrum", MultiKrum, "Multi-Krum (Blanchard et al. 2017): averages the updates Krum ranks best (robust)."),
    ("fedtrimmedavg", FedTrimmedAvg, "Trimmed mean (Yin et al. 2018): per coordinate, drops a beta share at each end (robust)."),
    ("fedmedian", FedMedian, "FedMedian (Yin et al. 2018): coordinate-wise median of the updates (robust)."),
    ("bulyan", Bulyan, "Bulyan (El Mhamdi et al. 2018): Multi-Krum selection, then a trimmed mean (robust)."),
):  # fmt: skip
    STRATEGIES.register(_name)(wrap_flower_class(_flower_class, _doc))


def import_strategy(path: str) -> type[Strategy]:
    """The Strategy class at 'package.module:Class', or a one-line UserError."""
    module_name, _, class_name = path.partition(":")
    try:
        found = getattr(import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise UserError(f"strategy '{path}': cannot import it ({err})") from None
    if not (isinstance(found, type) and issubclass(found, Strategy)):
        raise UserError(f"strategy '{path}' is not a flwr.serverapp.strategy.Strategy subclass")
    return found


def resolve_strategy(name: str) -> str | None:
    """The registered name that `name` stands for: a Flower class name (`FedAvg`), or an
    import path ('package.module:Class', registered under that path on first use)."""
    if ":" in name:
        flower_class = import_strategy(name)
        doc = (flower_class.__doc__ or "").strip().split("\n")[0] or f"user strategy {name}"
        STRATEGIES.register(name)(wrap_flower_class(flower_class, doc))
        return name
    flower_names = {
        plugin.flower_class.__name__: registered
        for registered, plugin in STRATEGIES
        if ":" not in registered and isinstance(getattr(plugin, "flower_class", None), type)
    }
    return flower_names.get(name)


STRATEGIES.resolve = resolve_strategy
