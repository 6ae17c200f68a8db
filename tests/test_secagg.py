"""Secure aggregation (Flower's SecAgg+): the server sees only each round's aggregate, and that
aggregate is FedAvg's example-weighted average of the client weights, up to quantisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli

from fedsim.core.config import build_scenario
from fedsim.data.datasets import federated_data
from fedsim.core.errors import UserError
from fedsim.federation.observer import AGGREGATE_CLIENT, Observation, load_observations
from fedsim.core.results import RunDirectory, read_json
from fedsim.pipeline.runner import gradient_target, ground_truth, run_scenario

CLIENTS = 4
MAX_WEIGHT = 500.0
CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 2**22
SECAGG = {
    "name": "secagg_plus",
    "num_shares": 3,
    "reconstruction_threshold": 2,
    "max_weight": MAX_WEIGHT,
    "clipping_range": CLIPPING_RANGE,
    "quantization_range": QUANTIZATION_RANGE,
}


def raw_scenario(tmp_path: Path, **changes: object) -> dict:
    raw: dict = {
        "name": "secagg",
        "seed": 5,
        "data": {"dataset": "digits", "num_clients": CLIENTS},
        "model": {"name": "mlp", "hidden": [16]},
        "training": {"batch_size": 2, "local_steps": 1, "lr": 0.5},
        "federation": {"rounds": 2},
        "observer": {"rounds": "all", "clients": "all"},
        "defenses": [SECAGG],
        "attacks": [{"name": "dlg", "iterations": 1, "evaluations_per_step": 2}],
        "output": {"dir": str(tmp_path / "runs"), "save_model": False},
    }
    return {**raw, **changes}  # whole sections replaced


def run(tmp_path: Path, name: str, **changes: object) -> RunDirectory:
    return run_scenario(build_scenario(raw_scenario(tmp_path, **changes)), tmp_path / name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunDirectory, RunDirectory]:
    """The same federation with and without SecAgg+ (same seed, so the same client updates)."""
    tmp_path = tmp_path_factory.mktemp("secagg")
    return run(tmp_path, "secure"), run(tmp_path, "plain", defenses=[], attacks=[])


def weighted_average(observations: list[Observation]) -> dict[str, torch.Tensor]:
    total = sum(o.num_examples for o in observations)
    return {
        name: sum(o.client_state[name] * o.num_examples for o in observations) / total
        for name in observations[0].client_state
    }


def test_observer_sees_only_the_aggregate(runs: tuple[RunDirectory, RunDirectory]) -> None:
    secure, _ = runs
    assert not list(secure.observations_dir.glob("round_*/client_*.safetensors"))
    assert not list(secure.ground_truth_dir.glob("round_*/client_*.json"))
    observations = load_observations(secure.root)
    assert [(o.server_round, o.client) for o in observations] == [(1, AGGREGATE_CLIENT), (2, AGGREGATE_CLIENT)]
    assert all(o.aggregate_of == tuple(range(CLIENTS)) for o in observations)
    for record in list(secure.metrics())[1:]:  # scalar metrics travel in the clear in SecAgg+
        assert [c["partition-id"] for c in record["clients"]] == list(range(CLIENTS))


def test_aggregate_is_the_plain_weighted_average(runs: tuple[RunDirectory, RunDirectory]) -> None:
    """Round 1 starts from the same global model, so the clients' updates are the same with and
    without SecAgg+; the plain run shows them, the secure run only their aggregate."""
    secure, plain = runs
    clients = [o for o in load_observations(plain.root) if o.server_round == 1]
    aggregate = next(o for o in load_observations(secure.root) if o.server_round == 1)
    assert torch.equal(aggregate.global_state["net.1.weight"], clients[0].global_state["net.1.weight"])
    assert aggregate.num_examples == sum(c.num_examples for c in clients)

    # Each client's r_k * w_k (r_k = n_k / max_weight) is rounded to a grid of step 2c/Q, and
    # r_k itself to a grid of step 1/Q; the errors add up over the K clients and are divided by
    # sum_k r_k. The aggregate is then stored as float32 (1e-7 at these magnitudes).
    expected = weighted_average(clients)
    spread = max(float((c.client_state[k] - expected[k]).abs().max()) for c in clients for k in expected)
    step = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE
    shares = sum(c.num_examples / MAX_WEIGHT for c in clients)
    bound = CLIENTS * (step + spread / QUANTIZATION_RANGE) / shares + 1e-7
    error = max(float((aggregate.client_state[k] - expected[k]).abs().max()) for k in expected)
    assert error <= bound
    for client in clients:  # the aggregate is no client's update
        distance = max(float((aggregate.client_state[k] - client.client_state[k]).abs().max()) for k in expected)
        assert distance > 100 * bound


def test_attacks_target_the_aggregate(runs: tuple[RunDirectory, RunDirectory]) -> None:
    secure, _ = runs
    scenario = build_scenario(raw_scenario(secure.root.parent))
    data = federated_data(scenario.data, scenario.public().seed)  # the clients' partitions
    observation = load_observations(secure.root)[0]
    target = gradient_target(observation, scenario, data)
    assert (target.client, target.batch_size) == (AGGREGATE_CLIENT, CLIENTS * 2)
    assert target.num_examples == observation.num_examples
    truth_x, truth_y = ground_truth(secure, observation, data)
    assert len(truth_x) == len(truth_y) == CLIENTS * 2  # every client's one batch of 2
    record = read_json(secure.attacks_dir / "dlg" / "round_0001_aggregate.json")
    assert record["client"] == AGGREGATE_CLIENT and "psnr" in record


def test_selecting_a_client_of_an_aggregate_only_run_says_why(runs: tuple[RunDirectory, RunDirectory]) -> None:
    from fedsim.pipeline.runner import select_observations

    secure, _ = runs
    with pytest.raises(UserError, match="recorded: no single client \\(only aggregates"):
        select_observations(load_observations(secure.root), secure, None, [0])


def test_same_seed_same_aggregate(tmp_path: Path, runs: tuple[RunDirectory, RunDirectory]) -> None:
    """Flower's quantiser rounds stochastically; fedsim seeds it per client and round."""
    again = run(tmp_path, "again", attacks=[])
    first = load_observations(runs[0].root)[1].client_state
    second = load_observations(again.root)[1].client_state
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.ray
def test_ray_engine_gives_the_inline_aggregate(tmp_path: Path, runs: tuple[RunDirectory, RunDirectory]) -> None:
    on_ray = run(tmp_path, "ray", simulation={"engine": "ray"}, attacks=[], federation={"rounds": 1})
    inline = load_observations(runs[0].root)[0].client_state
    ray = load_observations(on_ray.root)[0].client_state
    assert all(torch.equal(inline[k], ray[k]) for k in inline)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"federation": {"rounds": 1, "clients_per_round": 1}}, "at least 2 clients"),
        ({"defenses": [SECAGG, "central_dp_fixed"]}, "cannot be combined with central_dp_fixed"),
        ({"federation": {"rounds": 1, "strategy": "dp_gd"}}, "strategy 'dp_gd' does not aggregate"),
        ({"defenses": [{**SECAGG, "reconstruction_threshold": 5}]}, "exceeds the 4 clients"),
        ({"defenses": [{**SECAGG, "reconstruction_threshold": 3}]}, "must be less than `num_shares`"),
        ({"defenses": [{**SECAGG, "clipping_range": 0.001}]}, "secagg_plus.clipping_range=0.001"),
        ({"defenses": [{**SECAGG, "max_weight": 10}]}, "secagg_plus.max_weight=10 is below"),
    ],
)
def test_bad_settings_are_user_errors(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        run(tmp_path, "bad", attacks=[], **changes)


def test_cli_exits_2_on_a_bad_setting(tmp_path: Path) -> None:
    code, _, err = run_cli(
        "run", "scenarios/secagg_dlg.yaml", "--set", "federation.clients_per_round=1",
        "--set", f"output.dir={tmp_path}",
    )
    assert code == 2
    assert err.strip().splitlines() == [
        "error: scenario: defenses.secagg_plus needs at least 2 clients per round (federation.clients_per_round)"
    ]
