"""Malicious servers against SecAgg+: examples recovered by Robbing the Fed (`imprint`) and
trap weights (`trap_weights`), with the honest server's `analytic_fc` and `spear` for reference.

Runs scenarios/imprint_secagg.yaml (4 clients, one SGD step each, 8x8 digits, mlp [256] ReLU)
with and without SecAgg+ for several per-client batch sizes, and prints per case the examples
recovered exactly (PSNR > 60 dB) of those the round used, and the median PSNR. `imprint` runs
at each bin count; `trap_weights` at activation 1 / (examples the attacked update holds): the
round's 4 x batch under SecAgg+, one client's batch without.

    python benchmarks/imprint_table.py                       (the tables in docs/malicious_server.md)
    python benchmarks/imprint_table.py --attacks imprint     (imprint's rows only)
    python benchmarks/imprint_table.py --attacks spear       (SPEAR's rows)
    python benchmarks/imprint_table.py --fast                (one case)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import fedsim

EXACT_DB = 60.0
CLIENTS = 4


def case(batch: int, attack: str, secagg: bool, workdir: str) -> tuple[int, int, float]:
    """(exact, used, median PSNR) of one run: the aggregate's, or every client's pooled."""
    overrides = [f"training.batch_size={batch}", f"attacks=[{attack}]"]
    if not secagg:
        overrides.append("defenses=[]")
    scenario = fedsim.scenario("scenarios/imprint_secagg.yaml", *overrides)
    scores = fedsim.run(scenario, tempfile.mkdtemp(dir=workdir)).scores
    psnr = [p for row in scores["psnr_per_image"] for p in row]
    return sum(p > EXACT_DB for p in psnr), CLIENTS * batch, statistics.median(psnr)


def attack_specs(name: str, batch: int, secagg: bool, bins: list[int]) -> list[tuple[str, str]]:
    """(setting shown, scenario spec) of `name` for one case."""
    if name == "imprint":
        return [(f"bins {k}", f"{{name: imprint, bins: {k}}}") for k in bins]
    if name == "trap_weights":
        activation = 1 / (CLIENTS * batch if secagg else batch)
        return [(f"activation {activation:.3g}", f"{{name: trap_weights, activation: {activation}}}")]
    return [("", f"{{name: {name}}}")]  # the honest server's analytic attacks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="one case only")
    parser.add_argument("--attacks", nargs="+", choices=("imprint", "trap_weights", "analytic_fc", "spear"),
                        default=["imprint", "trap_weights", "analytic_fc", "spear"])
    args = parser.parse_args()
    cases = {8: [128]} if args.fast else {2: [128], 8: [64, 128], 16: [128, 256]}
    print("| attack | setting | per-client batch | examples in round | SecAgg+ | exact (PSNR > 60 dB) | median PSNR dB |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.attacks:
            for batch, bins in cases.items():
                for secagg in (True, False):
                    for setting, spec in attack_specs(name, batch, secagg, bins):
                        exact, used, median = case(batch, spec, secagg, workdir)
                        print(f"| `{name}` | {setting} | {batch} | {used} | {'yes' if secagg else 'no'} | "
                              f"{exact}/{used} | {median:.1f} |", flush=True)


if __name__ == "__main__":
    main()
