"""Model factories: classical (and quantum, when PennyLane is installed).

Importing this package registers every model in `fedsim.core.registry.MODELS`. The quantum
models are optional: they load only when PennyLane is installed and `quantum.py` exists.
"""

from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

from fedsim.models import classical  # noqa: F401  (registers the classical models)

if TYPE_CHECKING:
    from torch import nn

    from fedsim.core.config import PluginSpec, Scenario

if find_spec("pennylane") is not None and (Path(__file__).parent / "quantum.py").exists():
    import_module("fedsim.models.quantum")


def build_model(spec: "PluginSpec", input_shape: tuple[int, ...], num_classes: int) -> "nn.Module":
    """Instantiate the registered model named in a scenario for this dataset's shapes.

    A regression dataset (num_classes 0) gets a model with one output.
    """
    from fedsim.core.registry import MODELS

    return MODELS.get(spec.name)(spec.params, tuple(input_shape), num_classes or 1)


def federated_model(scenario: "Scenario", input_shape: tuple[int, ...], num_classes: int) -> "nn.Module":
    """The model every party builds: the scenario's model, wrapped by each defense that
    changes the architecture (e.g. an information-bottleneck head), in scenario order."""
    from fedsim.core.defense import build_defenses

    model = build_model(scenario.model, input_shape, num_classes)
    for defense in build_defenses(scenario.defenses):
        model = defense.wrap_model(model)
    return model
