"""The `fedsim` command: run, validate, list, attack, sweep, audit, report.

Bad input (a scenario typo, an unknown name, a missing file) prints one line naming the
field and the fix, and exits with code 2; results already written stay on disk.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedsim.core.errors import UserError

# Each command imports what it needs (the scenario loads torch; `run` Flower): `fedsim --help`
# and `--version` import neither (tests/test_startup.py).
if TYPE_CHECKING:
    from pydantic import BaseModel

    from fedsim.core.config import Scenario

cli = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help=__doc__.splitlines()[0])
console = Console()


def show_version(value: bool) -> None:
    if value:
        from fedsim import __version__

        print(f"fedsim {__version__}")
        raise typer.Exit()


@cli.callback()
def options(
    version: Annotated[
        bool, typer.Option("--version", callback=show_version, is_eager=True, help="print the version")
    ] = False,
) -> None:
    """Simulate privacy attacks and defenses in federated learning, classical and quantum."""

ScenarioFile = Annotated[Path, typer.Argument(help="scenario YAML file")]
Overrides = Annotated[
    list[str] | None, typer.Option("--set", help="override a field: --set federation.rounds=5")
]
MlflowUri = Annotated[
    str | None,
    typer.Option(
        "--mlflow",
        help=r"also log to this MLflow store, e.g. sqlite:///mlflow.db (needs fedsim\[tracking])",
    ),
]


@cli.command()
def run(
    scenario_file: ScenarioFile,
    overrides: Overrides = None,
    run_dir: Annotated[Path | None, typer.Option(help="resume or write this run directory")] = None,
    mlflow: MlflowUri = None,
) -> None:
    """Train the federation, run the scenario's attacks, write the run directory."""
    from fedsim.core.config import load_scenario
    from fedsim.pipeline.runner import run_scenario
    from fedsim.experiments.tracking import MlflowTracker

    scenario = load_scenario(scenario_file, overrides or [])
    tracker = MlflowTracker(mlflow, scenario.name) if mlflow else None  # fail before training
    written = run_scenario(scenario, run_dir, console)
    if tracker is not None:
        tracker.log_run(written.root)
        console.print(f"logged to MLflow: {mlflow} (experiment '{scenario.name}')")
    if written.diverged:
        print(
            f"error: training diverged: the final model in '{written.root}' holds NaN or infinite "
            "weights; lower training.lr (or the strategy's server learning rate)",
            file=sys.stderr,
        )
        sys.exit(1)
    if written.failure:
        print(
            f"error: training failed in '{written.root}': {written.failure}; to train it again: "
            f"fedsim run {written.scenario_path} --run-dir {written.root}",
            file=sys.stderr,
        )
        sys.exit(1)


@cli.command()
def validate(scenario_file: ScenarioFile, overrides: Overrides = None) -> None:
    """Check a scenario file and print it with every default filled in."""
    from fedsim.core.config import load_scenario

    scenario = load_scenario(scenario_file, overrides or [])
    console.print(scenario.to_yaml(), markup=False)
    console.print(f"[green]ok[/]: {scenario_file} is a valid scenario")


def describe_params(params: type[BaseModel]) -> Text:
    """One line per parameter, 'name=default: description', as plain text (no rich markup:
    a default such as [16] or a description naming fedsim[tracking] is shown as written)."""
    lines = [
        f"{name}={'(required)' if field.is_required() else repr(field.get_default(call_default_factory=True))}"
        + (f": {field.description}" if field.description else "")
        for name, field in params.model_fields.items()
    ]
    return Text("\n".join(lines) or "-")


@cli.command("list")
def list_plugins() -> None:
    """Every registered dataset, partitioner, model, strategy, attack and defense."""
    from fedsim.core.registry import ALL_REGISTRIES

    for registry in ALL_REGISTRIES:
        table = Table(title=registry.plural, show_lines=True, title_justify="left")
        table.add_column("name", no_wrap=True)
        table.add_column("what", ratio=1, overflow="fold")
        table.add_column("parameters (default): description", ratio=2, overflow="fold")
        for name in registry.names():
            table.add_row(name, Text(registry.describe(name)), describe_params(registry.get(name).Params))
        console.print(table)
    console.print("scenario fields: see `fedsim validate FILE` and README.md")


@cli.command()
def attack(
    run_dir: Annotated[Path, typer.Argument(help="an existing run directory")],
    attack_name: Annotated[str, typer.Option("--attack", help="registered attack name")],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="attack parameter: --set iterations=100")
    ] = None,
    rounds: Annotated[
        list[int] | None, typer.Option("--round", help="attack only this round's observations (repeatable)")
    ] = None,
    clients: Annotated[
        list[int] | None, typer.Option("--client", help="attack only this client's observations (repeatable)")
    ] = None,
) -> None:
    """Run an attack on a finished run's observations, without retraining.

    Settings other than the scenario's (or than earlier results') write their own result set,
    `attacks/<name>-<hash>`, so no results are overwritten; the end names where they went."""
    import json

    from fedsim.core.config import build_scenario
    from fedsim.core.results import RunDirectory
    from fedsim.pipeline.runner import attack_run, load_run_scenario, summary_table, write_summary

    run = RunDirectory(run_dir).require()
    base = load_run_scenario(run)
    raw = base.model_dump(mode="json")
    # start from the scenario's own settings of this attack, if it has them
    configured = [spec for spec in raw["attacks"] if spec["name"] == attack_name]
    raw["attacks"] = configured[:1] or [{"name": attack_name}]
    spec_overrides = [f"attacks.0.{o}" for o in overrides or []]
    scenario: Scenario = build_scenario(raw, spec_overrides)
    (spec,) = scenario.attacks
    results = run.attack_dir(spec, base)
    console.print(f"[bold]fedsim attack[/] {spec.name}: {run.root}", soft_wrap=True)
    console.print(f"params: {json.dumps(spec.params.model_dump(mode='json'))}", markup=False)
    with run.lock():
        run.require_trained()
        attack_run(run, base, scenario.attacks, console, rounds=rounds, clients=clients)
        summary = write_summary(run, base)
    console.print(summary_table(summary))
    console.print(f"results: {results}", markup=False, soft_wrap=True)  # whole, for copying


@cli.command()
def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="sweep YAML file")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the cells, run nothing")] = False,
    workers: Annotated[
        int | None, typer.Option(min=1, help="cells at the same time (default: the file's)")
    ] = None,
    mlflow: MlflowUri = None,
) -> None:
    """Run every cell of a sweep in parallel; rerun the same command to resume it."""
    from fedsim.experiments.sweep import cells_table, run_sweep
    from fedsim.experiments.sweep_spec import load_sweep
    from fedsim.experiments.tracking import MlflowTracker

    plan = load_sweep(sweep_file, workers)
    if dry_run:
        console.print(cells_table(plan))
        return
    tracker = MlflowTracker(mlflow, plan.spec.name) if mlflow else None
    if run_sweep(plan, console, tracker).failures:
        sys.exit(1)  # some cells failed (see their log.txt); rerunning retries only those


@cli.command()
def audit(
    runs: Annotated[list[Path], typer.Argument(help="run directories of one scenario, seeds apart")],
    attack: Annotated[str, typer.Option(help="the audit attack whose trials are pooled")] = "canary_gradient_audit",
    out: Annotated[Path | None, typer.Option(help="also write the result as JSON here")] = None,
) -> None:
    """Multi-run audit: pool an audit's canaries over several runs; print both bounds."""
    from fedsim.core.results import atomic_write_json
    from fedsim.pipeline.pooled_audit import pooled_audit

    result = pooled_audit(runs, attack)
    claim = result["reported"]
    table = Table(title=f"{attack}: {len(result['runs'])} runs, {result['trials']} trials")
    for column in ("bound", "epsilon >=", "reported epsilon", "above it"):
        table.add_column(column)
    reported = f"{claim['epsilon']:.3f} ({claim['kind']}-level)" if claim and claim["epsilon"] is not None else "-"
    for name, key, flag in (("multi-run (Clopper-Pearson)", "multi_run", "violation"),
                            ("Gaussian trade-off", "gaussian", "gaussian_violation")):
        table.add_row(name, f"{result[key]['epsilon_lower_bound']:.3f}", reported, "yes: privacy bug" if result[flag] else "no")
    console.print(table)
    if out is not None:
        atomic_write_json(out, result)


@cli.command()
def report(
    directory: Annotated[Path, typer.Argument(help="a sweep directory or a run directory")],
    images: Annotated[
        int, typer.Option(min=0, help="reconstruction grids shown per cell and attack")
    ] = 1,
) -> None:
    """Write report.html (self-contained) and report.md with plots, tables and images."""
    from fedsim.reporting.report import write_report

    html, markdown = write_report(directory, images_per_cell=images)
    console.print(f"report: {html}\nmarkdown: {markdown}")


def main() -> None:
    """Console entry point: one-line errors with exit code 2 for bad input."""
    # Flower's records reach this handler, warnings only (`fedsim.federation.simulation.quiet_flower`)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cli(standalone_mode=False)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except Exception as err:  # click's usage errors carry their own exit code
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
