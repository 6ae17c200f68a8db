"""The server cannot replay a client's randomness: it holds only what the messages carry.

The attacker here is the curious server with everything it sent and received: the train
messages (the scenario as sent, seed included) and the recorded observations. It rebuilds a
client's noise the way an audit of the old seeding did -- generators derived from the seed in
the message, by (purpose, round, partition id) -- and subtracts it. With the node's secret
(test-only knowledge: the engine derives it from the scenario seed, never sends it) the same
replay is exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import Context, Message, RecordDict
from rich.console import Console

from fedsim.defenses.noise import GaussianNoise
from fedsim.federation.client import SCENARIO_KEY, ClientSetup, client_setup
from fedsim.core.config import build_scenario
from fedsim.core.defense import LocalTraining
from fedsim.federation.observer import Observation, load_observations
from fedsim.core.results import RunDirectory
from fedsim.pipeline.runner import run_scenario
from fedsim.core.seeding import SECRET_KEY, client_secret, node_secret, public_seed, torch_generator
from fedsim.federation.simulation import InlineGrid, SecretNodes
from fedsim.federation.training import train_locally

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT_SEED = 8_123_456_789_012  # unguessable enough that trying seeds does not find it
NOISE_STD = 0.05


def scenario(tmp_path: Path, defenses: list[dict]) -> dict:
    return {
        "name": "secrets",
        "seed": ROOT_SEED,
        "data": {"dataset": "digits", "partitioner": "iid", "num_clients": 3},
        "model": {"name": "mlp", "hidden": [16]},
        "training": {"batch_size": 16, "lr": 0.1, "local_epochs": 1},
        "federation": {"rounds": 1},
        "observer": {"rounds": "all", "clients": "all"},
        "defenses": defenses,
        "output": {"dir": str(tmp_path / "runs")},
    }


def run_recording(
    tmp_path: Path, name: str, defenses: list[dict], monkeypatch: pytest.MonkeyPatch
) -> tuple[RunDirectory, list[Message]]:
    """Run the scenario inline; return its run directory and every message the server sent."""
    sent: list[Message] = []
    push = InlineGrid.push_messages

    def recording(grid: InlineGrid, messages: list[Message], timeout: float | None = None) -> list[str]:
        messages = list(messages)
        sent.extend(messages)
        return push(grid, messages, timeout)

    monkeypatch.setattr(InlineGrid, "push_messages", recording)
    run = run_scenario(build_scenario(scenario(tmp_path, defenses)), tmp_path / name, Console(quiet=True))
    return run, sent


def scenario_as_sent(sent: list[Message]) -> str:
    texts = {str(m.content["config"][SCENARIO_KEY]) for m in sent if m.metadata.message_type == "train"}
    assert len(texts) == 1
    return texts.pop()


def replay_training(
    setup: ClientSetup, observation: Observation, batches: torch.Generator
) -> dict[str, torch.Tensor]:
    """The client's update before update-time defenses, had it drawn its batches from `batches`."""
    model = setup.new_model()
    model.load_state_dict(observation.global_state)
    train, _ = setup.data.client(observation.client)
    hp = observation.hyperparams
    training = LocalTraining(len(train), hp.batch_size, hp.local_epochs, None, 1, observation.server_round, 0)
    defenses = setup.train_defenses
    train_locally(model, train, hp, training, batches, defenses, [{} for _ in defenses])
    for defense in defenses:
        model = defense.unwrap(model)
    local = model.state_dict()
    return {k: v.detach() - observation.global_state[k] for k, v in local.items() if v.is_floating_point()}


def noise(update: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The Gaussian noise the update defense draws from `generator`, tensor by tensor."""
    return GaussianNoise(GaussianNoise.Params(std=NOISE_STD)).transform(
        {k: torch.zeros_like(v) for k, v in update.items()}, generator
    )


def relative_error(estimate: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> float:
    difference = torch.cat([(estimate[k] - truth[k]).flatten() for k in truth])
    return float(difference.norm() / torch.cat([t.flatten() for t in truth.values()]).norm())


def test_server_cannot_cancel_update_noise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, sent = run_recording(tmp_path, "a", [{"name": "gaussian_noise", "std": NOISE_STD}], monkeypatch)
    text = scenario_as_sent(sent)
    visible = int(yaml.safe_load(text)["seed"])
    assert visible == public_seed(ROOT_SEED) != ROOT_SEED
    secrets = [client_secret(ROOT_SEED, pid) for pid in range(3)]
    assert len(set(secrets)) == 3  # every client its own secret
    for message in sent:  # neither the scenario seed nor a secret travels
        values = [str(v) for record in message.content.config_records.values() for v in record.values()]
        assert not any(str(s) in v for s in [ROOT_SEED, *secrets] for v in values)

    setup = client_setup(text)  # the attacker builds exactly what a client builds
    observations = load_observations(run.root)
    assert len(observations) == 3
    for observation in observations:
        pid, rnd = observation.client, observation.server_round
        secret = client_secret(ROOT_SEED, pid)
        clean = replay_training(setup, observation, torch_generator(secret, "batches", rnd))

        # test-only knowledge: with the node's secret the noise is rebuilt exactly
        observed = observation.update
        rebuilt = noise(clean, torch_generator(secret, "update-defense", rnd))
        assert relative_error({k: observed[k] - n for k, n in rebuilt.items()}, clean) < 1e-4

        # the attacker: every derivation from the seed the message shows
        guesses = [
            torch_generator(visible, "update-defense", rnd, pid),  # the audited scheme
            torch_generator(visible, "update-defense", rnd),
            torch_generator(client_secret(visible, pid), "update-defense", rnd),
        ]
        for guess in guesses:
            rebuilt = noise(clean, guess)
            assert relative_error({k: observed[k] - n for k, n in rebuilt.items()}, clean) > 0.5


def test_server_cannot_replay_dp_sgd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DP-SGD's noise and Poisson batches come from the node's secret: replaying local
    training from the message's seed misses the update; from the secret it hits it."""
    dp_sgd = [{"name": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0}]
    run, sent = run_recording(tmp_path, "a", dp_sgd, monkeypatch)
    text = scenario_as_sent(sent)
    visible = int(yaml.safe_load(text)["seed"])
    setup = client_setup(text)
    for observation in load_observations(run.root):
        pid, rnd = observation.client, observation.server_round
        observed = observation.update
        secret = client_secret(ROOT_SEED, pid)
        truth = replay_training(setup, observation, torch_generator(secret, "batches", rnd))
        assert relative_error(truth, observed) < 1e-4
        for guess in (torch_generator(visible, "batches", rnd, pid), torch_generator(visible, "batches", rnd)):
            assert relative_error(replay_training(setup, observation, guess), observed) > 0.5


def test_same_scenario_same_observations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    defenses = [{"name": "gaussian_noise", "std": NOISE_STD}]
    first = load_observations(run_recording(tmp_path, "a", defenses, monkeypatch)[0].root)
    second = load_observations(run_recording(tmp_path, "b", defenses, monkeypatch)[0].root)
    assert [(o.server_round, o.client) for o in first] == [(o.server_round, o.client) for o in second]
    for one, other in zip(first, second, strict=True):
        assert all(torch.equal(one.client_state[k], other.client_state[k]) for k in one.client_state)


def test_node_secret_from_node_config_else_os_entropy_kept_in_state() -> None:
    """Under `flwr run` without `fedsim-secret`, each node draws its own secret once."""
    given = Context(run_id=1, node_id=1, node_config={SECRET_KEY: 42}, state=RecordDict(), run_config={})
    assert node_secret(given) == 42
    nodes = [Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in (1, 2)]
    drawn = [node_secret(context) for context in nodes]
    assert drawn[0] != drawn[1]
    assert [node_secret(context) for context in nodes] == drawn


def test_secret_seed_roots_the_secrets_and_never_travels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With `simulation.secret_seed`, even an attacker who guesses the scenario seed derives no
    secret from it: the nodes use the secret seed, and no message carries it."""
    secret_seed = 987654321
    seen: list[int] = []
    call = SecretNodes.__call__

    def recording(nodes: SecretNodes, message: Message, context: Context) -> Message:
        reply = call(nodes, message, context)
        seen.append(int(context.node_config[SECRET_KEY]))
        return reply

    monkeypatch.setattr(SecretNodes, "__call__", recording)
    raw = scenario(tmp_path, [{"name": "gaussian_noise", "std": 0.01}])
    raw["simulation"] = {"secret_seed": secret_seed}
    sent: list[Message] = []
    push = InlineGrid.push_messages

    def pushing(grid: InlineGrid, messages: list[Message], timeout: float | None = None) -> list[str]:
        sent.extend(messages := list(messages))
        return push(grid, messages, timeout)

    monkeypatch.setattr(InlineGrid, "push_messages", pushing)
    run_scenario(build_scenario(raw), tmp_path / "secret", Console(quiet=True))

    assert set(seen) == {client_secret(secret_seed, pid) for pid in range(3)}
    assert not set(seen) & {client_secret(ROOT_SEED, pid) for pid in range(3)}
    as_sent = yaml.safe_load(scenario_as_sent(sent))
    assert as_sent["simulation"]["secret_seed"] is None and as_sent["seed"] == public_seed(ROOT_SEED)
