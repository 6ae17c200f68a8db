"""Shadow federations: the same scenario trained on other data splits, for LiRA and RMIA.

A reference-model membership attack (threat model 3 plus the power to train) needs models
trained exactly like the target, some on each candidate example and some not. fedsim trains
them by running the target's own scenario through the same federation engine
(`run_federation`: same model, strategy, defenses, rounds) with only the seed changed,
`derive_seed(seed, "shadow", k)`, and the training examples chosen as Carlini et al. (2022,
sec. 5) choose them: the attacker's shadow population (the candidates, topped up with other
pool examples to twice the target's training-set size) is split in random halves, shadow 2j
trains on one half and shadow 2j + 1 on the other (`data.train_pool`). Each candidate is thus IN
for exactly half of any even number of shadows, and a shadow trains on as many examples as the
target. Nothing of the target run's randomness is reused (its secret seed is dropped), no
attack runs and nothing is observed.

Each shadow is a run directory under `cache/shadows/shadow_KK/` of the target run (its
scenario.yaml, with the pool indices its clients trained on, metrics.jsonl, model.safetensors).
A finished shadow is never retrained, so a killed attack resumes, and every reference attack of
the run (LiRA online and offline, RMIA, whatever their settings: no attack setting enters a
shadow's scenario) shares the same shadows. The cache is keyed by the shadow's scenario read
back with today's defaults (`shadow_directory`), so a cache written before fedsim gained a
field is still used, and one of another shadow recipe is retrained, never an error.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import load_file
from torch import nn

from fedsim.core.config import CanaryConfig, ObserverConfig, Scenario
from fedsim.core.errors import UserError
from fedsim.core.results import RunDirectory, holds_scenario, prepare_run_directory
from fedsim.core.seeding import derive_seed
from fedsim.data.datasets import FederatedData, federated_data
from fedsim.federation.simulation import run_federation
from fedsim.models import federated_model

SHADOWS = "shadows"


@dataclass(frozen=True)
class Shadow:
    """A trained shadow federation's final model and which pool examples it trained on."""

    model: nn.Module
    members: np.ndarray  # bool over the private pool (`FederatedData.pool`)


def pool_members(data: FederatedData) -> np.ndarray:
    """Which pool examples some client trains on (bool over `data.pool`): the union of the
    clients' train splits; the test set and the clients' validation splits are out."""
    members = np.zeros(len(data.pool), dtype=bool)
    for partition in range(data.num_partitions):
        train, _ = data.client_indices(partition)
        members[data.train_index[train]] = True
    return members


def shadow_population(
    data: FederatedData, candidates: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """The pool examples shadows train on halves of: the candidates, topped up with random
    other pool examples to twice the target's client data (train and validation splits), as
    far as the pool allows."""
    size = 2 * len(data.train_index)
    others = np.setdiff1d(np.arange(len(data.pool)), candidates)
    extra = rng.choice(others, min(max(size - len(candidates), 0), len(others)), replace=False)
    return np.concatenate([candidates, extra])


def shadow_train_pool(scenario: Scenario, population: np.ndarray, index: int) -> list[int]:
    """Shadow `index`'s training examples: one of the two random halves of `population` drawn
    for the pair (2j, 2j + 1), shadow 2j the first half, 2j + 1 the second."""
    rng = np.random.default_rng(derive_seed(scenario.seed, "shadow-halves", index // 2))
    order = rng.permutation(population)
    half = len(order) // 2
    return sorted(order[:half].tolist() if index % 2 == 0 else order[half:].tolist())


def shadow_scenario(scenario: Scenario, index: int, train_pool: list[int]) -> Scenario:
    """The target's scenario with a fresh seed, `train_pool` as its training examples, no
    attacks or canaries, nothing observed, the model saved."""
    return scenario.model_copy(
        update={
            "name": f"{scenario.name}-shadow",
            "seed": derive_seed(scenario.seed, "shadow", index) % 2**31,
            "attacks": [],
            "observer": ObserverConfig(rounds="none"),
            "data": scenario.data.model_copy(update={"canaries": CanaryConfig(), "train_pool": train_pool}),
            "output": scenario.output.model_copy(update={"save_model": True}),
            "simulation": scenario.simulation.model_copy(update={"secret_seed": None}),
        }
    )


def shadow_directory(root: Path, shadow: Scenario, console: Console) -> RunDirectory:
    """The cache directory `root` for `shadow`: one that holds another scenario (other
    examples, an older shadow recipe) is deleted, so the shadow is trained again; one written
    by an older fedsim that reads back as `shadow` is kept (`holds_scenario`)."""
    cached = RunDirectory(root)
    if cached.scenario_path.is_file() and not holds_scenario(cached, shadow):
        console.print(f"{root} holds another shadow scenario (an older fedsim's?): training it again")
        shutil.rmtree(root)
    return prepare_run_directory(shadow, root)


def train_shadows(
    run: RunDirectory, scenario: Scenario, count: int, population: np.ndarray, console: Console
) -> list[Shadow]:
    """`count` shadow federations of `scenario` on halves of `population` (pool indices),
    trained once and cached in `run`."""
    target = federated_data(scenario.data, scenario.public().seed)
    shadows = []
    for index in range(count):
        shadow = shadow_scenario(scenario, index, shadow_train_pool(scenario, population, index))
        directory = shadow_directory(run.root / "cache" / SHADOWS / f"shadow_{index:02d}", shadow, console)
        data = federated_data(shadow.data, shadow.public().seed)
        if not (torch.equal(data.pool.x, target.pool.x) and torch.equal(data.pool.y, target.pool.y)):
            raise UserError(
                f"dataset '{scenario.data.dataset.name}' changes with the seed, so shadow models "
                "cannot be trained on the same population; use a fixed dataset (e.g. digits)"
            )
        if directory.needs_training:
            console.print(f"shadow federation {index + 1}/{count} -> {directory.root}")
            directory.reset_training()
            run_federation(shadow, directory)
        model = federated_model(shadow, data.input_shape, data.num_classes)
        model.load_state_dict(load_file(str(directory.model_path)))
        shadows.append(Shadow(model.eval().requires_grad_(False), pool_members(data)))
    return shadows
