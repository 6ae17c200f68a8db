"""Name -> plugin registries for everything a scenario can name.

A plugin is any object with a pydantic `Params` model (extra fields forbidden), so a typo in
a scenario fails when the file is loaded, not halfway through a run. Each kind of plugin has
its own calling convention, documented on its registry below. Attacks and defenses live in
separate packages and register themselves when imported; `load_plugins` imports every
package that declares the `fedsim.plugins` entry point (fedsim's own `attacks` and
`defenses`, and any third-party package).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from fedsim.core.errors import UserError

T = TypeVar("T")


class NoParams(BaseModel):
    """Params model for plugins that take no parameters."""

    model_config = ConfigDict(extra="forbid")


class Registry(Generic[T]):
    """Plugins of one kind, by name."""

    def __init__(self, kind: str, convention: str) -> None:
        self.kind = kind
        self.plural = kind[:-1] + "ies" if kind.endswith("y") else kind + "s"
        self.convention = convention
        self._plugins: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register a plugin under `name` (its `Params` must forbid extras)."""

        def add(plugin: T) -> T:
            params = getattr(plugin, "Params", None)
            if not (isinstance(params, type) and issubclass(params, BaseModel)):
                raise TypeError(f"{self.kind} '{name}' needs a pydantic `Params` class")
            if params.model_config.get("extra") != "forbid":
                raise TypeError(f"{self.kind} '{name}': Params must set extra='forbid'")
            if name in self._plugins and self._plugins[name] is not plugin:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._plugins[name] = plugin
            return plugin

        return add

    def get(self, name: str) -> T:
        """The plugin called `name`, or a UserError listing the allowed names."""
        load_plugins()
        if name not in self._plugins:
            raise UserError(
                f"unknown {self.kind} '{name}'; allowed: {', '.join(self.names())}"
            )
        return self._plugins[name]

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._plugins)

    def __iter__(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._plugins.items()))

    def describe(self, name: str) -> str:
        """First line of the plugin's docstring."""
        doc = (getattr(self.get(name), "__doc__", None) or "").strip()
        return doc.splitlines()[0] if doc else ""


def params_of(plugin: Any) -> type[BaseModel]:
    return plugin.Params


DATASETS: Registry[Any] = Registry(
    "dataset", "load(params, seed) -> fedsim.data.datasets.TensorData (all examples, one table)"
)
PARTITIONERS: Registry[Any] = Registry(
    "partitioner", "build(params, num_partitions, seed) -> flwr_datasets Partitioner"
)
MODELS: Registry[Any] = Registry(
    "model", "cls(params, input_shape, num_classes) -> torch.nn.Module"
)
STRATEGIES: Registry[Any] = Registry(
    "strategy", "build(params) -> flwr.serverapp.strategy.Strategy (takes every node it is shown)"
)
ATTACKS: Registry[Any] = Registry("attack", "cls(params) -> fedsim.core.attack.Attack")
DEFENSES: Registry[Any] = Registry("defense", "cls(params) -> fedsim.core.defense.Defense")

ALL_REGISTRIES = (DATASETS, PARTITIONERS, MODELS, STRATEGIES, ATTACKS, DEFENSES)

_loaded = False


def load_plugins() -> None:
    """Import fedsim's built-in plugin modules and every `fedsim.plugins` entry point."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in ("fedsim.data.datasets", "fedsim.models", "fedsim.federation.strategies"):
        import_module(module)
    for entry in entry_points(group="fedsim.plugins"):
        entry.load()
