"""Fast start-up: each command imports only the heavy libraries its path needs.

Which modules a fresh `fedsim` process imports, not how long it takes (that is
`benchmarks/startup.py`): `--help` loads neither torch nor Flower, and validating a scenario or
listing a sweep's cells loads only the plugins the scenario names, without their heavy
dependencies. Also the lazy registry that makes this possible (`Registry.lazy`).
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path

import pytest

import fedsim.core.registry as registry_module
from fedsim.core.registry import ALL_REGISTRIES, CLIENT_ACTIONS, Registry

ROOT = Path(__file__).resolve().parent.parent
NOT_FOR_VALIDATION = (
    "pennylane", "matplotlib", "torchmetrics", "pandas", "opacus", "ray", "flwr.simulation",
    "sklearn", "scipy", "datasets", "flwr_datasets", "PIL", "mlflow",
)  # fmt: skip
PROBE = """
import atexit, runpy, sys
atexit.register(lambda: print("IMPORTED", ",".join(sorted(sys.modules)), file=sys.stderr))
sys.argv = ["fedsim", *sys.argv[1:]]
runpy.run_module("fedsim.cli", run_name="__main__")
"""


def imported_by(*args: str) -> set[str]:
    """The modules a fresh `fedsim ARGS` process had imported when it exited (it must succeed)."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(line for line in done.stderr.splitlines() if line.startswith("IMPORTED "))
    return set(line.removeprefix("IMPORTED ").split(","))


def test_help_and_version_import_neither_torch_nor_flower() -> None:
    for args in (["--help"], ["--version"]):
        modules = imported_by(*args)
        assert not {"torch", "flwr", "pydantic"} & modules, args


@pytest.mark.parametrize(
    "args",
    [
        ["validate", "scenarios/quickstart.yaml"],
        ["sweep", "scenarios/sweeps/dp_tradeoff.yaml", "--dry-run"],  # dp_sgd: Params, no Opacus
    ],
    ids=["validate", "sweep-dry-run"],
)
def test_validating_imports_only_the_named_plugins(args: list[str]) -> None:
    modules = imported_by(*args)
    assert not set(NOT_FOR_VALIDATION) & modules
    named = {"fedsim.attacks.dlg"} | ({"fedsim.defenses.dp_sgd"} if args[0] == "sweep" else set())
    assert named <= modules
    assert not {"fedsim.attacks.gmi", "fedsim.defenses.secagg", "fedsim.models.quantum"} & modules


WIDGETS = '''
from pydantic import BaseModel, ConfigDict

from fedsim.core.registry import WIDGETS


@WIDGETS.register("gear")
class Gear:
    """A gear."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        teeth: int = 12
'''


@pytest.fixture
def widgets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    """A fresh registry whose plugin module `fedsim_test_widgets` registers only 'gear'."""
    registry: Registry = Registry("widget", "cls()")
    monkeypatch.setattr(registry_module, "WIDGETS", registry, raising=False)
    (tmp_path / "fedsim_test_widgets.py").write_text(WIDGETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield registry
    sys.modules.pop("fedsim_test_widgets", None)


def test_lazy_names_are_known_before_their_module_is_imported(widgets: Registry) -> None:
    widgets.lazy("gear", "fedsim_test_widgets")
    assert "gear" in widgets.names()
    assert "fedsim_test_widgets" not in sys.modules
    gear = widgets.get("gear")
    assert "fedsim_test_widgets" in sys.modules
    assert gear.registered_name == "gear" and gear.Params().teeth == 12


def test_a_declared_name_its_module_does_not_register_is_a_clear_error(widgets: Registry) -> None:
    widgets.lazy("cog", "fedsim_test_widgets")
    with pytest.raises(TypeError, match="widget 'cog' is declared as registered by module fedsim_test_widgets"):
        widgets.get("cog")


def test_every_builtin_plugin_is_declared() -> None:
    """A fedsim plugin registered but not declared is missing from `names()` until imported."""
    for package in ("fedsim.attacks", "fedsim.defenses", "fedsim.data", "fedsim.models", "fedsim.federation"):
        for module in pkgutil.iter_modules(import_module(package).__path__, f"{package}."):
            try:
                import_module(module.name)  # registers whatever it registers
            except Exception:  # noqa: BLE001  an optional extra missing, or a broken module
                continue  # registers nothing: declared or not, nothing to check (its tests fail)
    for registry in (*ALL_REGISTRIES, CLIENT_ACTIONS):
        plugins = dict(registry)
        undeclared = [
            name
            for name, plugin in plugins.items()
            if getattr(plugin, "__module__", "").startswith("fedsim.")
            and ":" not in name  # a strategy named by import path registers on first use
            and name not in registry._lazy
        ]
        assert not undeclared, f"declare {registry.plural} {undeclared} with `Registry.lazy`"
