"""Label counts at the update's scale against an estimated scale, on a sweep's recorded updates.

    python benchmarks/label_scale.py runs/sweeps/gifd_vs_ig

For every finished cell with batches of more than one image, infers each attacked client's
labels both ways (`fedsim.attacks.label_inference.infer_labels`, scale "update" and "estimated")
and prints the mean label accuracy against the client's true labels (the run's ground
truth, read here only to score).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fedsim.attacks.gradient_matching import mean_step_gradient
from fedsim.attacks.label_inference import infer_labels
from fedsim.evaluation.metrics import label_accuracy
from fedsim.data.datasets import federated_data
from fedsim.federation.observer import load_ground_truth, load_observations
from fedsim.core.results import RunDirectory
from fedsim.pipeline.runner import gradient_target, load_run_scenario
from fedsim.experiments.sweep_table import load_results

SCALES = ("update", "estimated")


def cell_accuracy(run_dir: Path) -> dict[str, float]:
    """Mean label accuracy over the run's observations, per label scale."""
    run = RunDirectory(run_dir)
    scenario = load_run_scenario(run)
    data = federated_data(scenario.data, scenario.public().seed)  # the clients' partitions
    scores: dict[str, list[float]] = {scale: [] for scale in SCALES}
    for observation in load_observations(run.root):
        target = gradient_target(observation, scenario, data)
        used = [i for batch in load_ground_truth(run.root, observation.server_round, observation.client) for i in batch]
        truth = data.client(observation.client)[0].y[used]
        for scale in SCALES:
            labels, _ = infer_labels(
                target, mean_step_gradient(target), len(used), torch.Generator().manual_seed(0), "probe", scale
            )
            scores[scale].append(label_accuracy(labels, truth))
    return {scale: sum(values) / len(values) for scale, values in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args()
    table = load_results(args.sweep_dir)
    table = table[(table["status"] == "done") & (table["training.batch_size"] > 1)]
    print("| batch | defenses | seed | update scale | estimated scale |\n|---|---|---|---|---|")
    for _, row in table.iterrows():
        accuracy = cell_accuracy(Path(row["run_dir"]))
        print(
            f"| {row['training.batch_size']} | {row['defenses']} | {row['seed']} | "
            f"{accuracy['update']:.2f} | {accuracy['estimated']:.2f} |"
        )


if __name__ == "__main__":
    main()
