"""Running a sweep: every cell is a run directory; cells run in parallel and survive a kill.

Cells run in worker processes (spawned, one torch thread each, `workers` at a time) or, with
`ray_address`, as tasks on an existing Ray cluster. A cell is finished when its summary.json
exists and it has no error.txt (written when it raised, or when the failure policy stopped its
training). Rerunning the same sweep skips finished cells and hands the others to
`fedsim.pipeline.runner.run_scenario`, which resumes per stage: a half-done or failed training
restarts cleanly, finished attacks are kept. A cell that validation refuses (e.g. central DP
with fedadam) refuses the whole sweep when it is loaded, before anything runs: it could never
succeed, so it is no failure to retry. Nothing is written twice at once: on Linux the workers die with
the sweep process (PR_SET_PDEATHSIG), and lock files keep a second sweep out of the sweep
directory and any process out of a cell another one is still writing.

Sweep directory (`output/name/`): `sweep.yaml` (the sweep as run), `cells.json` (axes and
cells, in order), one run directory per cell (plus its `log.txt`), and the results table
`results.csv` / `results.parquet` (see `fedsim.experiments.sweep_table`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from fedsim.core.config import build_scenario
from fedsim.core.device import set_threads
from fedsim.core.errors import UserError
from fedsim.core.results import (
    LOCK,
    RunDirectory,
    atomic_write_bytes,
    atomic_write_json,
    ensure_directory,
    exclusive,
    prepare_run_directory,
)
from fedsim.experiments.sweep_spec import Cell, Sweep, SweepFile, plain, short_names, value_text
from fedsim.experiments.sweep_table import (
    ERROR_FILE,
    MANIFEST,
    PRIVACY,
    mean_std,
    run_status,
    seed_summary,
    write_results,
)
from fedsim.experiments.tracking import MlflowTracker

if TYPE_CHECKING:  # pandas where a table is built: `fedsim sweep --dry-run` needs none
    import pandas as pd

LOG = "log.txt"
POLL_S = 0.5
PR_SET_PDEATHSIG = 1
SUMMARY_ROWS = 20


def discard_partial_writes(root: Path) -> None:
    """Delete the temporary files of atomic writes cut short by a kill (hidden `.name.*`)."""
    for path in root.rglob(".*"):
        if path.is_file() and path.name != LOCK:
            path.unlink()


@contextmanager
def cell_log(path: Path) -> Iterator[Console]:
    """Send this cell's console output, warnings and log records to `path`, not the terminal.

    Flower's records come here too: `run_federation` hands them to the root logger.
    """
    with path.open("a", encoding="utf-8") as log, redirect_stdout(log), redirect_stderr(log):
        root = logging.getLogger()
        saved = root.handlers[:]
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.handlers = [handler]
        logging.captureWarnings(True)
        try:
            yield Console(file=log, width=120, color_system=None)
        finally:
            root.handlers = saved


def run_cell(raw_scenario: dict[str, Any], run_dir: str) -> str | None:
    """Run (or resume) one cell in this process: None when it finished, else the error line."""
    from fedsim.pipeline.runner import run_scenario

    root = Path(run_dir)
    with exclusive(root / LOCK, f"cell '{root.name}'"):
        (root / ERROR_FILE).unlink(missing_ok=True)
        discard_partial_writes(root)
        scenario = build_scenario(raw_scenario)
        prepare_run_directory(scenario, root)  # scenario.yaml before the log: a fedsim run
        with cell_log(root / LOG) as console:
            try:  # on an error or a failed training the sweep goes on; the next run retries it
                failure = run_scenario(scenario, root, console).failure
                message = None if failure is None else f"training failed: {failure}"
            except Exception as err:
                console.print(traceback.format_exc(), markup=False, highlight=False)
                message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
                message = message or type(err).__name__
            if message is not None:
                message = message.splitlines()[0]
                atomic_write_bytes(root / ERROR_FILE, f"{message}\n".encode())
    return message


def init_worker(sweep_pid: int) -> None:
    """Worker-process start: die with the sweep process, train on one torch thread."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != sweep_pid:  # the sweep died before the death signal was armed
        os._exit(1)
    set_threads(1)


class CellRunner(Protocol):
    def submit(self, raw_scenario: dict[str, Any], run_dir: str) -> Future[str | None]: ...

    def close(self) -> None: ...


class LocalCells:
    """Cells in `workers` spawned processes on this machine."""

    def __init__(self, workers: int) -> None:
        self.pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker,
            initargs=(os.getpid(),),
        )

    def submit(self, raw_scenario: dict[str, Any], run_dir: str) -> Future[str | None]:
        return self.pool.submit(run_cell, raw_scenario, run_dir)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayCells:
    """Cells as Ray tasks on an existing cluster (`ray_address`: auto, ray://host:10001, ...).

    Every node needs fedsim installed, and the sweep's `output` must be on storage shared by
    all nodes at the same path: cells write their run directories where they run.
    """

    def __init__(self, spec: SweepFile) -> None:
        import ray

        ray.init(address=spec.ray_address, log_to_driver=False, ignore_reinit_error=True)
        self.ray = ray
        resources = spec.ray_resources
        self.task = ray.remote(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus)(run_cell)

    def submit(self, raw_scenario: dict[str, Any], run_dir: str) -> Future[str | None]:
        return self.task.remote(raw_scenario, run_dir).future()

    def close(self) -> None:
        self.ray.shutdown()


def cell_runner(spec: SweepFile) -> CellRunner:
    return RayCells(spec) if spec.ray_address else LocalCells(spec.workers)


def cell_progress(run_dir: Path) -> tuple[int, str]:
    """(rounds finished, stage) of a running cell, read from its run directory."""
    run = RunDirectory(run_dir)
    if run.training_done:
        return -1, "attacks"
    rounds = run.metrics_path.read_bytes().count(b"\n") - 1 if run.metrics_path.exists() else 0
    return max(rounds, 0), "training"


class SweepProgress:
    """A live view: cells done of all with the ETA, and one bar of rounds per running cell."""

    def __init__(self, console: Console, total: int, done: int) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            speed_estimate_period=7 * 24 * 3600,  # ETA from the mean rate since the start
        )
        self.cells = self.progress.add_task("cells", total=total, completed=done, unit="cells")
        self.progress.advance(self.cells, 0)  # the start, so cells finishing together count right
        self.running: dict[str, tuple[TaskID, float]] = {}

    def __enter__(self) -> SweepProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start(self, cell: Cell) -> None:
        task = self.progress.add_task(
            f"  {cell.name}", total=cell.scenario.federation.rounds, unit="rounds"
        )
        self.running[cell.name] = (task, time.perf_counter())

    def poll(self, directory: Path, cells: list[Cell]) -> None:
        for cell in cells:
            task, _ = self.running[cell.name]
            rounds, stage = cell_progress(directory / cell.name)
            total = cell.scenario.federation.rounds
            self.progress.update(
                task,
                completed=total if rounds < 0 else rounds,
                unit="rounds" if rounds >= 0 else stage,
            )

    def finish(self, cell: Cell, error: str | None) -> None:
        task, started = self.running.pop(cell.name)
        self.progress.remove_task(task)
        self.progress.advance(self.cells)
        seconds = time.perf_counter() - started
        if error is None:
            self.console.print(f"done   {cell.name}  {cell.describe()}  ({seconds:.1f} s)")
        else:
            self.console.print(
                f"[red]failed[/] {cell.name}  {cell.describe()}: {error}", markup=True
            )


def run_cells(
    runner: CellRunner,
    sweep: Sweep,
    cells: list[Cell],
    progress: SweepProgress,
    on_done: Callable[[Cell], None],
) -> dict[str, str]:
    """Run `cells`, at most `workers` at a time, calling `on_done` as each one finishes;
    returns the failures (cell name -> error)."""
    directory = sweep.directory
    queue, running, failures = deque(cells), {}, {}
    while queue or running:
        while queue and len(running) < sweep.spec.workers:
            cell = queue.popleft()
            raw = cell.scenario.model_dump(mode="json")
            running[runner.submit(raw, str(directory / cell.name))] = cell
            progress.start(cell)
        finished, _ = wait(list(running), timeout=POLL_S, return_when=FIRST_COMPLETED)
        for future in finished:
            cell = running.pop(future)
            try:
                error = future.result()
            except BrokenProcessPool:
                error = "a worker process died (out of memory?); rerun the sweep to resume"
                queue.clear()
            except UserError as err:  # the cell is locked by another process
                error = str(err)
            except Exception as err:  # e.g. a Ray task that lost its node
                error = f"{type(err).__name__}: {err}".splitlines()[0]
            if error is None and run_status(directory / cell.name) != "done":
                error = (
                    f"the cell finished but '{directory / cell.name}' is not visible here; "
                    "put the sweep's output on storage shared by every Ray node"
                )
            if error is not None:
                failures[cell.name] = error
            else:
                on_done(cell)
            progress.finish(cell, error)
        progress.poll(directory, list(running.values()))
    return failures


def write_manifest(sweep: Sweep) -> None:
    directory = sweep.directory
    spec = sweep.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    atomic_write_bytes(directory / "sweep.yaml", yaml.safe_dump(spec, sort_keys=False).encode())
    cells = [
        {"name": c.name, "index": c.index, "seed": c.seed, "values": c.values} for c in sweep.cells
    ]
    atomic_write_json(
        directory / MANIFEST,
        {
            "sweep": sweep.spec.name,
            "description": sweep.spec.description,
            "axes": sweep.axes,
            "cells": cells,
        },
    )


@dataclass
class SweepOutcome:
    directory: Path
    table: pd.DataFrame
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def run_sweep(
    sweep: Sweep, console: Console, tracker: MlflowTracker | None = None
) -> SweepOutcome:
    """Run every unfinished cell of `sweep`, then write and print the results table.

    With a `tracker`, cells finished by an earlier (killed) sweep are logged to MLflow first,
    the others as they finish.
    """
    directory = sweep.directory

    def track(cell: Cell) -> None:
        if tracker is not None:
            tags = {"fedsim.sweep": sweep.spec.name, "fedsim.cell": cell.name}
            tracker.log_run(directory / cell.name, {**tags, "fedsim.seed": str(cell.seed)})

    started = time.perf_counter()
    ensure_directory(directory, "output")
    with exclusive(directory / LOCK, f"sweep directory '{directory}'"):
        write_manifest(sweep)
        finished = {c.name for c in sweep.cells if run_status(directory / c.name) == "done"}
        pending = [c for c in sweep.cells if c.name not in finished]
        done = len(finished)
        where = f"Ray at {sweep.spec.ray_address}" if sweep.spec.ray_address else "processes"
        console.print(
            f"[bold]fedsim sweep[/] {sweep.spec.name}: {len(sweep.cells)} cells ({done} already "
            f"done), {sweep.spec.workers} at a time in {where} -> {directory}"
        )
        for cell in sweep.cells:
            if cell.name in finished:  # by an earlier sweep: logged now if it is not yet
                track(cell)
        failures: dict[str, str] = {}
        if pending:
            runner = cell_runner(sweep.spec)
            try:
                with SweepProgress(console, len(sweep.cells), done) as progress:
                    failures = run_cells(runner, sweep, pending, progress, track)
            finally:
                runner.close()
        table = write_results(directory)
    outcome = SweepOutcome(directory, table, failures, time.perf_counter() - started)
    console.print(summary_table(sweep, table))
    console.print(
        f"{len(sweep.cells) - len(failures)} of {len(sweep.cells)} cells done in "
        f"{outcome.seconds:.1f} s; table: {directory / 'results.csv'} (and .parquet); "
        f"report: fedsim report {directory}"
    )
    for name, error in failures.items():
        console.print(f"[red]failed[/] {name}: {error} (log: {directory / name / LOG})")
    return outcome


def column_title(column: str, short: dict[str, str]) -> str:
    """A short header for the one-screen summary."""
    if column in short:
        return short[column]
    if column.endswith("_psnr"):
        return f"{column.removesuffix('_psnr')} PSNR"
    if column in PRIVACY:
        return f"eps {column.removeprefix('epsilon_')}"
    return {"final_test_accuracy": "final acc", "wall_time_s": "time s"}.get(column, column)


def summary_table(sweep: Sweep, table: pd.DataFrame) -> Table:
    """One screen: mean ± spread over seeds of the headline numbers, per combination.

    One epsilon column per kind of guarantee; the caption names each one's unit.
    """
    summary = seed_summary(table, sweep.axes)
    leakage = [c for c in summary if c.endswith("_psnr")]
    metrics = [c for c in ["final_test_accuracy", *PRIVACY, *leakage] if c in summary]
    short = short_names(sweep.axes)
    out = Table(title=f"sweep {sweep.spec.name}: mean ± std over seeds", title_justify="left")
    for column in [*sweep.axes, "seeds", *metrics, "wall_time_s"]:
        title = column_title(column, short)
        out.add_column(title, justify="right", min_width=len(title) if column in short else None)
    for row in summary.head(SUMMARY_ROWS).to_dict("records"):
        values = [
            row[a] if isinstance(row[a], str) else value_text(plain(row[a])) for a in sweep.axes
        ]
        spreads = [mean_std(row[m], row[f"{m}_std"], digits=3) for m in metrics]
        out.add_row(
            *values, str(row["seeds"]), *spreads, f"{row.get('wall_time_s', float('nan')):.1f}"
        )
    captions = [
        f"{column_title(c, short)}: {'; '.join(sorted({u for u in summary[f'{c}_unit'] if u}))}"
        for c in PRIVACY
        if c in metrics and f"{c}_unit" in summary
    ]
    if len(summary) > SUMMARY_ROWS:
        captions.append(f"... {len(summary) - SUMMARY_ROWS} more rows in results.csv")
    out.caption = "\n".join(captions) or None
    return out


def cell_rows(sweep: Sweep) -> list[dict[str, Any]]:
    """The cells of a sweep and their status on disk, one mapping per cell (a dry run)."""
    return [
        {"cell": cell.name, "seed": cell.seed, **cell.values, "status": run_status(sweep.directory / cell.name)}
        for cell in sweep.cells
    ]


def cells_frame(sweep: Sweep) -> pd.DataFrame:
    """`cell_rows` as a table, one row per cell."""
    import pandas as pd

    return pd.DataFrame(cell_rows(sweep), columns=["cell", "seed", *sweep.axes, "status"])


def cells_table(sweep: Sweep) -> Table:
    """`cell_rows` for the terminal (`fedsim sweep --dry-run`, no pandas)."""
    out = Table(
        title=f"sweep {sweep.spec.name}: {len(sweep.cells)} cells -> {sweep.directory}",
        title_justify="left",
    )
    for column in ("cell", "seed", *sweep.axes, "status"):
        out.add_column(column, overflow="fold")
    for row in cell_rows(sweep):
        values = [value_text(row[a]) for a in sweep.axes]
        out.add_row(row["cell"], str(row["seed"]), *values, row["status"])
    return out
