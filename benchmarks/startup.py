"""Start-up time of the `fedsim` command before it computes anything.

Runs each command `--repeats` times in a fresh process, interleaved (so load changes hit every
command alike), and prints the median and the best wall time with the 1-minute load average.
The goal (architecture issue): `fedsim --help`, `fedsim validate` and `fedsim sweep --dry-run`
under 3 s on a 2-core machine.

    python benchmarks/startup.py              # 5 repeats
    python benchmarks/startup.py --repeats 3 --modules   # also: which heavy modules each imports
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FEDSIM = [sys.executable, "-m", "fedsim.cli"]
COMMANDS = {
    "fedsim --help": ["--help"],
    "fedsim --version": ["--version"],
    "fedsim list": ["list"],
    "fedsim validate": ["validate", "scenarios/quickstart.yaml"],
    "fedsim sweep --dry-run": ["sweep", "scenarios/sweeps/dp_tradeoff.yaml", "--dry-run"],
}
HEAVY = ("torch", "flwr", "ray", "pennylane", "matplotlib", "torchmetrics", "pandas", "opacus", "sklearn")
PROBE = (
    "import runpy, sys, atexit\n"
    "heavy = {heavy!r}\n"
    "def report():\n"
    "    print('IMPORTED', ','.join(m for m in heavy if m in sys.modules), file=sys.stderr)\n"
    "atexit.register(report)\n"
    "sys.argv = ['fedsim', *{args!r}]\n"
    "runpy.run_module('fedsim.cli', run_name='__main__')\n"
)


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([*FEDSIM, *args], cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"`fedsim {' '.join(args)}` failed ({done.returncode}): {done.stderr[-500:]}")
    return elapsed


def heavy_imports(args: list[str]) -> str:
    code = PROBE.format(heavy=HEAVY, args=args)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in done.stderr.splitlines() if line.startswith("IMPORTED")]
    return lines[-1].removeprefix("IMPORTED ").strip() if lines else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modules", action="store_true", help="list the heavy modules each command imports")
    options = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    load_before = os.getloadavg()[0]
    for _ in range(options.repeats):
        for name, args in COMMANDS.items():
            times[name].append(timed(args))
    load_after = os.getloadavg()[0]
    print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after; {os.cpu_count()} cores")
    print(f"{'command':<26}{'median s':>10}{'best s':>9}  heavy modules imported")
    for name, args in COMMANDS.items():
        heavy = heavy_imports(args) if options.modules else ""
        print(f"{name:<26}{statistics.median(times[name]):>10.2f}{min(times[name]):>9.2f}  {heavy}")


if __name__ == "__main__":
    main()
