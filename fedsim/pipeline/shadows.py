"""Shadow federations: the same scenario trained on other data splits, for LiRA and RMIA.

A reference-model membership attack (threat model 3 plus the power to train) needs models
trained exactly like the target, some on each candidate example and some not. fedsim trains
them by running the target's own scenario through the same federation engine
(`run_federation`: same model, strategy, defenses, rounds) with only the seed changed,
`derive_seed(seed, "shadow", k)`: the test split and the partitions are drawn anew, so each
example of the private pool lands in some shadow's clients' training data and not in others'.
Nothing of the target run's randomness is reused (its secret seed is dropped), no attack runs
and nothing is observed.

Each shadow is a run directory under `cache/shadows/shadow_KK/` of the target run (its
scenario.yaml, metrics.jsonl, model.safetensors), plus `members.json`: the pool indices its
clients trained on. A finished shadow is never retrained, so a killed attack resumes, and
every reference attack of the run (LiRA online and offline, RMIA) shares the same shadows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import load_file
from torch import nn

from fedsim.core.config import CanaryConfig, ObserverConfig, Scenario
from fedsim.core.errors import UserError
from fedsim.core.results import RunDirectory, atomic_write_json, prepare_run_directory, read_record
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


def shadow_scenario(scenario: Scenario, index: int) -> Scenario:
    """The target's scenario with a fresh seed, no attacks or canaries, nothing observed, the
    model saved."""
    return scenario.model_copy(
        update={
            "name": f"{scenario.name}-shadow",
            "seed": derive_seed(scenario.seed, "shadow", index) % 2**31,
            "attacks": [],
            "observer": ObserverConfig(rounds="none"),
            "data": scenario.data.model_copy(update={"canaries": CanaryConfig()}),
            "output": scenario.output.model_copy(update={"save_model": True}),
            "simulation": scenario.simulation.model_copy(update={"secret_seed": None}),
        }
    )


def train_shadows(run: RunDirectory, scenario: Scenario, count: int, console: Console) -> list[Shadow]:
    """`count` shadow federations of `scenario`, trained once and cached in `run`."""
    target = federated_data(scenario.data, scenario.public().seed)
    shadows = []
    for index in range(count):
        shadow = shadow_scenario(scenario, index)
        directory = prepare_run_directory(shadow, run.root / "cache" / SHADOWS / f"shadow_{index:02d}")
        data = federated_data(shadow.data, shadow.public().seed)
        if not (torch.equal(data.pool.x, target.pool.x) and torch.equal(data.pool.y, target.pool.y)):
            raise UserError(
                f"dataset '{scenario.data.dataset.name}' changes with the seed, so shadow models "
                "cannot be trained on the same population; use a fixed dataset (e.g. digits)"
            )
        members_path = directory.root / "members.json"
        if not (directory.training_done and members_path.is_file()):
            console.print(f"shadow federation {index + 1}/{count} -> {directory.root}")
            directory.reset_training()
            run_federation(shadow, directory)
            atomic_write_json(members_path, {"members": np.flatnonzero(pool_members(data)).tolist()})
        members = np.zeros(len(data.pool), dtype=bool)
        members[read_record(members_path, "members")["members"]] = True
        model = federated_model(shadow, data.input_shape, data.num_classes)
        model.load_state_dict(load_file(str(directory.model_path)))
        shadows.append(Shadow(model.eval().requires_grad_(False), members))
    return shadows
