"""Under client-side DP a train reply carries nothing data-dependent the epsilon does not
cover: no train-loss, no defense statistic (mid_kl), no true example count; the opt-in
`training.clear_text_metrics` brings them back and the privacy record says so."""

from __future__ import annotations

from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedsim.defenses.diff2 import MESSAGE_TYPE, RELEASE_KEY, DpGd
from fedsim.federation import client
from fedsim.core import privacy
from fedsim.core.config import build_scenario
from fedsim.core.defense import build_defenses
from fedsim.federation.server import train_config
from fedsim.federation.simulation import InlineGrid

LEAKS = ("train-loss", "mid_kl")


@pytest.fixture(autouse=True)
def task_identity() -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def scenario(clear_text: bool, defenses: list[Any], strategy: str = "fedavg") -> Any:
    return build_scenario(
        {
            "seed": 3,
            # Dirichlet partitions: clients of different sizes
            "data": {"dataset": "digits", "num_clients": 3, "partitioner": {"name": "dirichlet", "alpha": 0.3}},
            "model": {"name": "mlp", "hidden": [8]},
            "training": {"local_steps": 2, "clear_text_metrics": clear_text},
            "federation": {"strategy": strategy},
            "defenses": defenses,
        }
    )


def train_replies(clear_text: bool, defenses: list[Any], strategy: str = "fedavg") -> list[dict[str, Any]]:
    """Every client's train-reply metrics for round 1, through the real ClientApp."""
    s = scenario(clear_text, defenses, strategy)
    private_gd = strategy in ("dp_gd", "diff2")
    grid = InlineGrid(client.app, s.data.num_clients)
    model = client.client_setup(s.to_yaml()).new_model()
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "config": ConfigRecord(
                {**train_config(s), "server-round": 1, **({RELEASE_KEY: "gradient"} if private_gd else {})}
            ),
        }
    )
    kind = MESSAGE_TYPE if private_gd else "train"
    messages = [Message(content, dst_node_id=node, message_type=kind) for node in grid.get_node_ids()]
    return [dict(r.content["metrics"]) for r in grid.send_and_receive(messages)]


DP_AND_MID = [{"name": "dp_sgd", "noise_multiplier": 1.0}, {"name": "mid"}]


def test_dp_sgd_reply_holds_only_the_epsilon_and_a_constant_weight() -> None:
    s = scenario(False, DP_AND_MID)
    sizes = {len(client.client_setup(s.to_yaml()).data.client(pid)[0]) for pid in range(3)}
    assert len(sizes) > 1  # the clients really differ in size
    replies = train_replies(False, DP_AND_MID)
    for metrics in replies:
        assert not set(LEAKS) & set(metrics)
        assert metrics["epsilon"] > 0
    assert {m["num-examples"] for m in replies} == {1}


def test_clear_text_metrics_are_back_and_named_as_not_covered() -> None:
    replies = train_replies(True, DP_AND_MID)
    for metrics in replies:
        assert set(LEAKS) <= set(metrics)
    assert len({m["num-examples"] for m in replies}) > 1
    defenses = build_defenses(scenario(True, DP_AND_MID).defenses)
    (claim,) = privacy.claims(["dp_sgd", "mid"], defenses, ("fedavg", None), clear_text_metrics=True)
    assert all(name in claim.unit.not_covered for name in ("train-loss", "mid_kl", "num-examples"))
    (plain,) = privacy.claims(["dp_sgd", "mid"], defenses, ("fedavg", None))
    assert "train-loss" not in plain.unit.not_covered


def test_local_dp_drops_the_clear_metrics_too() -> None:
    replies = train_replies(False, [{"name": "local_dp", "epsilon": 5.0}])
    for metrics in replies:
        assert not set(LEAKS) & set(metrics) and metrics["num-examples"] == 1
        assert metrics["local_dp_epsilon"] > 0


def test_units_of_the_client_side_mechanisms() -> None:
    dp_sgd, local_dp = build_defenses(
        scenario(False, [{"name": "dp_sgd", "accountant": "prv", "delta": 1e-6}, {"name": "local_dp"}]).defenses
    )
    assert dp_sgd.privacy_unit().label() == "example-level, add/remove, delta=1e-06 (prv)"
    assert (local_dp.privacy_unit().level, local_dp.privacy_unit().relation) == ("client", "replace-one")
    assert local_dp.privacy_unit().metric == "local_dp_epsilon"
    strategy = DpGd.build(DpGd.Params(delta=1e-4))
    assert strategy.privacy_unit().label() == "example-level, replace-one, delta=0.0001 (rdp)"


@pytest.mark.parametrize("strategy", ["dp_gd", "diff2"])
def test_private_gradient_descent_sends_no_example_count(strategy: str) -> None:
    replies = train_replies(False, [], strategy)
    assert all(set(m) == {"num-examples", "partition-id", "epsilon"} for m in replies)
    assert {m["num-examples"] for m in replies} == {1}
    assert len({m["num-examples"] for m in train_replies(True, [], strategy)}) > 1


def test_under_client_side_dp_attacks_size_the_batch_from_the_plan_not_the_placeholder() -> None:
    """The reply's `num-examples` is 1 under DP; the attack searches for the planned batch."""
    import torch

    from fedsim.data.datasets import federated_data
    from fedsim.federation.observer import Observation
    from fedsim.federation.training import LocalHyperParams
    from fedsim.models import federated_model
    from fedsim.pipeline.runner import gradient_target

    for defenses, expected in (([{"name": "dp_sgd", "noise_multiplier": 1.0}], 4 * 3), ([], 1)):
        sc = build_scenario({"training": {"batch_size": 4, "local_steps": 3}, "defenses": defenses})
        data = federated_data(sc.data, sc.public().seed)
        state = federated_model(sc, data.input_shape, data.num_classes).state_dict()
        hp = LocalHyperParams(lr=0.1, batch_size=4, local_epochs=1, local_steps=3, optimizer="sgd",
                              momentum=0.0, weight_decay=0.0)
        seen = Observation(1, 0, state, {k: v + torch.ones_like(v) for k, v in state.items()}, 1, hp, 3)
        assert gradient_target(seen, sc, data).num_examples == expected
