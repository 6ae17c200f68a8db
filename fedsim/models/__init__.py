"""Model factories: classical (and quantum, when PennyLane is installed).

This package declares every model in `fedsim.core.registry.MODELS` (`Registry.lazy`); a model's
module loads when the model is first asked for. The quantum models are optional: declared only
when PennyLane is installed.
"""

from importlib.util import find_spec
from typing import TYPE_CHECKING

from fedsim.core.registry import MODELS

if TYPE_CHECKING:
    from torch import nn

    from fedsim.core.config import PluginSpec, Scenario

for _name in ("mlp", "lenet", "convnet", "resnet18", "resnet20"):
    MODELS.lazy(_name, "fedsim.models.classical")
if find_spec("pennylane") is not None:
    MODELS.lazy("vqc", "fedsim.models.quantum")
    MODELS.lazy("hybrid", "fedsim.models.quantum")


def build_model(spec: "PluginSpec", input_shape: tuple[int, ...], num_classes: int) -> "nn.Module":
    """Instantiate the registered model named in a scenario for this dataset's shapes.

    A regression dataset (num_classes 0) gets a model with one output.
    """
    return MODELS.get(spec.name)(spec.params, tuple(input_shape), num_classes or 1)


def federated_model(scenario: "Scenario", input_shape: tuple[int, ...], num_classes: int) -> "nn.Module":
    """The model every party builds: the scenario's model, wrapped by each defense that
    changes the architecture (e.g. an information-bottleneck head), in scenario order."""
    from fedsim.core.defense import build_defenses

    model = build_model(scenario.model, input_shape, num_classes)
    for defense in build_defenses(scenario.defenses):
        model = defense.wrap_model(model)
    return model
