"""fedsim's Flower ServerApp: the strategy loop, the observer and per-round metrics.

`serve(grid, scenario, run)` is the whole server. The module-level `app` reads the scenario
path from the run config, for `flwr run` (see pyproject's `[tool.flwr.app]`);
`make_server_app` binds a scenario and run directory in-process for fedsim's own engines.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save

from fedsim.core import privacy
from fedsim.federation.protocol import SCENARIO_KEY
from fedsim.core.config import Scenario, load_scenario
from fedsim.data.datasets import federated_data
from fedsim.core.defense import ServerTimeDefense, build_defenses
from fedsim.models import federated_model
from fedsim.federation.observer import ObservingGrid, RoundFailed
from fedsim.core.malicious import MaliciousServer
from fedsim.core.registry import ATTACKS, STRATEGIES
from fedsim.core.seeding import derive_seed
from fedsim.core.results import (
    DIVERGED,
    FAILED,
    RunDirectory,
    atomic_write_bytes,
    atomic_write_json,
    prepare_run_directory,
)
from fedsim.federation.canary_clients import CanaryClients
from fedsim.federation.sampling import SeededCohorts
from fedsim.core.seeding import numpy_global_seed
from fedsim.federation.training import LocalHyperParams, evaluate

RoundCallback = Callable[[dict[str, Any]], None]


def train_config(scenario: Scenario) -> dict[str, Any]:
    """What the server sends with every train/evaluate message: hyper-parameters + scenario."""
    t = scenario.training
    hp = LocalHyperParams(
        lr=t.lr,
        batch_size=t.batch_size,
        local_epochs=t.local_epochs,
        local_steps=t.local_steps or 0,
        optimizer=t.optimizer,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
    )
    return {**hp.to_config(), SCENARIO_KEY: scenario.to_yaml()}


def initial_model(scenario: Scenario) -> torch.nn.Module:
    """The global model before round 1, seeded by the scenario."""
    data = federated_data(scenario.data, scenario.seed)
    torch.manual_seed(scenario.seed)
    model = federated_model(scenario, data.input_shape, data.num_classes)
    fit_public = getattr(model, "fit_public", None)  # a model with a map fitted on public data
    if fit_public is not None:
        fit_public(data.public.x)
    return model


def craft_malicious(
    model: torch.nn.Module, scenario: Scenario, input_shape: tuple[int, ...], public_x: torch.Tensor, run: RunDirectory
) -> None:
    """Let every malicious-server attack of the scenario craft the first global model in place,
    writing what each did to observations/malicious.json (the observer records the weights)."""
    records = {}
    for spec in scenario.attacks:
        attack = ATTACKS.get(spec.name)
        if issubclass(attack, MaliciousServer):
            crafter = attack(spec.params, seed=derive_seed(scenario.seed, "attack", spec.name))
            records[spec.name] = crafter.craft(model, tuple(input_shape), public_x)
    if records:
        atomic_write_json(run.observations_dir / "malicious.json", {"sent_in_round": 1, "attacks": records})


def serve(grid: Grid, scenario: Scenario, run: RunDirectory, on_round: RoundCallback | None = None) -> None:
    """Run every federated round of `scenario`, writing `run` as it goes.

    The server holds only the public scenario (`Scenario.public()`): its seed is all the
    server and its messages know, so the clients' secrets stay out of its reach.
    """
    scenario = scenario.public()
    data = federated_data(scenario.data, scenario.seed)
    model = initial_model(scenario)
    craft_malicious(model, scenario, data.input_shape, data.test.x, run)
    defenses = build_defenses(scenario.defenses)
    server_defenses = [d for d in defenses if isinstance(d, ServerTimeDefense)]
    for defense in server_defenses:
        grid = defense.transport(grid, scenario)  # below the observer: e.g. secure aggregation
    view = ObservingGrid(grid, scenario, run)

    spec = scenario.federation.strategy
    evaluate_size = scenario.federation.evaluate_clients_per_round
    registered = STRATEGIES.get(spec.name)
    strategy = registered.build(spec.params)
    # Which epsilon is in which unit; every record lists its epsilons with them (`privacy`).
    claimed = privacy.claims(
        [d.name for d in scenario.defenses],
        defenses,
        (spec.name, privacy.strategy_unit(registered, spec.params, strategy)),
        clear_text_metrics=scenario.training.clear_text_metrics,
    )
    canaries = data.canaries if data.canaries is not None and data.canaries.kind == "client" else None
    cohort = scenario.cohort_size + (len(canaries.included) if canaries is not None else 0)
    for defense in server_defenses:
        strategy = defense.wrap(strategy, cohort, scenario.federation.rounds)
    if canaries is not None:  # the auditor's canary clients join every cohort (see canary_clients)
        central_dp = next(d for d in server_defenses if getattr(d, "takes_client_canaries", False))
        names = [name for name, _ in model.named_parameters()]
        strategy = CanaryClients(strategy, canaries, central_dp.current_clipping_norm, names)
    strategy = SeededCohorts(
        strategy, scenario.seed, scenario.data.num_clients, scenario.cohort_size, evaluate_size
    )

    started = time.perf_counter()
    # Per-client privacy metric -> partition id -> its latest value. A client that sits out a
    # round keeps the epsilon of its last round, so `max_client_*` is the worst privacy spent
    # by any client so far (it never decreases), not just by this round's cohort.
    latest_epsilons: dict[str, dict[int, float]] = {}

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        test = evaluate(model, data.test)
        record: dict[str, Any] = {
            "round": server_round,
            "test_accuracy": test["accuracy"],
            "test_loss": test["loss"],
            "elapsed_s": round(time.perf_counter() - started, 3),
            "clients": view.round_client_metrics.get(server_round, []),
            "failures": view.round_failures.get(server_round, {}),
            "client_evaluation": view.round_client_evaluation.get(server_round, []),
        }
        for defense in server_defenses:
            record.update({f"central_{k}": v for k, v in defense.round_metrics(server_round).items()})
        if server_round in view.round_evaluate_failures:
            record["evaluate_failures"] = view.round_evaluate_failures[server_round]
        for client in record["clients"]:
            for key, value in client.items():
                if key.endswith("epsilon"):
                    latest_epsilons.setdefault(key, {})[int(client["partition-id"])] = value
        for key, latest in latest_epsilons.items():
            record[f"max_client_{key}"] = max(latest.values())
        record["privacy"] = privacy.entries(record, claimed)
        run.append_metrics(record)
        if on_round is not None:
            on_round(record)
        return MetricRecord({"accuracy": test["accuracy"], "loss": test["loss"]})

    config = ConfigRecord(train_config(scenario))
    # Flower's central-DP wrappers draw their noise from numpy's global generator.
    with numpy_global_seed(scenario.seed, "server-noise"):
        try:
            result = strategy.start(
                grid=view,
                initial_arrays=ArrayRecord(model.state_dict()),
                num_rounds=scenario.federation.rounds,
                train_config=config,
                evaluate_config=config,
                evaluate_fn=evaluate_global,
                timeout=scenario.federation.round_timeout,
            )
        except RoundFailed as failed:  # the failure policy's verdict, recorded, not a crash
            trained = [r for r in run.metrics() if r["round"] > 0]
            atomic_write_json(
                run.training_path,
                {
                    "status": DIVERGED if failed.diverged else FAILED,
                    "reason": str(failed),
                    "final_test_accuracy": trained[-1]["test_accuracy"] if trained else None,
                    "best_test_accuracy": max(
                        (r["test_accuracy"] for r in trained if r["test_accuracy"] is not None), default=None
                    ),
                    "rounds": len(trained),
                    "wall_time_s": round(time.perf_counter() - started, 3),
                    "finished_at": datetime.now(timezone.utc).isoformat(),
                },
            )
            return
    final = result.arrays.to_torch_state_dict()
    if scenario.output.save_model:
        contiguous = {k: v.contiguous() for k, v in final.items()}
        atomic_write_bytes(run.model_path, save(contiguous))
    trained = [r for r in run.metrics() if r["round"] > 0]  # round 0: the untrained model
    finite = all(t.isfinite().all() for t in final.values() if t.is_floating_point())
    atomic_write_json(
        run.training_path,
        {
            "status": "finished" if finite else DIVERGED,
            "final_test_accuracy": trained[-1]["test_accuracy"],
            "best_test_accuracy": max(
                (r["test_accuracy"] for r in trained if r["test_accuracy"] is not None), default=None
            ),
            "rounds": scenario.federation.rounds,
            "wall_time_s": round(time.perf_counter() - started, 3),
            "finished_at": datetime.now(timezone.utc).isoformat(),
        },
    )


def make_server_app(scenario: Scenario, run: RunDirectory, on_round: RoundCallback | None = None) -> ServerApp:
    """A ServerApp bound to one scenario and run directory (fedsim's own engines)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, scenario, run, on_round)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry for `flwr run .`: run config keys `scenario` (a file) and optional `run-dir`."""
    scenario = load_scenario(Path(str(context.run_config["scenario"])))
    run = prepare_run_directory(scenario, str(context.run_config.get("run-dir", "")) or None)
    if run.needs_training:
        run.reset_training()
        serve(grid, scenario, run)
