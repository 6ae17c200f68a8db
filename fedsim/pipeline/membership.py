"""The membership stage: membership-inference attacks on a run, scored against its records.

Candidates are members and (at least as many) non-members, drawn with a seed derived from the
scenario seed and the attack's name; who is which comes from the run's own records and never enters
the attack's `MembershipTarget` (`fedsim.core.membership`):

- model-holder attacks (`granted = "model"`): members are examples some client trains on (the
  union of the clients' train splits, `fedsim.pipeline.shadows.pool_members`), non-members as
  many examples of the global test set (one draw shared by every such attack of the run); the
  rest of the test set is the attacker's population data.
  Reference models are shadow federations of the same scenario (`train_shadows`, cached under
  `cache/shadows/`). Output: `attacks/<name>/final_model.json` and its ROC curve
  `final_model.roc.{json,png}`.
- curious-server attacks (`granted = "update"`), on every recorded observation: members are the
  examples the client trained on that round (`ground_truth/`), non-members test examples.
  Client-level attacks (`client_membership`) get sources of `source_size` examples each: half
  drawn from the client's round examples, half from the test set. Output:
  `attacks/<name>/round_R_client_C.json` (`round_R_aggregate` under secure aggregation,
  where the members are the whole cohort's) and `.roc.{json,png}`.

- audits (`granted = "canaries"`): the candidates are the run's canaries (`data.canaries`),
  members the included ones; besides the scores, Steinke et al.'s one-run epsilon lower bound
  against the reported example-level epsilon. Output: `attacks/<name>/audit.json`,
  `canaries.json` (which canary went where), `audit.roc.{json,png}`.

Scores (`fedsim.evaluation.membership`): ROC AUC, TPR at FPR 0.1 % and 1 %, balanced accuracy.
A result already written with the same attack parameters is not recomputed; other parameters
(`fedsim attack --set`) write `attacks/<name>-<hash>` (`RunDirectory.attack_dir`), as every stage does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from fedsim.core.attack import GradientTarget
from fedsim.core.config import PluginSpec, Scenario
from fedsim.core.errors import UserError
from fedsim.core.membership import MembershipAttack, MembershipTarget, ReferenceModel
from fedsim.core.results import RunDirectory, atomic_write_json, read_record
from fedsim.core.seeding import derive_seed
from fedsim.data.canaries import parameter_count
from fedsim.data.datasets import FederatedData, federated_data
from fedsim.evaluation.auditing import DEFAULT_BETA, gdp_audit, one_run_audit
from fedsim.evaluation.membership import SUMMARY_KEYS, describe, membership_scores, save_roc
from fedsim.federation.observer import Observation, load_observations, observed_batches
from fedsim.pipeline import model_leakage
from fedsim.pipeline.shadows import pool_members, shadow_population, train_shadows

MAX_CANDIDATES = 2000
"""At most this many candidates per target (at most half members), so big runs stay cheap."""
GAUSSIAN_BOUND = "gaussian_epsilon_bound"
"""Record/summary key of the Gaussian-trade-off epsilon lower bound (`auditing.gdp_audit`)."""

GradientTargetFactory = Callable[[Observation, Scenario, FederatedData], GradientTarget]


def draw_candidates(
    members: np.ndarray, non_members: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(candidates, is_member, unused non-members), at most `count` candidates in all.

    Up to half of them members; the rest non-members, of which half at least stay unused (the
    attacker's population data). More non-members than members is deliberate: TPR at FPR
    0.1 % needs 1,000 non-members to mean anything."""
    n_in = min(count // 2, len(members))
    n_out = min(count - n_in, len(non_members) // 2)
    if n_in == 0 or n_out == 0:
        raise UserError("membership inference needs members and at least two test examples")
    shuffled_out = rng.permutation(non_members)
    candidates = np.concatenate([rng.choice(members, n_in, replace=False), shuffled_out[:n_out]])
    return candidates, np.arange(n_in + n_out) < n_in, shuffled_out[n_out:]


def _write(
    out_dir: Path, spec: PluginSpec, attack: MembershipAttack, stem: str,
    scores: np.ndarray, truth: np.ndarray, seconds: float, extra: dict[str, Any], console: Console,
) -> None:  # fmt: skip
    result = membership_scores(scores, truth)
    save_roc(result.curve, out_dir / f"{stem}.roc", f"{spec.name} {stem}")
    record = {
        "attack": spec.model_dump(mode="json"),
        "threat_model": attack.threat_model,
        **extra,
        **result.as_dict(),
        "seconds": round(seconds, 3),
    }
    atomic_write_json(out_dir / f"{stem}.json", record)
    console.print(f"attack {spec.name} on {stem}: {describe(record)} ({seconds:.1f} s)")


def _done(out_dir: Path, spec: PluginSpec, stem: str) -> bool:
    path = out_dir / f"{stem}.json"
    return path.exists() and read_record(path, "attack")["attack"] == spec.model_dump(mode="json")


def attack_final_model(
    run: RunDirectory, scenario: Scenario, spec: PluginSpec, attack: MembershipAttack, console: Console
) -> None:
    """A model-holder membership attack on the final global model."""
    out_dir = run.attack_dir(spec, scenario)  # `fedsim attack --set` results go beside, not over
    if _done(out_dir, spec, "final_model"):
        return
    data = federated_data(scenario.data, scenario.public().seed)  # as the federation held it
    model = model_leakage.model_target(run, scenario, data).model
    # one draw for every model-holder attack of the run, so they share the shadows
    rng = np.random.default_rng(derive_seed(scenario.seed, "membership", "final_model"))
    members = np.flatnonzero(pool_members(data))
    # as many non-members as members: the shadows' halves then match the target's train size
    candidates, truth, population = draw_candidates(
        members, data.test_index, 2 * min(len(members), MAX_CANDIDATES // 2), rng
    )
    shadow_pool = shadow_population(data, candidates, rng)

    def reference_models(count: int) -> list[ReferenceModel]:
        return [
            ReferenceModel(s.model, s.members[candidates], s.members[population])
            for s in train_shadows(run, scenario, count, shadow_pool, console)
        ]

    target = MembershipTarget(
        model=model,
        x=data.pool.x[candidates],
        y=data.pool.y[candidates],
        population_x=data.pool.x[population],
        population_y=data.pool.y[population],
        input_shape=tuple(data.input_shape),
        num_classes=data.num_classes,
        reference_models=reference_models,
    )
    started = time.perf_counter()
    scores = np.asarray(attack.score(target), dtype=np.float64)
    _write(out_dir, spec, attack, "final_model", scores, truth, time.perf_counter() - started, {}, console)


def round_members(run: RunDirectory, observation: Observation, data: FederatedData) -> np.ndarray:
    """Pool indices of the examples behind an observation (the client's, or the cohort's)."""
    found: list[int] = []
    for client, batches in observed_batches(run.root, observation).items():
        train, _ = data.client_indices(client)
        # positions past the client's own examples are canaries (`data.canaries`): not in the pool
        used = sorted({i for batch in batches for i in batch if i < len(train)})
        found += data.train_index[train[used]].tolist()
    return np.unique(np.asarray(found, dtype=np.int64))


def attack_updates(
    run: RunDirectory,
    scenario: Scenario,
    spec: PluginSpec,
    attack: MembershipAttack,
    console: Console,
    gradient_target: GradientTargetFactory,
) -> None:
    """A curious-server membership attack on every recorded observation."""
    recorded = load_observations(run.root)
    if not recorded:
        raise UserError(
            f"'{run.root}' has no recorded observations; set observer.rounds and observer.clients"
        )
    data = federated_data(scenario.data, scenario.public().seed)
    source_size = getattr(spec.params, "source_size", None)
    out_dir = run.attack_dir(spec, scenario)
    for observation in [o for o in recorded if not _done(out_dir, spec, o.stem)]:
        rng = np.random.default_rng(derive_seed(scenario.seed, "membership", spec.name, observation.stem))
        members = round_members(run, observation, data)
        if len(members) == 0:  # e.g. every Poisson-sampled DP-SGD batch came out empty
            atomic_write_json(
                out_dir / f"{observation.stem}.json",
                {"attack": spec.model_dump(mode="json"), "skipped": "no training examples"},
            )
            continue
        sources = None
        if source_size is None:
            candidates, truth, _ = draw_candidates(members, data.test_index, MAX_CANDIDATES, rng)
        else:  # sources of `source_size` examples: half the client's, half the test set's
            groups = min(len(members), len(data.test_index) // 2) // source_size
            if groups == 0:
                raise UserError(f"attacks.{spec.name}.source_size={source_size} exceeds the client's examples")
            picked = rng.choice(members, groups * source_size, replace=False)
            outside = rng.choice(data.test_index, groups * source_size, replace=False)
            candidates = np.concatenate([picked, outside])
            sources = np.repeat(np.arange(2 * groups), source_size)
            truth = np.arange(2 * groups) < groups
        update = gradient_target(observation, scenario, data)
        target = MembershipTarget(
            model=update.model,  # the global model the server sent that round
            x=data.pool.x[candidates],
            y=data.pool.y[candidates],
            population_x=data.test.x[:0],
            population_y=data.test.y[:0],
            input_shape=tuple(data.input_shape),
            num_classes=data.num_classes,
            reference_models=_no_reference_models,
            update=update,
            sources=sources,
        )
        started = time.perf_counter()
        scores = np.asarray(attack.score(target), dtype=np.float64)
        extra = {"round": observation.server_round, "client": observation.client}
        _write(out_dir, spec, attack, observation.stem, scores, truth, time.perf_counter() - started, extra, console)


def reported_epsilon(run: RunDirectory, level: str = "example") -> dict[str, Any] | None:
    """The largest `level` (example or client) epsilon of the run's last round (with its
    unit), or None."""
    rounds = list(run.metrics())
    entries = [e for e in (rounds[-1].get("privacy", []) if rounds else []) if e["kind"] == level]
    return max(entries, key=lambda e: e["epsilon"]) if entries else None


def attack_canaries(
    run: RunDirectory,
    scenario: Scenario,
    spec: PluginSpec,
    attack: MembershipAttack,
    console: Console,
    gradient_target: GradientTargetFactory,
) -> None:
    """An audit: the attack scores the run's canaries, Steinke et al.'s one-run bound follows.

    The bound is compared with the reported epsilon of the attack's `audited_level` (example:
    one example added or removed; client: one client's update zeroed); a bound above it is a
    privacy bug (`violation`). Without such an epsilon the bound is reported alone (delta 1e-5).
    """
    out_dir = run.attack_dir(spec, scenario)
    if _done(out_dir, spec, "audit"):
        return
    data = federated_data(scenario.data, scenario.public().seed)
    canaries = data.canaries
    if canaries is None:
        raise UserError(f"attack '{spec.name}' audits canaries: set data.canaries.count")
    atomic_write_json(out_dir / "canaries.json", {"canaries": canaries.describe()})
    updates = tuple(
        gradient_target(o, scenario, data) for o in load_observations(run.root) if not o.aggregate_of
    ) if attack.sees_updates else ()  # fmt: skip
    model = model_leakage.model_target(run, scenario, data).model
    target = MembershipTarget(
        model=model,
        x=canaries.x,
        y=canaries.y,
        population_x=data.test.x,
        population_y=data.test.y,
        input_shape=tuple(data.input_shape),
        num_classes=data.num_classes,
        reference_models=_no_reference_models,
        canary_clients=canaries.client,
        updates=updates,
        canary_coordinates=canaries.coordinates(parameter_count(model)) if canaries.kind != "input" else None,
    )
    started = time.perf_counter()
    scores = np.asarray(attack.score(target), dtype=np.float64)
    # the trials themselves, so audits of several runs can be pooled (benchmarks/gradient_audit.py)
    atomic_write_json(out_dir / "trials.json", {"scores": scores.tolist(), "included": canaries.included.tolist()})
    reported = reported_epsilon(run, getattr(attack, "audited_level", "example"))
    delta = reported["delta"] if reported else 1e-5
    beta = getattr(spec.params, "beta", DEFAULT_BETA)
    audit = one_run_audit(scores, canaries.included, delta, beta)
    # an infinite reported epsilon (noise 0: clipping only) is recorded as null: no violation
    finite = reported["epsilon"] if reported else None

    def above(bound: float) -> bool:
        return finite is not None and bound > finite

    extra: dict[str, Any] = {
        "audit": audit.as_dict(),
        "epsilon_lower_bound": audit.epsilon_lower_bound,
        "reported": reported,
        "violation": above(audit.epsilon_lower_bound),
    }
    if getattr(attack, "independent_trials", False):  # the Gaussian-trade-off bound, for claims of a Gaussian mechanism
        gaussian = gdp_audit(scores, canaries.included, delta, beta)
        extra |= {"gaussian_audit": gaussian.as_dict(), GAUSSIAN_BOUND: gaussian.epsilon_lower_bound,
                  "gaussian_violation": above(gaussian.epsilon_lower_bound)}  # fmt: skip
    _write(out_dir, spec, attack, "audit", scores, canaries.included, time.perf_counter() - started, extra, console)
    if extra["violation"]:
        console.print(
            f"[bold red]privacy bug[/]: audited epsilon >= {audit.epsilon_lower_bound:.3f} exceeds the "
            f"reported {reported['epsilon']:.3f} ({reported['unit']})"
        )


def _no_reference_models(count: int) -> list[ReferenceModel]:
    raise UserError("update-based membership attacks get no reference models")


def attack_membership(
    run: RunDirectory,
    scenario: Scenario,
    spec: PluginSpec,
    attack: MembershipAttack,
    console: Console,
    gradient_target: GradientTargetFactory,
) -> None:
    """Run one membership attack on what its threat model grants (see the module doc)."""
    if attack.granted == "model":
        attack_final_model(run, scenario, spec, attack, console)
    elif attack.granted == "canaries":
        attack_canaries(run, scenario, spec, attack, console, gradient_target)
    else:
        attack_updates(run, scenario, spec, attack, console, gradient_target)


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of each membership score over an attack's targets (final model or
    observations); an audit adds its epsilon lower bound and whether it exceeds the reported one."""
    summary: dict[str, Any] = {
        "targets": len(records),
        **{key: float(np.mean([r[key] for r in records])) for key in SUMMARY_KEYS},
    }
    audits = [r for r in records if "epsilon_lower_bound" in r]
    if audits:
        summary["epsilon_lower_bound"] = max(r["epsilon_lower_bound"] for r in audits)
        summary["audit_violation"] = any(r["violation"] for r in audits)
    gaussian = [r for r in records if GAUSSIAN_BOUND in r]
    if gaussian:
        summary[GAUSSIAN_BOUND] = max(r[GAUSSIAN_BOUND] for r in gaussian)
        summary["gaussian_violation"] = any(r["gaussian_violation"] for r in gaussian)
    return summary


def describe_summary(scores: dict[str, Any]) -> str:
    """One line for the summary table: the mean scores, and an audit's bound and verdict."""
    text = describe(scores)
    if "epsilon_lower_bound" in scores:
        text += f", epsilon >= {scores['epsilon_lower_bound']:.3f}"
        if scores["audit_violation"]:
            text += " (above the reported epsilon: privacy bug)"
    if GAUSSIAN_BOUND in scores:
        text += f", Gaussian trade-off: epsilon >= {scores[GAUSSIAN_BOUND]:.3f}"
        if scores["gaussian_violation"]:
            text += " (above the reported epsilon of a Gaussian mechanism)"
    return text
