"""Accuracy and epsilon when a share of the clients fails each round (`raise` faults), per engine.

Each cell trains digits with DP-SGD (example-level epsilon, reported by the clients) and
reports the final test accuracy, the worst client's epsilon, the central-DP epsilon of a
second run with client-level central DP (a round with a failed client releases nothing), and
the replies dropped over the run.

    python benchmarks/faults.py            # inline: 10 clients, 10 rounds; ray: 4 clients, 3 rounds
    python benchmarks/faults.py --fast     # inline only, 3 rounds
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from fedsim.core.config import build_scenario
from fedsim.pipeline.runner import run_scenario

RATES = (0.0, 0.1, 0.2, 0.4)
DP_SGD = {"name": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0}
CENTRAL_DP = {"name": "central_dp_fixed", "noise_multiplier": 1.0, "clipping_norm": 0.5}


def cell(engine: str, clients: int, rounds: int, rate: float, defense: dict[str, Any], out: Path) -> dict[str, Any]:
    """The last round's record of one run (plus the replies dropped over all rounds)."""
    scenario = build_scenario(
        {
            "name": f"faults_{engine}",
            "seed": 0,
            "data": {"dataset": "digits", "num_clients": clients},
            "training": {"batch_size": 16, "local_epochs": 1},
            "federation": {"rounds": rounds},
            "simulation": {"engine": engine},
            "observer": {"rounds": "none"},
            "faults": {"kind": "raise", "rate": rate},
            "defenses": [defense],
            "output": {"dir": str(out), "save_model": False},
        }
    )
    run = run_scenario(scenario, None, Console(quiet=True))
    records = [r for r in run.metrics() if r["round"] > 0]
    last = dict(records[-1])
    last["dropped"] = sum(len(ids) for r in records for ids in r["failures"].values())
    last["sent"] = clients * rounds
    return last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="inline only, 3 rounds")
    args = parser.parse_args()
    settings = [("inline", 10, 3 if args.fast else 10)] + ([] if args.fast else [("ray", 4, 3)])
    print("| engine | clients x rounds | failing rate | replies dropped | test accuracy (DP-SGD) "
          "| max client epsilon (DP-SGD, example-level) | central epsilon (client-level) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for engine, clients, rounds in settings:
            for rate in RATES:
                dp = cell(engine, clients, rounds, rate, DP_SGD, Path(tmp))
                central = cell(engine, clients, rounds, rate, CENTRAL_DP, Path(tmp))
                print(f"| {engine} | {clients} x {rounds} | {rate:.0%} | {dp['dropped']}/{dp['sent']} "
                      f"| {dp['test_accuracy']:.3f} | {dp['max_client_epsilon']:.2f} "
                      f"| {central['central_epsilon']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
