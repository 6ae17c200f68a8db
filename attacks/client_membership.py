"""Client-level (user) membership: did this client's data include examples from this source?

Threat model 1 (DESIGN.md), honest-but-curious server, or 3 (model holder) with per-example
scores from any example-level attack. A *source* is a person, device or data set the attacker
holds a few examples of (not necessarily the exact examples the client trained on). Given
every candidate example's score s_i against one client (e.g. `update_membership` on that
client's update) and the source each example comes from, a source's score is

    S(source) = mean_{i in source} s_i            (`reduce="mean"`)
    S(source) = max_{i in source} s_i             (`reduce="max"`: one trained-on example suffices)

and "the client holds data of this source" is guessed above a threshold. Averaging over a
source's examples adds up weak per-example evidence: user-level inference succeeds where
example-level inference is at chance (the reason client-level DP is the unit that protects a
person with many examples).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from fedsim.attacks.update_membership import UpdateScoreParams, update_membership_scores
from fedsim.core.membership import MembershipAttack, MembershipTarget
from fedsim.core.registry import ATTACKS


def source_scores(
    example_scores: torch.Tensor | np.ndarray,
    sources: torch.Tensor | np.ndarray,
    reduce: Literal["mean", "max"] = "mean",
) -> tuple[np.ndarray, np.ndarray]:
    """(source ids, their scores): the example scores aggregated per source, ids sorted."""
    score = np.asarray(example_scores, dtype=np.float64).ravel()
    source = np.asarray(sources).ravel()
    if score.shape != source.shape:
        raise ValueError(f"{score.shape[0]} scores for {source.shape[0]} source labels")
    ids, inverse = np.unique(source, return_inverse=True)
    if reduce == "mean":
        totals = np.bincount(inverse, weights=score, minlength=len(ids))
        return ids, totals / np.bincount(inverse, minlength=len(ids))
    best = np.full(len(ids), -np.inf)
    np.maximum.at(best, inverse, score)
    return ids, best


@ATTACKS.register("client_membership")
class ClientMembership(MembershipAttack):
    """Client-level inference: did the client's round data include examples of a source?"""

    threat_model = (
        "honest-but-curious server, white-box: the weights it sent, one client's returned "
        "weights, and a few examples of each candidate source (person, device, data set)"
    )
    granted = "update"

    class Params(UpdateScoreParams):
        source_size: int = Field(
            4, ge=1, description="examples the attacker holds of each source (the stage forms the sources)"
        )
        reduce: Literal["mean", "max"] = Field("mean", description="how a source's example scores combine")

    def score(self, target: MembershipTarget) -> np.ndarray:
        assert target.update is not None and target.sources is not None
        scores = update_membership_scores(
            target.update, target.x, target.y, self.params.score, self.params.normalise
        )
        return source_scores(scores, target.sources, self.params.reduce)[1]
