"""The noise central DP adds, measured: std z * C_t / m, C_t the norm the round clipped to."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedsim.defenses.central_dp import CentralDpAdaptive, CentralDpAdaptiveClient
from tests.test_defenses import FakeGrid, server_identity  # noqa: F401 (fixture)

D = 200_000  # coordinates: the std is measured to ~0.2 %


def measured_std(strategy, server_round: int = 1) -> tuple[float, float]:
    """(std of the aggregate of three all-zero updates, the norm C_t they were clipped to)."""
    clipped_to = strategy.clipping_norm
    global_arrays = ArrayRecord({"w": torch.zeros(D)})
    messages = strategy.configure_train(server_round, global_arrays, ConfigRecord(), FakeGrid())
    replies = [
        Message(RecordDict({"arrays": ArrayRecord({"w": torch.zeros(D)}),
                            "metrics": MetricRecord({"num-examples": 1, "unit-weight": 1, "norm_bit": 0})}),
                reply_to=message)
        for message in messages
    ]  # fmt: skip
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return float(arrays.to_torch_state_dict()["w"].std()), clipped_to


@pytest.mark.parametrize("defense_cls", [CentralDpAdaptive, CentralDpAdaptiveClient])
def test_adaptive_noise_uses_the_norm_the_updates_were_clipped_to(
    defense_cls: type[CentralDpAdaptive],
    server_identity: None,  # noqa: F811
) -> None:
    np.random.seed(0)
    z, m = 1.0, 3
    defense = defense_cls(defense_cls.Params(noise_multiplier=z, clipped_count_stddev=5.0))
    strategy = defense.wrap(FedAvg(min_train_nodes=3, min_available_nodes=3), m, total_rounds=1)
    std, clipped_to = measured_std(strategy)
    assert strategy.clipping_norm != clipped_to  # the norm moved this round
    assert std / (clipped_to / m) == pytest.approx(strategy.noise_multiplier, rel=0.01)


def test_privacy_unit_is_client_level_zero_out() -> None:
    unit = CentralDpAdaptive(CentralDpAdaptive.Params(noise_multiplier=1.0, delta=1e-4)).privacy_unit()
    assert (unit.level, unit.relation, unit.delta, unit.metric) == ("client", "zero-out", 1e-4, "epsilon")
