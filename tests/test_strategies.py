"""Strategies by fedsim's short name, Flower's class name, or a user's import path.

Every registered Flower strategy is built and aggregates three fake replies; a user strategy
given by import path trains one tiny inline federation; unknown names fail in one line.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import run_cli
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedsim.core.config import build_scenario
from fedsim.core.errors import UserError
from fedsim.core.registry import STRATEGIES
from fedsim.federation.strategies import FlowerStrategy
from tests.test_defenses import FakeGrid, server_identity  # noqa: F401 (fixture)

FLOWER_STRATEGIES = [n for n, p in STRATEGIES if issubclass(p, FlowerStrategy) and ":" not in n]
USER_STRATEGY = "tests.test_strategies:ScaledFedAvg"


class ScaledFedAvg(FedAvg):
    """FedAvg whose aggregate is scaled by `scale` (a user strategy with its own parameter)."""

    calls = 0

    def __init__(self, *, scale: float = 1.0, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.scale = scale

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        ScaledFedAvg.calls += 1
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            scaled = {k: v * self.scale for k, v in arrays.to_torch_state_dict().items()}
            arrays = ArrayRecord(scaled)
        return arrays, metrics


def scenario_with(strategy: object) -> dict:
    return {"name": "strategy", "federation": {"strategy": strategy}}


def test_every_registered_strategy_builds_and_aggregates(server_identity: None) -> None:
    assert {"fedyogi", "fedadagrad", "krum", "multikrum", "fedtrimmedavg", "fedmedian", "bulyan"} <= set(
        FLOWER_STRATEGIES
    )
    updates = [torch.full((4,), value) for value in (1.0, 2.0, 99.0)]  # one outlier
    for name in FLOWER_STRATEGIES:
        registered = STRATEGIES.get(name)
        strategy = registered.build(registered.Params())
        messages = strategy.configure_train(1, ArrayRecord({"w": torch.zeros(4)}), ConfigRecord(), FakeGrid())
        assert len(messages) == 3, name  # fedsim samples cohorts: every node shown trains
        replies = [
            Message(RecordDict({"arrays": ArrayRecord({"w": u}), "metrics": MetricRecord({"num-examples": 10})}),
                    reply_to=message)
            for u, message in zip(updates, messages)
        ]  # fmt: skip
        arrays, _ = strategy.aggregate_train(1, replies)
        aggregate = arrays.to_torch_state_dict()["w"]
        assert aggregate.shape == (4,) and torch.isfinite(aggregate).all(), name
        if name in ("fedavg", "fedprox"):
            assert torch.allclose(aggregate, torch.full((4,), 34.0)), (name, aggregate)
        if name in ("krum", "multikrum", "fedmedian"):  # robust: the outlier is out
            assert ((aggregate >= 1.0) & (aggregate <= 2.0)).all(), (name, aggregate)


def test_flower_class_names_and_descriptions() -> None:
    for flower_name, short in (("FedAvg", "fedavg"), ("FedYogi", "fedyogi"), ("FedTrimmedAvg", "fedtrimmedavg")):
        scenario = build_scenario(scenario_with(flower_name))
        assert scenario.federation.strategy.name == short  # stored under fedsim's name
    trimmed = build_scenario(scenario_with({"name": "FedTrimmedAvg", "beta": 0.1}))
    assert trimmed.federation.strategy.params.beta == 0.1
    fields = STRATEGIES.get("krum").Params.model_fields
    assert fields["num_malicious_nodes"].default == 0
    assert fields["num_malicious_nodes"].description == "Number of malicious nodes in the system"
    assert "arrayrecord_key" not in fields and "min_train_nodes" not in fields  # fedsim's own


def test_unknown_or_broken_strategy_names_fail_in_one_line() -> None:
    for name, message in (
        ("FedAvgg", "unknown strategy 'FedAvgg'; allowed: "),
        ("nowhere.module:Strategy", "strategy 'nowhere.module:Strategy': cannot import it"),
        ("tests.test_strategies:scenario_with", "is not a flwr.serverapp.strategy.Strategy subclass"),
    ):
        with pytest.raises(UserError) as caught:
            build_scenario(scenario_with(name))
        assert message in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(UserError, match="unknown parameter 'scale'"):
        build_scenario(scenario_with({"name": "FedAvg", "scale": 2.0}))


def test_user_strategy_by_import_path_trains_a_federation(tmp_path: Path) -> None:
    scenario = {
        "name": "user-strategy",
        "data": {"dataset": "digits", "num_clients": 2},
        "model": {"name": "mlp", "hidden": [8]},
        "federation": {"rounds": 1, "strategy": {"name": USER_STRATEGY, "scale": 0.5}},
        "observer": {"rounds": "none"},
        "output": {"dir": str(tmp_path)},
    }
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(scenario))
    user_class = import_module(USER_STRATEGY.split(":")[0]).ScaledFedAvg  # as fedsim imports it
    user_class.calls = 0
    code, out, err = run_cli("run", path, "--run-dir", tmp_path / "run")
    assert code == 0, (out, err)
    assert user_class.calls == 1
    saved = yaml.safe_load((tmp_path / "run" / "scenario.yaml").read_text())
    assert saved["federation"]["strategy"] == {"name": USER_STRATEGY, "scale": 0.5}
