"""The model stage: model-inversion attacks on the final global model, judged independently.

Threat model 3 (DESIGN.md): the attacker holds the federation's final model (white-box) and
public images of classes the federation never trained on (`data.public_classes`). For each
private class the attack reconstructs images (`Attack.reconstruct` on a `ModelTarget` naming
that class); an evaluation classifier the attacker never sees (`fedsim.evaluation.mi_evaluation`) then
scores them, next to a zero-effort baseline (`public_baseline`) and a zero-knowledge one (the
mean public image, `zero_knowledge_image`). Output, per class:
`attacks/<name>/class_CC.json` (scores) and `class_CC.png` (the nearest private example above
each reconstruction). A class already scored with the same
attack parameters is not recomputed, so a killed attack resumes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from rich.console import Console
from safetensors import SafetensorError
from safetensors.torch import load_file

from fedsim.evaluation.metrics import save_image_grid
from fedsim.evaluation.mi_evaluation import EvaluationParams, load_or_train_evaluator, zero_knowledge_image
from fedsim.core.attack import Attack, ModelTarget
from fedsim.core.config import PluginSpec, Scenario
from fedsim.data.datasets import FederatedData, federated_data
from fedsim.core.errors import UserError
from fedsim.models import federated_model
from fedsim.core.results import RunDirectory, atomic_write_json, read_record
from fedsim.core.seeding import derive_seed
from fedsim.pipeline.progress import attack_progress
from fedsim.pipeline.reconstructions import save_reconstruction

CACHE = "cache"
SCORES = (
    "top1_accuracy",
    "top5_accuracy",
    "knn_distance",
    "target_confidence",
    "public_baseline_top1",
    "public_baseline_knn",
    "mean_image_baseline_top1",
    "mean_image_baseline_knn",
    "chance_top1",
)


def model_target(run: RunDirectory, scenario: Scenario, data: FederatedData) -> ModelTarget:
    """The final global model (eval mode, frozen) and the public data: all a model holder has."""
    if not run.model_path.is_file():
        raise UserError(
            f"'{run.root}' has no final model (model.safetensors); model-inversion attacks "
            "need a finished training with output.save_model: true"
        )
    model = federated_model(scenario, data.input_shape, data.num_classes)
    try:
        model.load_state_dict(load_file(str(run.model_path)))
    except (RuntimeError, SafetensorError) as err:
        raise UserError(f"'{run.model_path}' does not fit the run's model: {err}") from None
    model.eval().requires_grad_(False)
    return ModelTarget(
        model=model,
        input_shape=tuple(data.input_shape),
        num_classes=data.num_classes,
        target_classes=list(data.private_classes),
        public_x=data.public.x,
        public_y=data.public.y,
    )


def attacked_classes(spec: PluginSpec, data: FederatedData) -> list[int]:
    """The attack's `target_classes`, checked to be private, or every private class."""
    chosen = getattr(spec.params, "target_classes", None) or data.private_classes
    bad = [c for c in chosen if c not in data.private_classes]
    if bad:
        raise UserError(
            f"attacks.{spec.name}.target_classes: {bad} are not private classes; "
            f"the private classes are {data.private_classes}"
        )
    return list(chosen)


def public_baseline(target: ModelTarget, cls: int, count: int) -> torch.Tensor:
    """The zero-effort attack: the `count` public images the target is surest are `cls`.

    Scored like an attack, it says how much of an attack's accuracy the public data and the
    target's labels alone already give (public digits the target maps to a private class).
    """
    with torch.no_grad():
        confidence = target.model(target.public_x).softmax(-1)[:, cls]
    return target.public_x[confidence.topk(min(count, len(confidence))).indices]


def attack_model(
    run: RunDirectory, scenario: Scenario, spec: PluginSpec, attack: Attack, console: Console
) -> None:
    """Run a model-inversion attack on every target class not yet scored, and score it."""
    data = federated_data(scenario.data, scenario.public().seed)  # as the federation held it
    target = model_target(run, scenario, data)
    out_dir = run.attack_dir(spec, scenario)
    params = spec.model_dump(mode="json")

    def done(cls: int) -> bool:
        path = out_dir / f"class_{cls:02d}.json"
        return path.exists() and read_record(path, "attack")["attack"] == params

    todo = [c for c in attacked_classes(spec, data) if not done(c)]
    if not todo:
        return
    workspace = run.root / CACHE  # the evaluator's and the attack's, both per run
    evaluator = load_or_train_evaluator(
        data,
        getattr(spec.params, "evaluation", None) or EvaluationParams(),
        scenario.model.name,
        derive_seed(scenario.seed, "mi-evaluator"),
        workspace,
        console,
    )
    attack.prepare(target, workspace, console)
    training = read_record(run.training_path) if run.training_done else {}
    guess, guess_name = zero_knowledge_image(target.public_x, target.input_shape)
    for cls in todo:
        torch.manual_seed(derive_seed(attack.seed, "class", cls))  # a stochastic target's noise
        started = time.perf_counter()
        with attack_progress(attack, console, f"attack {spec.name}, class {cls}"):
            recon = attack.reconstruct(dataclasses.replace(target, target_classes=[cls]))
        seconds = time.perf_counter() - started
        score = evaluator.score(recon.images, cls)
        baseline = (
            evaluator.score(public_baseline(target, cls, len(recon.images)), cls)
            if len(target.public_x)
            else None
        )
        zero_knowledge = evaluator.score(guess, cls)
        stem = f"class_{cls:02d}"
        save_image_grid(
            score.nearest,
            recon.images,
            out_dir / f"{stem}.png",
            title=f"{spec.name}, class {cls}: nearest private example (top), reconstruction",
        )
        save_reconstruction(recon, out_dir / f"{stem}.safetensors")
        record = {
            "attack": params,
            "threat_model": attack.threat_model,
            "class": cls,
            "images": len(recon.images),
            "top1_accuracy": score.top1_accuracy,
            "top5_accuracy": score.top5_accuracy,
            "knn_distance": score.knn_distance,
            "correct": score.correct,
            "public_baseline_top1": baseline.top1_accuracy if baseline else None,
            "public_baseline_knn": baseline.knn_distance if baseline else None,
            "mean_image_baseline_top1": zero_knowledge.top1_accuracy,
            "mean_image_baseline_knn": zero_knowledge.knn_distance,
            "mean_image_baseline": guess_name,
            "chance_top1": 1 / len(evaluator.classes),  # a uniform guess among the private classes
            "attack_loss": recon.attack_loss,
            **recon.details,
            "seconds": round(seconds, 3),
            "target_test_accuracy": training.get("final_test_accuracy"),
            "evaluator_test_accuracy": evaluator.test_accuracy,
        }
        atomic_write_json(out_dir / f"{stem}.json", record)
        console.print(
            f"attack {spec.name} on class {cls}: top-1 {score.top1_accuracy:.2f}, "
            f"KNN distance {score.knn_distance:.2f} ({seconds:.1f} s)"
        )


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean scores over the attacked classes (`targets`; each class has as many images)."""
    summary: dict[str, Any] = {"targets": len(records)}
    for key in SCORES:
        values = [r[key] for r in records if r.get(key) is not None]
        summary[key] = sum(values) / len(values) if values else None
    summary["evaluator_test_accuracy"] = records[0]["evaluator_test_accuracy"]
    summary["mean_image_baseline"] = records[0].get("mean_image_baseline")
    summary["target_test_accuracy"] = records[0]["target_test_accuracy"]
    return summary


def describe(scores: dict[str, Any]) -> str:
    """One line for the run's summary table."""
    top5 = scores["top5_accuracy"]
    return (
        f"attack acc top-1 {scores['top1_accuracy']:.2f}"
        + (f"  top-5 {top5:.2f}" if top5 is not None else "")
        + f"  KNN {scores['knn_distance']:.2f}"
        + (
            f"  (public baseline {scores['public_baseline_top1']:.2f})"
            if scores.get("public_baseline_top1") is not None
            else ""
        )
    )
