"""From a scenario to a finished run directory: train, attack, summarise.

Each stage is skipped when its output is already on disk, so re-running the same command
on the same run directory resumes: a finished training is not repeated, a finished attack
on an observation is not recomputed, and a half-done training restarts cleanly.
"""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fedsim.evaluation.metrics import (
    describe_meaning,
    describe_scores,
    leaks,
    save_image_grid,
    score_reconstruction,
    summarise_reconstructions,
    train_judge,
    zero_knowledge_baseline,
)
from fedsim.pipeline import membership, model_leakage
from fedsim.pipeline.progress import attack_progress, progress_bar
from fedsim.pipeline.reconstructions import save_reconstruction
from fedsim.core.attack import Attack, AuxiliaryData, GradientAttack, GradientTarget
from fedsim.core.config import PluginSpec, Scenario, build_scenario, read_yaml
from fedsim.core.membership import MembershipAttack
from fedsim.data.datasets import FederatedData, federated_data
from fedsim.core.device import set_threads
from fedsim.core.errors import UserError
from fedsim.models import federated_model
from fedsim.federation.client_call import hides_example_counts
from fedsim.federation.observer import Observation, load_observations, observed_batches
from fedsim.core.registry import ATTACKS
from fedsim.core.results import (
    DIVERGED,
    FAILED,
    RunDirectory,
    atomic_write_bytes,
    atomic_write_json,
    locked_run_directory,
    read_record,
)
from fedsim.core.seeding import derive_seed
from fedsim.federation.simulation import check_engine, run_federation


def load_run_scenario(run: RunDirectory) -> Scenario:
    path = run.require().scenario_path
    try:
        return build_scenario(read_yaml(path))
    except UserError as err:
        message = str(err)
        raise UserError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def run_scenario(scenario: Scenario, run_dir: str | Path | None = None, console: Console | None = None) -> RunDirectory:
    """Train (unless done), run the scenario's attacks (unless done), write summary.json.

    The run directory is locked throughout: a second process writing it gets a UserError.
    """
    console = console or Console()
    set_threads(scenario.simulation.torch_threads)
    check_engine(scenario)  # before a run directory exists
    federated_data(scenario.data, scenario.public().seed)  # data that cannot load leaves no directory
    with locked_run_directory(scenario, run_dir) as run:
        console.print(f"[bold]fedsim[/] {scenario.name} -> {run.root}")
        if not run.needs_training:
            console.print("training already finished; skipping to attacks")
        else:
            if run.failure is not None:
                console.print(f"training failed earlier ({run.failure}); training again")
            run.reset_training()
            train(scenario, run, console)
        if run.failure is None:
            attack_run(run, scenario, scenario.attacks, console)
        elif scenario.attacks:  # no final model, and the rounds it recorded may not be all
            console.print(f"training failed ({run.failure}); attacks skipped until a rerun trains it")
        summary = write_summary(run, scenario)
    console.print(summary_table(summary))
    return run


def train(scenario: Scenario, run: RunDirectory, console: Console) -> None:
    """Run the federation, printing a line per round under a bar over the rounds."""
    rounds = scenario.federation.rounds
    with progress_bar(console, "training", "rounds") as update:

        def on_round(record: dict[str, Any]) -> None:
            console.print(round_line(record, scenario))
            if update is not None:
                update(record["round"], rounds)

        run_federation(scenario, run, on_round=on_round)


def round_line(record: dict[str, Any], scenario: Scenario) -> str:
    parts = [
        f"round {record['round']:>3}/{scenario.federation.rounds}",
        f"test acc {record['test_accuracy']:.3f}",
        f"loss {record['test_loss']:.3f}",
    ]
    for entry in record.get("privacy", []):
        parts.append(f"eps {entry['epsilon']:.2f} ({entry['kind']}, {entry['key']})")
    if record.get("failures"):  # dropped before aggregation (the scenario's failure policy)
        parts.append("failed: " + ", ".join(f"{kind} {clients}" for kind, clients in record["failures"].items()))
    parts.append(f"{record['elapsed_s']:.1f} s")
    return "  ".join(parts)


def gradient_target(observation: Observation, scenario: Scenario, data: FederatedData) -> GradientTarget:
    """What the server saw of one client, as an attack's input (no ground truth in it)."""
    model = federated_model(scenario, data.input_shape, data.num_classes)
    try:
        model.load_state_dict(observation.global_state)
    except RuntimeError as err:
        reason = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise UserError(
            f"observation round {observation.server_round} {observation.label} does not "
            f"fit model '{scenario.model.name}' ({reason}); attack it with its own scenario"
        ) from None
    update = observation.update
    missing = [name for name, _ in model.named_parameters() if name not in update]
    if missing:
        raise UserError(f"observation round {observation.server_round} lacks parameters {missing[:3]}")
    num_examples = observation.num_examples
    if hides_example_counts(scenario):  # the reply's count is a placeholder: the server knows its plan
        num_examples = observation.batch_size * observation.local_steps
    return GradientTarget(
        model=model,
        update=update,
        num_examples=num_examples,
        lr=observation.hyperparams.lr,
        local_steps=observation.local_steps,
        batch_size=observation.batch_size,
        input_shape=tuple(data.input_shape),
        num_classes=data.num_classes,
        server_round=observation.server_round,
        client=observation.client,
        optimizer=observation.hyperparams.optimizer,
        momentum=observation.hyperparams.momentum,
        weight_decay=observation.hyperparams.weight_decay,
        proximal_mu=observation.hyperparams.proximal_mu,
    )


def auxiliary_data(data: FederatedData, scenario: Scenario) -> AuxiliaryData:
    """What the server holds besides the updates: its test set and the public classes."""
    return AuxiliaryData(
        test_x=data.test.x,
        test_y=data.test.y,
        public_x=data.public.x,
        public_y=data.public.y,
        seed=derive_seed(scenario.seed, "attack-prior"),
    )


def ground_truth(run: RunDirectory, observation: Observation, data: FederatedData) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples behind an observation: the client's, or every cohort client's for an
    aggregate (scoring only; never given to attacks)."""
    xs, ys = [], []
    for client, batches in observed_batches(run.root, observation).items():
        indices = list(dict.fromkeys(i for batch in batches for i in batch))
        subset = data.client(client)[0].subset(indices)
        xs.append(subset.x)
        ys.append(subset.y)
    return torch.cat(xs), torch.cat(ys)


def attack_run(
    run: RunDirectory,
    scenario: Scenario,
    specs: list[PluginSpec],
    console: Console,
    rounds: list[int] | None = None,
    clients: list[int] | None = None,
) -> None:
    """Run every attack in `specs` on what its threat model grants; skip what is done.

    `rounds`/`clients` restrict gradient attacks to those observations (`fedsim attack --round`).
    """
    for spec in specs:
        attack = ATTACKS.get(spec.name)(spec.params, seed=derive_seed(scenario.seed, "attack", spec.name))
        if isinstance(attack, MembershipAttack):
            stage = partial(membership.attack_membership, gradient_target=gradient_target)
        else:
            stage = attack_observations if isinstance(attack, GradientAttack) else model_leakage.attack_model
        if rounds or clients:
            if not isinstance(attack, GradientAttack):
                raise UserError(
                    f"--round/--client select recorded updates; attack '{spec.name}' attacks "
                    "the final model: drop them"
                )
            stage = partial(attack_observations, rounds=rounds, clients=clients)
        stage(run, scenario, spec, attack, console)


def select_observations(
    observations: list[Observation], run: RunDirectory, rounds: list[int] | None, clients: list[int] | None
) -> list[Observation]:
    """The observations of `rounds` and `clients` (all when None); a one-line UserError
    names a round or client that was never recorded."""
    for flag, wanted, recorded in (
        ("--round", rounds, sorted({o.server_round for o in observations})),
        ("--client", clients, sorted({o.client for o in observations if not o.aggregate_of})),
    ):
        missing = sorted(set(wanted or ()) - set(recorded))
        if missing:
            listed = ", ".join(map(str, recorded)) or "no single client (only aggregates, e.g. under secagg_plus)"
            raise UserError(f"{flag} {missing[0]}: '{run.root}' recorded no observation of it; recorded: {listed}")
    return [
        o for o in observations
        if (not rounds or o.server_round in rounds) and (not clients or o.client in clients)
    ]  # fmt: skip


def attack_observations(
    run: RunDirectory,
    scenario: Scenario,
    spec: PluginSpec,
    attack: Attack,
    console: Console,
    rounds: list[int] | None = None,
    clients: list[int] | None = None,
) -> None:
    """A gradient attack on every recorded observation, scored against the ground truth.

    The pending observations of one round go to the attack together (`reconstruct_many`), so
    an attack that vectorises over targets optimises them as one problem. The client's true
    labels enter a target only when the attack asks for them (`labels: known`).
    """
    observations = select_observations(load_observations(run.root), run, rounds, clients)
    if not observations:
        raise UserError(
            f"'{run.root}' has no recorded observations; set observer.rounds and observer.clients"
        )
    data = federated_data(scenario.data, scenario.public().seed)  # the partitions the clients held
    out_dir = run.attack_dir(spec, scenario)
    prepared = False
    pending: dict[int, list[tuple[Observation, torch.Tensor, torch.Tensor]]] = {}
    for observation in observations:
        stem = observation.stem
        result_path = out_dir / f"{stem}.json"
        params = spec.model_dump(mode="json")
        if result_path.exists() and read_record(result_path, "attack")["attack"] == params:
            continue
        if not all(t.isfinite().all() for t in observation.update.values()):
            console.print(
                f"attack {spec.name}: round {observation.server_round} {observation.label} "
                "sent a NaN or infinite update (training diverged); nothing to attack"
            )
            atomic_write_json(result_path, {"attack": params, "skipped": "non-finite update"})
            continue
        truth_x, truth_y = ground_truth(run, observation, data)
        if len(truth_x) == 0:  # e.g. every Poisson-sampled DP-SGD batch came out empty
            console.print(
                f"attack {spec.name}: round {observation.server_round} {observation.label} "
                "trained on no examples; nothing to score"
            )
            atomic_write_json(result_path, {"attack": params, "skipped": "no training examples"})
            continue
        if not prepared:  # once, and only when an observation is left to attack
            attack.prepare(auxiliary_data(data, scenario), run.root / model_leakage.CACHE, console)
            prepared = True
        pending.setdefault(observation.server_round, []).append((observation, truth_x, truth_y))
    judge = None
    if pending and data.test.x.dim() == 4 and not data.test.y.is_floating_point():
        judge = train_judge(
            data.test, scenario.data.model_dump(mode="json"), derive_seed(scenario.seed, "judge"),
            run.root / model_leakage.CACHE, console,
        )  # fmt: skip
    for group in pending.values():
        targets = [
            replace(gradient_target(o, scenario, data), known_labels=y if attack.wants_known_labels else None)
            for o, _, y in group
        ]  # fmt: skip
        started = time.perf_counter()
        with attack_progress(attack, console, f"attack {spec.name}, round {group[0][0].server_round}"):
            recons = attack.reconstruct_many(targets)
        seconds = (time.perf_counter() - started) / len(group)
        for (observation, truth_x, truth_y), recon in zip(group, recons, strict=True):
            stem = observation.stem
            scores = score_reconstruction(recon.images, truth_x, recon.labels, truth_y, recon.details, judge)
            scores |= zero_knowledge_baseline(truth_x, data.test)
            if truth_x.dim() == 4:
                save_image_grid(truth_x, recon.images, out_dir / f"{stem}.png", title=f"{spec.name} {stem}")
            save_reconstruction(recon, out_dir / f"{stem}.safetensors")
            record = {
                "attack": spec.model_dump(mode="json"),
                "threat_model": attack.threat_model,
                "round": observation.server_round,
                "client": observation.client,
                "attack_loss": recon.attack_loss,
                "seconds": round(seconds, 3),
                "targets_attacked_together": len(group),
                **scores,
                "details": recon.details,
            }
            atomic_write_json(out_dir / f"{stem}.json", record)
            console.print(
                f"attack {spec.name} on round {observation.server_round} {observation.label}: "
                f"{describe_scores(scores)} ({seconds:.1f} s)"
            )


def write_summary(run: RunDirectory, scenario: Scenario) -> dict[str, Any]:
    """Utility, privacy spent and leakage of the run, from the files on disk."""
    rounds = list(run.metrics())
    last = rounds[-1] if rounds else {}
    summary: dict[str, Any] = {
        "scenario": scenario.name,
        "run_dir": str(run.root),
        "training": read_record(run.training_path) if run.training_done else None,
        # each epsilon with its unit, as the server recorded it (see `fedsim.core.privacy`)
        "privacy": last.get("privacy", []),
        "defenses": [d.model_dump(mode="json") for d in scenario.defenses],
        "attacks": {},
    }
    for attack_dir in sorted(run.attacks_dir.glob("*")) if run.attacks_dir.exists() else []:
        records = [r for p in sorted(attack_dir.glob("*.json")) if "psnr" in (r := read_record(p))]
        inversions = [
            r for p in sorted(attack_dir.glob("class_*.json")) if "top1_accuracy" in (r := read_record(p))
        ]
        if inversions:
            summary["attacks"][attack_dir.name] = model_leakage.summarise(inversions)
        memberships = [r for p in sorted(attack_dir.glob("*.json")) if "auc" in (r := read_record(p))]
        if memberships:
            summary["attacks"][attack_dir.name] = membership.summarise(memberships)
        if records:
            summary["attacks"][attack_dir.name] = summarise_reconstructions(records)
        for scores in summary["attacks"].values():
            scores.setdefault("leaked", leaks(scores))
    atomic_write_json(run.summary_path, summary)
    return summary


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"fedsim summary: {summary['scenario']}")
    table.add_column("what")
    table.add_column("value", justify="right", overflow="fold")  # paths whole, never cut with "…"
    training = summary["training"] or {}
    if training.get("status") == DIVERGED:
        table.add_row("status", "[red]diverged[/]: NaN or infinite weights")
    if training.get("status") == FAILED:
        table.add_row("status", f"[red]failed[/]: {training.get('reason')}")
    for key in ("final_test_accuracy", "best_test_accuracy", "wall_time_s"):
        if training.get(key) is not None:
            table.add_row(key.replace("_", " "), f"{training[key]:.3f}")
    for entry in summary["privacy"]:
        epsilon = entry["epsilon"]  # null: infinite (noise 0, clipping only)
        table.add_row(f"epsilon ({entry['unit']})", "inf" if epsilon is None else f"{epsilon:.3f}")
    for name, scores in summary["attacks"].items():
        table.add_row(
            f"{name} ({scores['targets']} targets)",
            model_leakage.describe(scores)
            if "top1_accuracy" in scores
            else membership.describe_summary(scores)
            if "auc" in scores
            else describe_scores(scores),
        )
        table.add_row("", describe_meaning(scores))
    table.add_row("run directory", summary["run_dir"])
    return table
