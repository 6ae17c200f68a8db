"""Name -> plugin registries for everything a scenario can name.

A plugin is any object with a pydantic `Params` model (extra fields forbidden), so a typo in
a scenario fails when the file is loaded, not halfway through a run. Each kind of plugin has
its own calling convention, documented on its registry below, and registering checks what it
can of that convention (a TypeError at import, not a failure mid-run). A plugin class learns
the name it is registered under from its `registered_name` class attribute.

Plugins are declared lazily, `ATTACKS.lazy("dlg", "fedsim.attacks.dlg")`: the name is known
at once, and only `get` imports the module, which registers the plugin with its decorator. So
validating a scenario imports the plugins it names and none of the others' heavy dependencies
(Opacus, PennyLane, Flower's simulation...). Each plugin package declares its plugins in its
`__init__`; `load_plugins` imports fedsim's own (`fedsim.data`, `fedsim.models`,
`fedsim.federation`) and every package that declares the `fedsim.plugins` entry point
(fedsim's `attacks` and `defenses`, and any third-party package).

`CLIENT_ACTIONS` holds client-side message handlers (`fedsim.federation.client_call.ClientAction`)
for strategies and defenses with a message exchange of their own; they take no `Params`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from fedsim.core.attack import Attack, GradientAttack, ModelAttack
from fedsim.core.membership import MembershipAttack
from fedsim.core.errors import UserError

T = TypeVar("T")


class NoParams(BaseModel):
    """Params model for plugins that take no parameters."""

    model_config = ConfigDict(extra="forbid")


Check = Callable[[str, Any], None]
"""Raises TypeError when a plugin registered under a name breaks its registry's convention."""


def check_params(name: str, plugin: Any, kind: str) -> None:
    """The plugin has a pydantic `Params` class that forbids extra fields."""
    params = getattr(plugin, "Params", None)
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        raise TypeError(f"{kind} '{name}' needs a pydantic `Params` class")
    if params.model_config.get("extra") != "forbid":
        raise TypeError(f"{kind} '{name}': Params must set extra='forbid'")


class Registry(Generic[T]):
    """Plugins of one kind, by name; `check` vets each plugin as it is registered."""

    def __init__(self, kind: str, convention: str, check: Check | None = None) -> None:
        self.kind = kind
        self.plural = kind[:-1] + "ies" if kind.endswith("y") else kind + "s"
        self.convention = convention
        self.check = check or (lambda name, plugin: check_params(name, plugin, kind))
        self._plugins: dict[str, T] = {}
        self._given: dict[str, T] = {}  # as passed to `register` (before `named`)
        self._lazy: dict[str, str] = {}  # name -> the module whose import registers it
        self.resolve: Callable[[str], str | None] = lambda name: None
        """For a name not registered: the registered name it stands for (an alias, or a plugin
        registered on demand, e.g. a strategy's import path), or None."""

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register a plugin under `name`, after `check`.

        A class gets `registered_name = name`. A class registered under a second name is
        registered as a subclass carrying that name, so each name reports as itself.
        """

        def add(plugin: T) -> T:
            self.check(name, plugin)
            if self._given.setdefault(name, plugin) is not plugin:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._plugins[name] = named(plugin, name)
            return plugin

        return add

    def lazy(self, name: str, module: str) -> None:
        """Declare that importing `module` registers `name`; nothing is imported until `get`."""
        if self._lazy.setdefault(name, module) != module:
            raise ValueError(f"{self.kind} '{name}' is declared twice ({self._lazy[name]}, {module})")

    def get(self, name: str) -> T:
        """The plugin called `name` (importing its declared module), or a UserError listing the
        allowed names."""
        load_plugins()
        if name not in self._plugins and name in self._lazy:
            self._import(name)
        if name not in self._plugins:
            self._import_all()  # a name registered by a declared module but not declared itself
            name = self.resolve(name) or name
        if name not in self._plugins:
            raise UserError(
                f"unknown {self.kind} '{name}'; allowed: {', '.join(self.names())}"
            )
        return self._plugins[name]

    def names(self) -> list[str]:
        """Every registered or declared name, importing no declared module."""
        load_plugins()
        return sorted({*self._plugins, *self._lazy})

    def __iter__(self) -> Iterator[tuple[str, T]]:
        """Every plugin, by name: imports every declared module."""
        self._import_all()
        return iter(sorted(self._plugins.items()))

    def _import(self, name: str) -> None:
        module = self._lazy[name]
        import_module(module)
        if name not in self._plugins:
            raise TypeError(
                f"{self.kind} '{name}' is declared as registered by module {module}, but "
                f"importing it registers no {self.kind} of that name; fix the "
                f"{self.kind}'s `register` decorator or the `lazy` declaration"
            )

    def _import_all(self) -> None:
        load_plugins()
        for name in sorted(self._lazy):
            if name not in self._plugins:
                self._import(name)

    def describe(self, name: str) -> str:
        """First line of the plugin's docstring."""
        doc = (getattr(self.get(name), "__doc__", None) or "").strip()
        return doc.splitlines()[0] if doc else ""


def named(plugin: T, name: str) -> T:
    """`plugin` with `registered_name = name`: a class as is on its first registration, a
    subclass of it on a later one under another name; anything else (a function) unchanged."""
    if not isinstance(plugin, type):
        return plugin
    if plugin.__dict__.get("registered_name", name) != name:
        return type(plugin.__name__, (plugin,), {"registered_name": name, "__doc__": plugin.__doc__,
                                                 "__module__": plugin.__module__})  # type: ignore[return-value]
    plugin.registered_name = name  # type: ignore[attr-defined]
    return plugin


def check_attack(name: str, plugin: Any) -> None:
    """An attack is a `GradientAttack`, `ModelAttack` or `MembershipAttack` class with a threat
    model and Params."""
    if not (isinstance(plugin, type) and issubclass(plugin, Attack)):
        raise TypeError(f"attack '{name}' must be a subclass of fedsim.core.attack.Attack")
    if not issubclass(plugin, (GradientAttack, ModelAttack, MembershipAttack)):
        raise TypeError(
            f"attack '{name}' must subclass fedsim.core.attack.GradientAttack (attacks an "
            "observed update), ModelAttack (attacks the final model) or "
            "fedsim.core.membership.MembershipAttack (scores membership), not Attack itself"
        )
    threat_model = inspect.getattr_static(plugin, "threat_model", None)
    if not (isinstance(threat_model, property) or (isinstance(threat_model, str) and threat_model.strip())):
        raise TypeError(
            f"attack '{name}' must state its `threat_model`: a non-empty str class attribute "
            "or a property"
        )
    check_params(name, plugin, "attack")


def check_defense(name: str, plugin: Any) -> None:
    """A defense is a `Defense` class with Params."""
    from fedsim.core.defense import Defense  # not at the top: the defense seam names the Scenario

    if not (isinstance(plugin, type) and issubclass(plugin, Defense)):
        raise TypeError(f"defense '{name}' must be a subclass of fedsim.core.defense.Defense")
    check_params(name, plugin, "defense")


def check_client_action(name: str, plugin: Any) -> None:
    """A client action is a callable; its name becomes the message type `train.<name>`."""
    if not callable(plugin):
        raise TypeError(f"client action '{name}' must be a function (content, call) -> content")
    if not name.isidentifier():
        raise TypeError(f"client action '{name}': the name must be a Python identifier (Flower's rule)")


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
ATTACKS: Registry[Any] = Registry(
    "attack", "cls(params, seed) -> fedsim.core.attack.GradientAttack | ModelAttack", check_attack
)
DEFENSES: Registry[Any] = Registry("defense", "cls(params) -> fedsim.core.defense.Defense", check_defense)
CLIENT_ACTIONS: Registry[Any] = Registry(
    "client action",
    "action(content, fedsim.federation.client_call.ClientCall) -> reply content, for messages "
    "of type 'train.<name>'",
    check_client_action,
)

ALL_REGISTRIES = (DATASETS, PARTITIONERS, MODELS, STRATEGIES, ATTACKS, DEFENSES)
"""The registries a scenario names plugins from (what `fedsim list` shows); CLIENT_ACTIONS are
not named by scenarios but by the strategy or defense that sends their messages."""

_loaded = False


def load_plugins() -> None:
    """Import the packages that declare fedsim's built-in plugins and every `fedsim.plugins`
    entry point (each declares its plugins; their modules load on first `get`)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for package in ("fedsim.data", "fedsim.models", "fedsim.federation"):
        import_module(package)
    for entry in entry_points(group="fedsim.plugins"):
        entry.load()
