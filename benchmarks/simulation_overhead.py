"""Overhead of running local training through fedsim's Flower simulation.

The same work (every client trains one local epoch of an MLP on its digits partition, FedAvg
over 3 rounds) is timed: a plain single-process Python loop, and fedsim's engines: inline
(Flower ServerApp/ClientApp in one process), vectorized (the cohort trained as one batched
computation), vectorized-ray (vectorized, in shards on `--ray-workers` Ray actors) and Flower's
Ray simulation engine. Each is timed whole (start-up included) and per round: round 1 (with
any Ray start-up) apart from the mean of the later rounds, whose ratio to the plain loop's
later rounds is the per-round overhead. Prints one table; not a test.

`--dp-sgd` trains every client with DP-SGD (noise 1.0, C 1.0, rdp accountant) in all three:
the plain loop through Opacus (`train_locally` with the defense), the engines as configured.

    python benchmarks/simulation_overhead.py            # 10 and 100 clients
    python benchmarks/simulation_overhead.py --clients 10 --engines inline
    python benchmarks/simulation_overhead.py --clients 100 --engines inline vectorized --dp-sgd
    python benchmarks/simulation_overhead.py --case cross-device --engines inline vectorized
    python benchmarks/simulation_overhead.py --clients 100 --engines vectorized vectorized-ray ray --ray-workers 2
    python benchmarks/simulation_overhead.py --clients 100 --engines vectorized --profile 30   # where the time goes

`--case cross-device` is pfl-research's CIFAR-10 shape on synthetic data: 1000 clients of 50
32x32x3 images (and 1,000 test images the server evaluates on after every round; the plain
loop does not evaluate), 50 sampled per round, the small ConvNet (width 16), batch 10, one local epoch,
3 rounds; the plain loop trains 50 clients per round too. Each measurement runs in a forked
child process, which reports its wall time and its peak resident memory (the data, loaded
once before the fork, included).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import tempfile
import time
from collections.abc import Callable
from functools import partial
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


CASES = {
    "digits": {
        "data": {},
        "model": {"name": "mlp", "hidden": [64]},
        "training": {"batch_size": 8, "lr": 0.05},
        "federation": {"rounds": 3},
    },
    "cross-device": {
        "data": {
            "dataset": {"name": "synthetic", "num_examples": 51_000, "channels": 3, "image_size": 32},
            "test_fraction": 1 / 51,  # 1,000 test images: the server's evaluation stays small
            "val_fraction": 0.0,
        },
        "model": {"name": "convnet", "width": 16},
        "training": {"batch_size": 10, "lr": 0.05},
        "federation": {"rounds": 3, "clients_per_round": 50},
    },
}


ENGINES = ["inline", "vectorized", "vectorized-ray", "ray"]


def scenario_for(case: str, clients: int, engine: str, out: Path, dp_sgd: bool = False, ray_workers: int = 2) -> Scenario:
    settings = CASES[case]
    simulation = {"engine": engine}
    if engine == "vectorized-ray":
        simulation = {"engine": "vectorized", "ray_workers": ray_workers}
    return build_scenario(
        {
            "name": "overhead",
            "data": {**settings["data"], "num_clients": clients},
            "model": settings["model"],
            "training": settings["training"],
            "federation": settings["federation"],
            "observer": {"rounds": "none"},
            "simulation": simulation,
            "output": {"dir": str(out), "save_model": False},
            "defenses": [DP_SGD] if dp_sgd else [],
        }
    )


def in_child(measure: Callable[[], list[float]], profile: int = 0) -> tuple[list[float], float]:
    """(seconds at the end of each round, peak resident GiB) of `measure()` run in a forked
    child process; with `profile` the child prints that many of cProfile's top lines first."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure, report, leave without running the parent's cleanup
        os.close(reader)
        if profile:
            profiler = cProfile.Profile()
            seconds = profiler.runcall(measure)
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(profile)
        else:
            seconds = measure()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        os.write(writer, json.dumps([seconds, peak]).encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        report = pipe.read()
    os.waitpid(pid, 0)
    seconds, peak = json.loads(report)
    return seconds, peak


def plain_loop(scenario: Scenario) -> list[float]:
    """The same training as a bare loop: no Flower, no messages, no observer."""
    data = federated_data(scenario.data, scenario.seed)
    t = scenario.training
    hp = LocalHyperParams(t.lr, t.batch_size, t.local_epochs, 0, t.optimizer, t.momentum, t.weight_decay)
    defenses = client_setup(scenario.public().to_yaml()).train_defenses
    client_states: dict[int, list[dict]] = {pid: [{} for _ in defenses] for pid in range(scenario.data.num_clients)}
    started, ends = time.perf_counter(), []
    global_model = initial_model(scenario)
    for server_round in range(1, scenario.federation.rounds + 1):
        states, weights = [], []
        for pid in range(scenario.cohort_size):  # the same number of clients a round
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
        ends.append(time.perf_counter() - started)
    return ends


def through_fedsim(scenario: Scenario, out: Path, label: str) -> list[float]:
    started, ends = time.perf_counter(), []

    def round_ended(record: dict) -> None:
        if record["round"] >= 1:
            ends.append(time.perf_counter() - started)

    run_federation(scenario, RunDirectory(out / f"{label}-{scenario.data.num_clients}"), round_ended)
    return ends


def later_round_s(ends: list[float]) -> float:
    """Mean seconds of the rounds after the first."""
    return (ends[-1] - ends[0]) / (len(ends) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=list(CASES), default="digits")
    parser.add_argument("--clients", type=int, nargs="+", default=None, help="default: 10 and 100 (digits), 1000 (cross-device)")
    parser.add_argument("--engines", nargs="+", default=["inline", "ray"], choices=ENGINES)
    parser.add_argument("--ray-workers", type=int, default=2, help="vectorized-ray: Ray actors")
    parser.add_argument("--profile", type=int, default=0, metavar="LINES", help="print cProfile's top LINES per measurement (slower)")
    parser.add_argument("--dp-sgd", action="store_true", help="every client trains with DP-SGD")
    args = parser.parse_args()
    set_threads(1)
    torch.manual_seed(0)
    rows = []
    client_counts = args.clients or ([1000] if args.case == "cross-device" else [10, 100])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for clients in client_counts:
            base = scenario_for(args.case, clients, "inline", out, args.dp_sgd)
            for seed in {base.seed, base.public().seed}:  # the server's and the clients' view
                federated_data(base.data, seed)  # load once, outside every timer (and every child)
            plain, plain_peak = in_child(partial(plain_loop, base), args.profile)
            for engine in args.engines:
                scenario = scenario_for(args.case, clients, engine, out, args.dp_sgd, args.ray_workers)
                ends, peak = in_child(partial(through_fedsim, scenario, out, engine), args.profile)
                rows.append((clients, engine, plain, plain_peak, ends, peak))
    model, rounds = CASES[args.case]["model"], CASES[args.case]["federation"]["rounds"]
    print(f"case {args.case} ({model}), {rounds} rounds, one thread per process; DP-SGD: "
          f"{'on' if args.dp_sgd else 'off'}; vectorized-ray: {args.ray_workers} workers; load {os.getloadavg()[0]:.2f}")
    print(f"{'clients':>7}  {'engine':>14}  {'plain loop s':>12}  {'fedsim s':>9}  {'ratio':>6}  {'round 1 s':>9}  "
          f"{'later s/round':>13}  {'later ratio':>11}  {'rounds/s':>8}  {'peak GiB plain / fedsim':>23}")
    for clients, engine, plain, plain_peak, ends, peak in rows:
        later = later_round_s(ends)
        print(f"{clients:>7}  {engine:>14}  {plain[-1]:>12.2f}  {ends[-1]:>9.2f}  {ends[-1] / plain[-1]:>6.2f}  "
              f"{ends[0]:>9.2f}  {later:>13.3f}  {later / later_round_s(plain):>11.2f}  "
              f"{rounds / ends[-1]:>8.2f}  {plain_peak:>11.2f} / {peak:.2f}")


if __name__ == "__main__":
    main()
