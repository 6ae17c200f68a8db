"""DIFF2 and DP-GD: the server's estimator rule, the client's clipped noised release and the
epsilon, each checked against a computation by hand or an independent accountant."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from fedsim.defenses.diff2 import (
    MESSAGE_TYPE,
    PREVIOUS_KEY,
    RELEASE_KEY,
    PrivateGradientDescent,
    private_release,
    sensitivity,
)
from fedsim.federation import client
from fedsim.core.config import build_scenario
from fedsim.data.datasets import TensorData
from fedsim.core.results import RunDirectory
from fedsim.pipeline.runner import run_scenario
from fedsim.federation.simulation import InlineGrid

DELTA = 1e-5


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Messages are created as the server would (fedsim's inline engine sets the same)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def reply(values: list[float], examples: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.array(values, dtype=np.float64))}),
            "metrics": MetricRecord({"num-examples": examples}),
        }
    )
    return Message(content, dst_node_id=1, message_type=MESSAGE_TYPE)


def weights(record: ArrayRecord) -> list[float]:
    return record["w"].numpy().tolist()


def test_estimator_update_rule_by_hand() -> None:
    """lr 0.5, refresh every 2 rounds; two clients with 1 and 3 examples.

    round 1 (gradient):   v1 = (1*[1, 0] + 3*[0, 3]) / 4 = [0.25, 2.25];  x2 = [1, 2] - 0.5 v1 = [0.875, 0.875]
    round 2 (difference): v2 = v1 + (1*[2, 2] + 3*[-2, 2]) / 4 = v1 + [-1, 2] = [-0.75, 4.25];
                          x3 = x2 - 0.5 v2 = [1.25, -1.25]
    round 3 (gradient):   v3 = (1*[4, 4] + 3*[0, 0]) / 4 = [1, 1];  x4 = x3 - 0.5 v3 = [0.75, -1.75]
    """
    strategy = PrivateGradientDescent(lr=0.5, refresh_every=2, delta=1e-5)
    grid = InlineGrid(client.app, 2)
    x1 = ArrayRecord({"w": Array(np.array([1.0, 2.0]))})

    sent = list(strategy.configure_train(1, x1, ConfigRecord(), grid))
    assert [m.metadata.message_type for m in sent] == [MESSAGE_TYPE] * 2
    assert sent[0].content["config"][RELEASE_KEY] == "gradient" and PREVIOUS_KEY not in sent[0].content
    x2, _ = strategy.aggregate_train(1, [reply([1, 0], 1), reply([0, 3], 3)])
    assert weights(x2) == pytest.approx([0.875, 0.875])

    sent = list(strategy.configure_train(2, x2, ConfigRecord(), grid))
    assert sent[0].content["config"][RELEASE_KEY] == "difference"
    assert weights(sent[0].content[PREVIOUS_KEY]) == [1.0, 2.0]  # clients difference x2 against x1
    x3, _ = strategy.aggregate_train(2, [reply([2, 2], 1), reply([-2, 2], 3)])
    assert weights(x3) == pytest.approx([1.25, -1.25])

    sent = list(strategy.configure_train(3, x3, ConfigRecord(), grid))
    assert sent[0].content["config"][RELEASE_KEY] == "gradient"
    x4, _ = strategy.aggregate_train(3, [reply([4, 4], 1), reply([0, 0], 3)])
    assert weights(x4) == pytest.approx([0.75, -1.75])


def hand_gradient(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: int) -> torch.Tensor:
    """d CE(softmax(Wx + b), y) / d(W, b) = ((p - e_y) x^T, p - e_y), flattened as W then b."""
    p = torch.softmax(w @ x + b, dim=0)
    residual = p - torch.nn.functional.one_hot(torch.tensor(y), 2).double()
    return torch.cat([torch.outer(residual, x).flatten(), residual])


def test_release_is_the_clipped_noised_mean_by_hand() -> None:
    """A linear softmax classifier on three examples: per-example gradients in closed form,
    clipped to norm C, summed, plus N(0, (sigma 2C)^2) from the same generator, over n."""
    torch.set_default_dtype(torch.float64)
    try:
        model = nn.Linear(2, 2)
        data = TensorData(torch.tensor([[1.0, 2.0], [-1.0, 0.5], [3.0, -2.0]]), torch.tensor([0, 1, 1]), 2)
        now = {"weight": torch.tensor([[0.5, -0.2], [0.1, 0.3]]), "bias": torch.tensor([0.0, 0.1])}
        before = {"weight": torch.tensor([[0.4, 0.0], [0.2, 0.3]]), "bias": torch.tensor([0.1, 0.0])}
        bound, sigma, n = 0.3, 2.0, 3

        def by_hand(previous: dict[str, torch.Tensor] | None, seed: int) -> torch.Tensor:
            total = torch.zeros(6)
            for x, y in zip(data.x, data.y.tolist(), strict=True):
                g = hand_gradient(now["weight"], now["bias"], x, y)
                if previous is not None:
                    g = g - hand_gradient(previous["weight"], previous["bias"], x, y)
                total += g * min(1.0, bound / float(g.norm()))
            noise = torch.normal(0.0, sigma * 2 * bound, size=(6,), generator=torch.Generator().manual_seed(seed))
            return (total + noise) / n

        for previous in (None, before):
            got = private_release(model, data, now, previous, bound, sigma, torch.Generator().manual_seed(7), 2)
            assert torch.allclose(got, by_hand(previous, 7), atol=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


def test_noise_std_over_the_accounted_sensitivity_is_the_noise_multiplier() -> None:
    """The release is accounted replace-one (n fixed): a swapped example moves the clipped sum
    by 2C, so the noise (release minus its noise-free value, times n) has std sigma * 2C."""
    torch.manual_seed(0)
    model = nn.Linear(50, 40)
    data = TensorData(torch.randn(5, 50), torch.randint(0, 40, (5,)), 40)
    now = {k: v.detach() for k, v in model.named_parameters()}
    bound, sigma = 0.3, 1.5
    noisy = private_release(model, data, now, None, bound, sigma, torch.Generator().manual_seed(1), 8)
    clean = private_release(model, data, now, None, bound, 0.0, torch.Generator().manual_seed(1), 8)
    assert sensitivity(bound) == 2 * bound
    std = float(((noisy - clean) * len(data)).std())
    assert std / sensitivity(bound) == pytest.approx(sigma, rel=0.05)


def independent_epsilon(releases: list[tuple[float, int]], delta: float) -> float:
    """(epsilon, delta) of Gaussian releases [(noise multiplier, count)], from scratch.

    Renyi DP of the Gaussian mechanism: alpha / (2 sigma^2) per release, adding up; to
    (epsilon, delta) by Balle et al. 2020 (Thm 21): min over alpha of
    rdp + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1), on a fine grid.
    """
    alphas = np.linspace(1.01, 200.0, 200_000)
    rdp = alphas * sum(count / (2 * sigma**2) for sigma, count in releases)
    return float(np.min(rdp + np.log((alphas - 1) / alphas) - (np.log(delta) + np.log(alphas)) / (alphas - 1)))


def train(tmp_path: Path, name: str, strategy: dict, rounds: int, engine: str = "inline") -> RunDirectory:
    raw = {
        "name": "diff2",
        "seed": 2,
        "data": {"dataset": "digits", "num_clients": 3},
        "model": {"name": "mlp", "hidden": [8]},
        "federation": {"strategy": strategy, "rounds": rounds},
        "simulation": {"engine": engine},
        "observer": {"rounds": "none"},
        "output": {"dir": str(tmp_path), "save_model": False},
    }
    return run_scenario(build_scenario(raw), tmp_path / name)


def test_epsilon_per_round_equals_an_independent_accountant(tmp_path: Path) -> None:
    """DIFF2, sigma 2, T 3, refresh share 0.5 over R = 6 rounds: 2 gradient releases at
    sigma_g = 2 sqrt(2 / 3) and 4 difference releases at sigma_d = 2 sqrt(4 / 3); after all
    rounds exactly DP-GD's epsilon at sigma 2."""
    rounds, sigma = 6, 2.0
    diff2 = train(tmp_path, "diff2", {"name": "diff2", "noise_multiplier": sigma, "refresh_every": 3}, rounds)
    dp_gd = train(tmp_path, "dp_gd", {"name": "dp_gd", "noise_multiplier": sigma}, rounds)
    sigma_g, sigma_d = sigma * math.sqrt(2 / (0.5 * rounds)), sigma * math.sqrt(4 / (0.5 * rounds))
    for record in list(diff2.metrics())[1:]:
        r = record["round"]
        gradients = (r + 2) // 3  # rounds 1 and 4 refresh
        expected = independent_epsilon([(sigma_g, gradients), (sigma_d, r - gradients)], DELTA)
        assert record["max_client_epsilon"] == pytest.approx(expected, rel=1e-3)
        assert {c["epsilon"] for c in record["clients"]} == {record["max_client_epsilon"]}
    for record in list(dp_gd.metrics())[1:]:
        expected = independent_epsilon([(sigma, record["round"])], DELTA)
        assert record["max_client_epsilon"] == pytest.approx(expected, rel=1e-3)
    final = list(diff2.metrics())[-1]["max_client_epsilon"]
    assert final == pytest.approx(list(dp_gd.metrics())[-1]["max_client_epsilon"], rel=1e-9)


def test_without_noise_or_clipping_diff2_is_gradient_descent(tmp_path: Path) -> None:
    """v_t = g(x_1) + sum of (g(x_s) - g(x_{s-1})) telescopes to g(x_t): with negligible noise
    and bounds that never clip, DIFF2 follows DP-GD's (plain GD's) trajectory."""
    exact = {"noise_multiplier": 1e-9, "clip": 1e6, "lr": 2.0}
    diff2 = train(tmp_path, "diff2", {"name": "diff2", "refresh_every": 4, "clip_diff": 1e6, **exact}, 4)
    dp_gd = train(tmp_path, "dp_gd", {"name": "dp_gd", **exact}, 4)
    losses = [[r["test_loss"] for r in run.metrics()] for run in (diff2, dp_gd)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert losses[1][-1] < losses[1][0] - 0.05  # and it did move


def test_target_epsilon_is_spent_after_all_rounds(tmp_path: Path) -> None:
    run = train(tmp_path, "target", {"name": "diff2", "target_epsilon": 3.0, "refresh_every": 2}, 4)
    assert list(run.metrics())[-1]["max_client_epsilon"] == pytest.approx(3.0, abs=0.03)


def test_diff2_runs_from_the_cli_and_learns(tmp_path: Path) -> None:
    code, out, _ = run_cli(
        "run", "scenarios/diff2_digits.yaml", "--set", "federation.rounds=16", "--set", f"output.dir={tmp_path}"
    )
    assert code == 0, out
    run = RunDirectory(next(tmp_path.glob("diff2_digits/*")))
    rounds = list(run.metrics())
    assert rounds[-1]["test_accuracy"] > rounds[0]["test_accuracy"] + 0.2
    assert rounds[-1]["max_client_epsilon"] > rounds[1]["max_client_epsilon"] > 0


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ({"name": "diff2", "noise_multiplier": 1.0, "target_epsilon": 2.0}, "exactly one of noise_multiplier"),
        ({"name": "dp_gd", "refresh_every": 3}, "for strategy 'dp_gd'"),
        ({"name": "diff2", "refresh_share": 1.0}, "refresh_share"),
    ],
)
def test_bad_parameters_exit_2(tmp_path: Path, strategy: dict, message: str) -> None:
    overrides = [f"federation.strategy.{k}={v}" for k, v in strategy.items()]
    args = [a for o in overrides for a in ("--set", o)]
    code, _, err = run_cli("validate", "scenarios/diff2_digits.yaml", *args)
    assert code == 2 and message in err


@pytest.mark.ray
def test_ray_workers_know_the_diff2_handler(tmp_path: Path) -> None:
    strategy = {"name": "diff2", "refresh_every": 2}
    inline = train(tmp_path, "inline", strategy, 3)
    on_ray = train(tmp_path, "ray", strategy, 3, engine="ray")
    assert [r["test_accuracy"] for r in on_ray.metrics()] == [r["test_accuracy"] for r in inline.metrics()]
