"""LiRA, the likelihood-ratio membership attack (Carlini, Chien, Nasr, Song, Terzis, Tramèr 2022).

Threat model 3 (DESIGN.md), model holder, black-box, plus the power to train *shadow models*:
the attacker knows the training algorithm (here: the whole fedsim scenario) and holds data
from the same population, including the candidate examples. It trains K shadow federations,
each on a random part of that population (in fedsim: the same scenario on another data split,
`fedsim.pipeline.shadows`), so for every candidate x some shadows trained on it (IN) and
some did not (OUT). The signal is the logit-scaled confidence in x's label,

    phi(x; theta) = log(p_y / (1 - p_y))                    (`membership_signals.logit_confidence`)

which is close to Gaussian over training runs. Per example, fit N(mu_in, s_in^2) to the IN
shadows' phi and N(mu_out, s_out^2) to the OUT shadows', and score the target model's phi:

    online:   score = log N(phi; mu_in, s_in^2) - log N(phi; mu_out, s_out^2)
    offline:  score = log Phi((phi - mu_out) / s_out)         (one-sided test, OUT shadows only)

(Phi the standard normal CDF: how far above the OUT distribution the target's confidence is).
With few shadows the per-example variances are noisy; Carlini et al. then use one variance
per distribution over all examples (`global_variance`, their recommendation below 64 shadows).
An example with no IN (or no OUT) shadow gets the mean IN-OUT shift of the examples that have
both added to its OUT (subtracted from its IN) mean, and the pooled variance.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

from fedsim.attacks.membership_signals import logit_confidence
from fedsim.core.membership import MembershipAttack, MembershipTarget
from fedsim.core.registry import ATTACKS

MIN_STD = 1e-4
"""Floor on a fitted standard deviation (phi of a saturated model can repeat exactly)."""


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    counts = mask.sum(0)
    return np.where(counts > 0, (values * mask).sum(0) / np.maximum(counts, 1), np.nan)


def _gaussian_fit(
    values: np.ndarray, mask: np.ndarray, global_variance: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean and std of `values` (K, N) over the shadows in `mask` (nan mean if none)."""
    mean = _masked_mean(values, mask)
    residual = np.where(mask, values - np.nan_to_num(mean), 0.0)
    pooled = np.sqrt((residual**2).sum() / max(mask.sum() - np.isfinite(mean).sum(), 1))
    if global_variance:
        std = np.full(values.shape[1], pooled)
    else:
        counts = mask.sum(0)
        per_example = np.sqrt((residual**2).sum(0) / np.maximum(counts - 1, 1))
        std = np.where(counts >= 2, per_example, pooled)
    return mean, np.maximum(std, MIN_STD)


def lira_scores(
    target: torch.Tensor | np.ndarray,
    shadows: torch.Tensor | np.ndarray,
    shadow_in: torch.Tensor | np.ndarray,
    online: bool = True,
    global_variance: bool = True,
) -> np.ndarray:
    """LiRA scores (N,) of the target model's signal `target` (N,).

    `shadows` (K, N) holds each shadow model's signal on the same candidates and `shadow_in`
    (K, N) whether that shadow trained on the candidate. Higher = more likely a member.
    """
    phi = np.asarray(target, dtype=np.float64)
    values = np.asarray(shadows, dtype=np.float64)
    is_in = np.asarray(shadow_in, dtype=bool)
    if values.shape != is_in.shape or values.shape[1:] != phi.shape:
        raise ValueError(f"signals {values.shape}, memberships {is_in.shape}, target {phi.shape}")
    mu_in, s_in = _gaussian_fit(values, is_in, global_variance)
    mu_out, s_out = _gaussian_fit(values, ~is_in, global_variance)
    both = np.isfinite(mu_in) & np.isfinite(mu_out)
    if not both.any():
        raise ValueError("LiRA needs a candidate with both IN and OUT shadows")
    shift = float(np.mean(mu_in[both] - mu_out[both]))
    mu_in = np.where(np.isfinite(mu_in), mu_in, mu_out + shift)
    mu_out = np.where(np.isfinite(mu_out), mu_out, mu_in - shift)
    if online:
        return stats.norm.logpdf(phi, mu_in, s_in) - stats.norm.logpdf(phi, mu_out, s_out)
    return stats.norm.logcdf((phi - mu_out) / s_out)


@ATTACKS.register("lira")
class LiRA(MembershipAttack):
    """LiRA online (Carlini et al. 2022): Gaussian likelihood ratio of IN and OUT shadow federations."""

    threat_model = (
        "model holder, black-box, who trains shadow federations of the same scenario on "
        "population data that includes the candidates"
    )
    online: ClassVar[bool] = True
    needs_classes = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        shadows: int = Field(8, ge=2, description="shadow federations (each a full training run, cached per run)")
        global_variance: bool = Field(
            True, description="one variance per distribution over all examples (better below ~64 shadows)"
        )

    def score(self, target: MembershipTarget) -> np.ndarray:
        shadows = target.reference_models(self.params.shadows)
        signals = np.stack([logit_confidence(s.model, target.x, target.y).numpy() for s in shadows])
        includes = np.stack([s.includes for s in shadows])
        phi = logit_confidence(target.model, target.x, target.y).numpy()
        return lira_scores(phi, signals, includes, self.online, self.params.global_variance)


@ATTACKS.register("lira_offline")
class LiRAOffline(LiRA):
    """LiRA offline (Carlini et al. 2022): one-sided test against the OUT shadows' Gaussian."""

    online = False
