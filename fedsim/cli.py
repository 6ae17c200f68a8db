"""The `fedsim` command: run, validate, list, attack, sweep, report.

Bad input (a scenario typo, an unknown name, a missing file) prints one line naming the
field and the fix, and exits with code 2; results already written stay on disk.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedsim.core.config import Scenario, load_scenario
from fedsim.core.errors import UserError
from fedsim.core.registry import ALL_REGISTRIES

cli = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help=__doc__.splitlines()[0])
console = Console()

ScenarioFile = Annotated[Path, typer.Argument(help="scenario YAML file")]
Overrides = Annotated[
    list[str] | None, typer.Option("--set", help="override a field: --set federation.rounds=5")
]
MlflowUri = Annotated[
    str | None,
    typer.Option(
        "--mlflow",
        help="also log to this MLflow store, e.g. sqlite:///mlflow.db (needs fedsim[tracking])",
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
    from fedsim.pipeline.runner import run_scenario
    from fedsim.experiments.tracking import MlflowTracker

    scenario = load_scenario(scenario_file, overrides or [])
    tracker = MlflowTracker(mlflow, scenario.name) if mlflow else None  # fail before training
    written = run_scenario(scenario, run_dir, console)
    if tracker is not None:
        tracker.log_run(written.root)
        console.print(f"logged to MLflow: {mlflow} (experiment '{scenario.name}')")


@cli.command()
def validate(scenario_file: ScenarioFile, overrides: Overrides = None) -> None:
    """Check a scenario file and print it with every default filled in."""
    scenario = load_scenario(scenario_file, overrides or [])
    console.print(scenario.to_yaml(), markup=False)
    console.print(f"[green]ok[/]: {scenario_file} is a valid scenario")


@cli.command("list")
def list_plugins() -> None:
    """Every registered dataset, partitioner, model, strategy, attack and defense."""
    for registry in ALL_REGISTRIES:
        table = Table(title=registry.plural, show_lines=False, title_justify="left")
        for column in ("name", "parameters (default)", "what"):
            table.add_column(column)
        for name in registry.names():
            fields = registry.get(name).Params.model_fields
            params = ", ".join(f"{k}={f.get_default(call_default_factory=True)!r}" for k, f in fields.items()) or "-"
            table.add_row(name, params, registry.describe(name))
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
    """Run an attack on a finished run's observations, without retraining."""
    from fedsim.core.config import build_scenario
    from fedsim.core.results import RunDirectory
    from fedsim.pipeline.runner import attack_run, load_run_scenario, write_summary

    run = RunDirectory(run_dir).require()
    base = load_run_scenario(run)
    raw = base.model_dump(mode="json")
    # start from the scenario's own settings of this attack, if it has them
    configured = [spec for spec in raw["attacks"] if spec["name"] == attack_name]
    raw["attacks"] = configured[:1] or [{"name": attack_name}]
    spec_overrides = [f"attacks.0.{o}" for o in overrides or []]
    scenario: Scenario = build_scenario(raw, spec_overrides)
    attack_run(run, base, scenario.attacks, console, rounds=rounds, clients=clients)
    write_summary(run, base)


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


def quiet_flower() -> None:
    """Flower logs every message at INFO; fedsim prints its own per-round progress."""
    import flwr  # noqa: F401  (creates Flower's logger and its console handler)

    flower = logging.getLogger("flwr")
    flower.setLevel(logging.WARNING)
    flower.propagate = False


def main() -> None:
    """Console entry point: one-line errors with exit code 2 for bad input."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_flower()
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
