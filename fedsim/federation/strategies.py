"""Flower strategies by name, each with its own validated parameters.

fedsim samples cohorts itself (see `fedsim.federation.sampling`), so every strategy here is built to
train and evaluate on all nodes it is shown: fraction 1.0 and minimums of 1.
"""

from __future__ import annotations

from typing import Any, ClassVar

from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, Strategy
from pydantic import BaseModel, ConfigDict, Field

from fedsim.core.registry import STRATEGIES, NoParams


TAKE_ALL_NODES: dict[str, Any] = {
    "fraction_train": 1.0,
    "fraction_evaluate": 1.0,
    "min_train_nodes": 1,
    "min_evaluate_nodes": 1,
    "min_available_nodes": 1,
}
"""Sampling arguments that make a Flower strategy use every node it is shown."""


class FlowerStrategy:
    """A registered Flower strategy: `flower_class` built with the scenario's params."""

    flower_class: ClassVar[type[Strategy]]
    releases_weights: ClassVar[bool] = True
    """Clients send weights, which the observer records and gradient attacks invert."""
    Params: ClassVar[type[BaseModel]]

    @classmethod
    def build(cls, params: BaseModel) -> Strategy:
        return cls.flower_class(**TAKE_ALL_NODES, **params.model_dump())


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
