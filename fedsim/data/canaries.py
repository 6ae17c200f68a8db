"""Audit canaries: mislabelled examples, each slipped into a client's data with probability p.

An auditor tests a DP claim by planting examples whose presence an attack can detect and
checking that it cannot detect them better than the claimed epsilon allows
(`fedsim.evaluation.auditing`). fedsim's input-space canaries (`data.canaries`) are `count`
examples of the global test set (removed from it) given a wrong label, y' = (y + s) mod C with
s uniform in 1..C-1: a model that memorises a canary fits a label no other example supports,
the strongest signal a black-box attack on the final model can get. Each canary is designated
to one of `clients` (round-robin, known to the auditor), and included independently with
probability `probability` (1/2 for Steinke et al.'s one-run audit): only then is it appended
to its client's training data.

Gradient canaries (`kind: gradient`, white-box audits of DP-SGD, Steinke et al. 2023's
Dirac canaries) are no examples: canary i is a per-example gradient that is zero except on one
coordinate of the trainable parameters (`coordinates`, distinct, drawn from the data seed),
where it equals the clipping norm C. DP-SGD adds it to the clipped sum before the noise in
every step the canary is sampled for, exactly as it would add a real example's clipped
gradient; with one local step an observer reads it back from the update's coordinate. No test
example is spent on them.

Client canaries (`kind: client`, white-box audits of server-side central DP) are no clients
of the partition either: canary i is an extra member of every round's cohort whose update is
zero except on its coordinate, where it equals the clipping norm C, when it is included, and
is zero (the zero-out neighbour of client-level DP) when it is not
(`fedsim.federation.canary_clients`). The noise is calibrated to the cohort with them.

Every draw derives from the data seed, so all parties rebuild the same canaries; the audit
stage records them in the run directory (`attacks/<name>/canaries.json`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedsim.core.config import CanaryConfig
from fedsim.core.errors import UserError


@dataclass(frozen=True)
class Canaries:
    """The canaries of a federation: pool index, image, wrong label, inclusion, designated client.

    Canary i is in the training of partition `client[i]` exactly when `included[i]`. Gradient
    canaries (`kind == "gradient"`) have no pool index, image or label (empty `index`, `x`, `y`);
    their coordinates follow from `seed` and the model's size (`coordinates`).
    """

    index: np.ndarray
    x: torch.Tensor
    y: torch.Tensor
    included: np.ndarray
    client: np.ndarray
    kind: str = "input"
    seed: int = 0

    def of_client(self, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The input canaries that partition `partition_id` trains on (x, wrong labels)."""
        if self.kind != "input":
            return self.x, self.y
        mine = torch.as_tensor((self.client == partition_id) & self.included)
        return self.x[mine], self.y[mine]

    def coordinates(self, num_parameters: int) -> np.ndarray:
        """Gradient or client canary i's coordinate: a distinct flat index into the parameters
        (concatenated in `model.parameters()` order), the same for every party."""
        if len(self.included) > num_parameters:
            raise UserError(
                f"data.canaries.count={len(self.included)}: {self.kind} canaries need a distinct "
                f"parameter each and the model has {num_parameters}; lower the count"
            )
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0xD1AC]))
        return rng.choice(num_parameters, len(self.included), replace=False)

    def gradient_canaries(self, partition_id: int, model: nn.Module) -> tuple[int, ...]:
        """The coordinates of the gradient canaries partition `partition_id` trains with."""
        if self.kind != "gradient":
            return ()
        coordinates = self.coordinates(parameter_count(model))
        return tuple(int(c) for c in coordinates[(self.client == partition_id) & self.included])

    def describe(self) -> list[dict[str, int | bool]]:
        """One JSON record per canary (for the run directory)."""
        if self.kind != "input":
            return [
                {"included": bool(inc), "client": int(c)}
                for inc, c in zip(self.included, self.client, strict=True)
            ]
        return [
            {"pool_index": int(i), "label": int(y), "included": bool(inc), "client": int(c)}
            for i, y, inc, c in zip(self.index, self.y.tolist(), self.included, self.client, strict=True)
        ]


def parameter_count(model: nn.Module) -> int:
    """How many parameters `model` has (the length gradient canaries index into)."""
    return sum(p.numel() for p in model.parameters())


def draw_canaries(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    test_index: np.ndarray,
    config: CanaryConfig,
    num_partitions: int,
    seed: int,
) -> Canaries:
    """`config.count` canaries drawn from the test examples at `test_index` of the pool (x, y),
    or gradient / client canaries (which take no example)."""
    receivers = list(range(num_partitions)) if config.clients == "all" else config.clients
    bad = [c for c in receivers if not 0 <= c < num_partitions]
    if bad:
        raise UserError(f"data.canaries.clients: {bad} outside 0..{num_partitions - 1}")
    client = np.resize(np.asarray(receivers), config.count)
    if config.kind != "input":
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0xD1AC, 1]))
        included = rng.random(config.count) < config.probability
        none = np.zeros(0, dtype=np.int64)
        return Canaries(none, x[none], y[none], included, client, config.kind, seed)
    if config.count > len(test_index) - 1:
        raise UserError(
            f"data.canaries.count={config.count}: the test set has only {len(test_index)} examples"
        )
    if num_classes < 2:
        raise UserError("data.canaries: mislabelled canaries need a classification dataset")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xCA7A]))
    index = np.sort(rng.choice(test_index, config.count, replace=False))
    shift = torch.as_tensor(rng.integers(1, num_classes, config.count))
    included = rng.random(config.count) < config.probability
    return Canaries(index, x[index], (y[index] + shift) % num_classes, included, client)
