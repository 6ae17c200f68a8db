"""fedsim: simulate privacy attacks and defenses in federated learning.

The public API is `fedsim.api` (scenario, run, Run, attack, from_gradient, sweep); its names
are imported on first use (PEP 562), so `import fedsim`, and `fedsim --help`, load neither
torch nor Flower.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["AttackResult", "Run", "Scenario", "attack", "from_gradient", "pooled_audit", "run", "scenario", "sweep"]


def _version() -> str:
    """The installed distribution's version, else (a source tree on sys.path) pyproject's."""
    try:
        return metadata.version("fedsim")
    except metadata.PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"]


__version__ = _version()


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fedsim import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedsim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
