"""Serial against parallel sweep: wall time of the same cells with 1 worker and with N.

    python benchmarks/sweep_parallel.py                                   # pruning_tradeoff, 2 workers
    python benchmarks/sweep_parallel.py scenarios/sweeps/dp_tradeoff.yaml --workers 4 --cells 8

Both runs go through `fedsim.experiments.sweep.run_sweep` (worker processes, one torch thread each) into
fresh temporary directories, so both pay their workers' start-up. CPU s (this process and its
workers) shows both did the same work; on a machine shared with other jobs the speed-up is
bounded by the CPU time the scheduler grants. It also checks that the parallel run gives
exactly the numbers of the serial one (wall times aside).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from fedsim.experiments.sweep import run_sweep
from fedsim.experiments.sweep_spec import Sweep, load_sweep

REPO = Path(__file__).resolve().parents[1]


def timed_sweep(sweep: Sweep, workers: int, output: Path) -> tuple[float, float, pd.DataFrame]:
    """(wall seconds, CPU seconds of this process and its finished workers, results table)."""
    spec = sweep.spec.model_copy(update={"workers": workers, "output": output})
    cpu_before = cpu_seconds()
    started = time.perf_counter()
    outcome = run_sweep(Sweep(sweep.path, spec, sweep.cells), Console(quiet=True))
    seconds = time.perf_counter() - started
    if outcome.failures:
        raise SystemExit(f"cells failed: {outcome.failures}")
    return seconds, cpu_seconds() - cpu_before, outcome.table


def cpu_seconds() -> float:
    """User + system time of this process and of its reaped children (the pool's workers)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "sweep", nargs="?", default=REPO / "scenarios/sweeps/pruning_tradeoff.yaml", type=Path
    )
    parser.add_argument("--workers", type=int, default=2, help="workers of the parallel run")
    parser.add_argument("--cells", type=int, default=8, help="run the first CELLS cells")
    parser.add_argument(
        "--repeat", type=int, default=1, help="alternate the runs; keep the fastest"
    )
    args = parser.parse_args()
    full = load_sweep(args.sweep)
    sweep = Sweep(full.path, full.spec, full.cells[: args.cells])
    runs: dict[int, list[tuple[float, float]]] = {1: [], args.workers: []}
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeat):
            for workers in runs:
                output = Path(tmp) / f"{workers}-{repeat}"
                seconds, cpu, tables[workers] = timed_sweep(sweep, workers, output)
                runs[workers].append((seconds, cpu))
    numbers = [c for c in tables[1].columns if c not in ("wall_time_s", "run_dir")]
    same = tables[1][numbers].equals(tables[args.workers][numbers])

    load = os.getloadavg()[0]
    title = (
        f"{sweep.spec.name}: {len(sweep.cells)} cells on {os.cpu_count()} CPUs (load {load:.1f})"
    )
    table = Table(title=title)
    for column in ("workers", "wall s (best)", "s per cell", "CPU s", "speed-up"):
        table.add_column(column, justify="right")
    serial = min(wall for wall, _ in runs[1])
    for workers, measured in runs.items():
        wall = min(w for w, _ in measured)
        cpu = sum(c for _, c in measured) / len(measured)
        per_cell = f"{wall / len(sweep.cells):.2f}"
        table.add_row(str(workers), f"{wall:.1f}", per_cell, f"{cpu:.1f}", f"{serial / wall:.2f}")
    console = Console()
    console.print(table)
    console.print(f"parallel results identical to serial: {'yes' if same else 'NO'}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
