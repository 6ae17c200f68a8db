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

Every draw derives from the data seed, so all parties rebuild the same canaries; the audit
stage records them in the run directory (`attacks/<name>/canaries.json`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedsim.core.config import CanaryConfig
from fedsim.core.errors import UserError


@dataclass(frozen=True)
class Canaries:
    """The canaries of a federation: pool index, image, wrong label, inclusion, designated client.

    Canary i is in the training data of partition `client[i]` exactly when `included[i]`.
    """

    index: np.ndarray
    x: torch.Tensor
    y: torch.Tensor
    included: np.ndarray
    client: np.ndarray

    def of_client(self, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The canaries that partition `partition_id` trains on (x, wrong labels)."""
        mine = torch.as_tensor((self.client == partition_id) & self.included)
        return self.x[mine], self.y[mine]

    def describe(self) -> list[dict[str, int | bool]]:
        """One JSON record per canary (for the run directory)."""
        return [
            {"pool_index": int(i), "label": int(y), "included": bool(inc), "client": int(c)}
            for i, y, inc, c in zip(self.index, self.y.tolist(), self.included, self.client, strict=True)
        ]


def draw_canaries(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    test_index: np.ndarray,
    config: CanaryConfig,
    num_partitions: int,
    seed: int,
) -> Canaries:
    """`config.count` canaries drawn from the test examples at `test_index` of the pool (x, y)."""
    if config.count > len(test_index) - 1:
        raise UserError(
            f"data.canaries.count={config.count}: the test set has only {len(test_index)} examples"
        )
    if num_classes < 2:
        raise UserError("data.canaries: mislabelled canaries need a classification dataset")
    receivers = list(range(num_partitions)) if config.clients == "all" else config.clients
    bad = [c for c in receivers if not 0 <= c < num_partitions]
    if bad:
        raise UserError(f"data.canaries.clients: {bad} outside 0..{num_partitions - 1}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xCA7A]))
    index = np.sort(rng.choice(test_index, config.count, replace=False))
    shift = torch.as_tensor(rng.integers(1, num_classes, config.count))
    included = rng.random(config.count) < config.probability
    client = np.resize(np.asarray(receivers), config.count)
    return Canaries(index, x[index], (y[index] + shift) % num_classes, included, client)
