"""fedsim's Flower ClientApp: local training with train- and update-time defenses.

Every train message carries the resolved scenario (`fedsim.scenario`, YAML text) next to the
hyper-parameters, so a client needs nothing but the message: it runs the same under fedsim's
inline engine, Flower's Ray simulation, a Ray cluster and `flwr run`. The client's partition
is `node_config["partition-id"]`, as Flower's simulation assigns it. The scenario a message
carries holds only the public seed; every client-side random draw comes from the node's
secret instead (`fedsim-secret` in the node config, see `fedsim.core.seeding`).

Plugins extend it at two seams: a defense's Flower mods (`Defense.transport_mod`, outermost,
then the scenario's `Defense.client_mod`s) wrap the train handler, and each registered
`fedsim.core.registry.CLIENT_ACTIONS` entry handles messages of type `train.<name>`
(`fedsim.federation.client_call`).

Replies carry one simulation-only record, `fedsim.truth` (the indices of the examples the
client trained on, in order). The server's observer strips it from every reply before the
strategy or any attacker sees the reply, and stores it only for scoring attacks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod.utils import make_ffn
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from fedsim.core.defense import LocalTraining
from fedsim.core.registry import CLIENT_ACTIONS, DEFENSES, load_plugins
from fedsim.core.seeding import derive_seed, node_secret, numpy_global_seed, torch_generator
from fedsim.federation.client_call import (
    ClientAction,
    ClientCall,
    ClientSetup,
    client_setup,
    dp_reply_metrics,
)
from fedsim.federation.faults import fault_mod
from fedsim.federation.protocol import SCENARIO_KEY, TRUTH_KEY
from fedsim.federation.training import LocalHyperParams, LocalResult, evaluate, train_locally

app = ClientApp()
_installed_actions: set[str] = set()  # CLIENT_ACTIONS names given a handler on `app`


@app.lifespan()
def plugins_loaded(context: Context) -> Iterator[None]:
    """Load the plugins before a message is routed and give each registered client action its
    handler (`train.<name>`), also in a fresh Ray worker or under `flwr run`."""
    load_plugins()
    for name, action in CLIENT_ACTIONS:
        if name not in _installed_actions:
            app.train(name)(action_handler(action))
            _installed_actions.add(name)
    yield


def action_handler(action: ClientAction) -> ClientAppCallable:
    """The Flower handler that runs `action` on a message's content and replies with its result."""

    def handle(message: Message, context: Context) -> Message:
        config = message.content["config"]
        call = ClientCall(
            setup=client_setup(str(config[SCENARIO_KEY])),
            partition_id=partition_id(context),
            secret=node_secret(context),
            server_round=int(config["server-round"]),
            config=config,
            state=context.state,
        )
        return Message(action(message.content, call), reply_to=message)

    return handle


def partition_id(context: Context) -> int:
    return int(context.node_config["partition-id"])


def defense_state(context: Context, index: int) -> dict[str, Any]:
    """A train-time defense's per-client state, persisted in Flower's Context.state."""
    record = context.state.get(f"fedsim.defense.{index}")
    return json.loads(record["json"]) if record is not None else {}


def store_defense_state(context: Context, index: int, state: dict[str, Any]) -> None:
    context.state[f"fedsim.defense.{index}"] = ConfigRecord({"json": json.dumps(state)})


@app.query()
def identify(message: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (node ids are random per run)."""
    identity = ConfigRecord(
        {
            "partition-id": partition_id(context),
            "num-partitions": int(context.node_config["num-partitions"]),
        }
    )
    return Message(RecordDict({"identity": identity}), reply_to=message)


def transport_mods(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run every registered defense's `transport_mod` (SecAgg+) around everything else; each
    passes the messages it does not recognise through, so none acts unless its server asks."""
    mods = [mod for _, defense in DEFENSES if (mod := defense.transport_mod()) is not None]
    return make_ffn(call_next, mods)(message, context)


def defense_mods(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the Flower client mods of the scenario's defenses around training (none: just train).

    Flower's mods draw their noise from numpy's global generator: it is seeded from the node's
    secret and the round for the call and restored afterwards, so runs repeat, the server
    cannot replay the noise, and its own stream (same process under the inline engine) is
    untouched.
    """
    config = message.content["config"]
    setup = client_setup(str(config[SCENARIO_KEY]))
    if not setup.client_mods:
        return call_next(message, context)
    server_round = int(config["server-round"])
    with numpy_global_seed(node_secret(context), "client-mods", server_round):
        return make_ffn(call_next, setup.client_mods)(message, context)


# faults outermost (a failing client fails whole); then transport mods: SecAgg+ masks the reply
# after every defense's mod has acted on it.
@app.train(mods=[fault_mod, transport_mods, defense_mods])
def train(message: Message, context: Context) -> Message:
    config = message.content["config"]
    setup = client_setup(str(config[SCENARIO_KEY]))
    pid, secret = partition_id(context), node_secret(context)
    server_round = int(config["server-round"])
    train_data, _ = setup.data.client(pid)

    model = setup.new_model()
    global_state = message.content["arrays"].to_torch_state_dict()
    model.load_state_dict(global_state)
    hp = LocalHyperParams.from_config(config)
    training = local_training(setup, hp, len(train_data), secret, server_round)
    if setup.data.canaries is not None:  # white-box audits: Dirac gradient canaries for DP-SGD
        training = replace(training, gradient_canaries=setup.data.canaries.gradient_canaries(pid, model))
    states = [defense_state(context, i) for i in range(len(setup.train_defenses))]
    result = train_locally(
        model,
        train_data,
        hp,
        training,
        generator=torch_generator(secret, "batches", server_round),  # secret: see fedsim.core.seeding
        defenses=setup.train_defenses,
        states=states,
        device=setup.device,
    )
    for i, state in enumerate(states):
        store_defense_state(context, i, state)
    for defense in setup.train_defenses:
        model = defense.unwrap(model)

    trained = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return train_reply(message, setup, trained, global_state, result, pid, secret)


def local_training(
    setup: ClientSetup, hp: LocalHyperParams, num_examples: int, secret: int, server_round: int
) -> LocalTraining:
    """What a train-time defense is told about this client's round (also the vectorised engine's)."""
    return LocalTraining(
        num_examples=num_examples,
        batch_size=hp.batch_size,
        local_epochs=hp.local_epochs,
        local_steps=hp.local_steps or None,
        total_rounds=setup.scenario.federation.rounds,
        server_round=server_round,
        seed=derive_seed(secret, "train-defense", server_round),
    )


def train_reply(
    message: Message,
    setup: ClientSetup,
    trained: dict[str, torch.Tensor],
    global_state: dict[str, torch.Tensor],
    result: LocalResult,
    pid: int,
    secret: int,
) -> Message:
    """The reply to a train message once local training is done (also the vectorised engine's):
    `trained` is the local model's state dict, on CPU, in the model's order."""
    scenario, server_round = setup.scenario, int(message.content["config"]["server-round"])
    sent = defended_weights(setup, trained, global_state, secret, server_round)
    metrics = {
        "num-examples": result.num_examples,
        "unit-weight": 1,  # for strategies that weigh clients equally (client-level DP)
        "partition-id": pid,
        "train-loss": result.mean_loss,
        "local-steps": result.steps,
        **result.metrics,
    }
    metrics = dp_reply_metrics(
        metrics, setup.accounted_metrics, scenario.training.clear_text_metrics
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(sent),
            "metrics": MetricRecord(metrics),
            TRUTH_KEY: ConfigRecord({"batches": json.dumps(result.batches)}),
        }
    )
    return Message(content, reply_to=message)


def defended_weights(
    setup: ClientSetup,
    local: dict[str, torch.Tensor],
    global_state: dict[str, torch.Tensor],
    secret: int,
    server_round: int,
) -> dict[str, torch.Tensor]:
    """Global weights plus the update after every update-time defense has transformed it."""
    if not setup.update_defenses:
        return local
    # in the model's own tensor order: the defenses draw their noise tensor by tensor
    update = {k: v - global_state[k] for k, v in local.items() if v.is_floating_point()}
    generator = torch_generator(secret, "update-defense", server_round)
    for defense in setup.update_defenses:
        update = defense.transform(update, generator)
    return {k: global_state[k] + update[k] if k in update else v for k, v in local.items()}


@app.evaluate()
def evaluate_on_validation(message: Message, context: Context) -> Message:
    config = message.content["config"]
    setup = client_setup(str(config[SCENARIO_KEY]))
    _, val_data = setup.data.client(partition_id(context))
    model = setup.new_model()
    model.load_state_dict(message.content["arrays"].to_torch_state_dict())
    result = evaluate(model, val_data, setup.device)
    metrics = {
        "num-examples": result["num-examples"],
        "partition-id": partition_id(context),
        "val-loss": result["loss"],
        "val-accuracy": result["accuracy"],
    }
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)

