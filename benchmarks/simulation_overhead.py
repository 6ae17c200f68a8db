"""Overhead of running local training through fedsim's Flower simulation.

The same work (every client trains one local epoch of an MLP on its digits partition, FedAvg
over 3 rounds) is timed three ways: a plain single-process Python loop, fedsim's inline
engine (Flower ServerApp/ClientApp in one process) and Flower's Ray simulation engine
(start-up included). Prints one table; not a test.

`--dp-sgd` trains every client with DP-SGD (noise 1.0, C 1.0, rdp accountant) in all three:
the plain loop through Opacus (`train_locally` with the defense), the engines as configured.

    python benchmarks/simulation_overhead.py            # 10 and 100 clients
    python benchmarks/simulation_overhead.py --clients 10 --engines inline
    python benchmarks/simulation_overhead.py --clients 100 --engines inline vectorized --dp-sgd
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from fedsim.core.config import Scenario, build_scenario
from fedsim.data.datasets import federated_data
from fedsim.core.defense import LocalTraining
from fedsim.core.device import set_threads
from fedsim.core.results import RunDirectory
from fedsim.core.seeding import torch_generator
from fedsim.federation.client_call import client_setup
from fedsim.federation.server import initial_model
from fedsim.federation.simulation import run_federation
from fedsim.federation.training import LocalHyperParams, train_locally


DP_SGD = {"name": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "accountant": "rdp"}


def scenario_for(clients: int, engine: str, out: Path, dp_sgd: bool = False) -> Scenario:
    return build_scenario(
        {
            "name": "overhead",
            "data": {"num_clients": clients},
            "model": {"name": "mlp", "hidden": [64]},
            "training": {"batch_size": 8, "lr": 0.05},
            "federation": {"rounds": 3},
            "observer": {"rounds": "none"},
            "simulation": {"engine": engine},
            "output": {"dir": str(out), "save_model": False},
            "defenses": [DP_SGD] if dp_sgd else [],
        }
    )


def plain_loop(scenario: Scenario) -> float:
    """The same training as a bare loop: no Flower, no messages, no observer."""
    data = federated_data(scenario.data, scenario.seed)
    t = scenario.training
    hp = LocalHyperParams(t.lr, t.batch_size, t.local_epochs, 0, t.optimizer, t.momentum, t.weight_decay)
    defenses = client_setup(scenario.public().to_yaml()).train_defenses
    client_states: dict[int, list[dict]] = {pid: [{} for _ in defenses] for pid in range(scenario.data.num_clients)}
    started = time.perf_counter()
    global_model = initial_model(scenario)
    for server_round in range(1, scenario.federation.rounds + 1):
        states, weights = [], []
        for pid in range(scenario.data.num_clients):
            model = initial_model(scenario)
            model.load_state_dict(global_model.state_dict())
            train, _ = data.client(pid)
            training = LocalTraining(len(train), hp.batch_size, hp.local_epochs, None, 3, server_round, 0)
            generator = torch_generator(0, "batches", server_round, pid)
            train_locally(model, train, hp, training, generator, defenses, client_states[pid])
            for defense in defenses:
                model = defense.unwrap(model)
            states.append(model.state_dict())
            weights.append(len(train))
        total = sum(weights)
        global_model.load_state_dict(
            {k: sum(w * s[k] for w, s in zip(weights, states)) / total for k in states[0]}
        )
    return time.perf_counter() - started


def through_fedsim(scenario: Scenario, out: Path) -> float:
    started = time.perf_counter()
    run_federation(scenario, RunDirectory(out / f"{scenario.simulation.engine}-{scenario.data.num_clients}"))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--engines", nargs="+", default=["inline", "ray"], choices=["inline", "vectorized", "ray"])
    parser.add_argument("--dp-sgd", action="store_true", help="every client trains with DP-SGD")
    args = parser.parse_args()
    set_threads(1)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for clients in args.clients:
            base = scenario_for(clients, "inline", out, args.dp_sgd)
            federated_data(base.data, base.seed)  # load once, outside every timer
            plain = plain_loop(base)
            for engine in args.engines:
                seconds = through_fedsim(scenario_for(clients, engine, out, args.dp_sgd), out)
                rows.append((clients, engine, plain, seconds))
    print(f"MLP [64] on digits, 3 rounds, one thread; DP-SGD: {'on' if args.dp_sgd else 'off'}")
    print(f"{'clients':>7}  {'engine':>10}  {'plain loop s':>12}  {'fedsim s':>9}  {'ratio':>6}")
    for clients, engine, plain, seconds in rows:
        print(f"{clients:>7}  {engine:>10}  {plain:>12.2f}  {seconds:>9.2f}  {seconds / plain:>6.2f}")


if __name__ == "__main__":
    main()
