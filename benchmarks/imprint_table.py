"""Robbing the Fed (`imprint`) against SecAgg+: examples recovered per batch and bins.

Runs scenarios/imprint_secagg.yaml (4 clients, one SGD step each, 8x8 digits, mlp [256]) with
and without SecAgg+ for several per-client batch sizes and bin counts, and prints per case the
examples recovered exactly (PSNR > 60 dB) of those the round used, and the median PSNR.

    python benchmarks/imprint_table.py            (the table in docs/malicious_server.md)
    python benchmarks/imprint_table.py --fast     (one case)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import fedsim

EXACT_DB = 60.0


def case(batch: int, bins: int, secagg: bool, workdir: str) -> tuple[int, int, float]:
    """(exact, used, median PSNR) of one run: the aggregate's, or every client's pooled."""
    overrides = [f"training.batch_size={batch}", f"attacks=[{{name: imprint, bins: {bins}}}]"]
    if not secagg:
        overrides.append("defenses=[]")
    scenario = fedsim.scenario("scenarios/imprint_secagg.yaml", *overrides)
    scores = fedsim.run(scenario, f"{workdir}/b{batch}_k{bins}_s{int(secagg)}").scores
    psnr = [p for row in scores["psnr_per_image"] for p in row]
    return sum(p > EXACT_DB for p in psnr), 4 * batch, statistics.median(psnr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="one case only")
    args = parser.parse_args()
    cases = [(8, 128)] if args.fast else [(2, 128), (8, 64), (8, 128), (16, 128), (16, 256)]
    print("| per-client batch | examples in round | bins | SecAgg+ | exact (PSNR > 60 dB) | median PSNR dB |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as workdir:
        for batch, bins in cases:
            for secagg in (True, False):
                exact, used, median = case(batch, bins, secagg, workdir)
                print(f"| {batch} | {used} | {bins} | {'yes' if secagg else 'no'} | {exact}/{used} | {median:.1f} |")


if __name__ == "__main__":
    main()
