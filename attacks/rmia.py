"""RMIA, the relative membership attack (Zarifzadeh, Liu, Mahloujifar, Shokri 2024).

Threat model 3 (DESIGN.md), model holder, black-box, with reference models (trained like the
target on population data, as LiRA's shadows: `fedsim.pipeline.shadows`) and population
samples z the attacker knows were not selected for special treatment (here: the server's
held-out test examples). With Pr(x | theta) = p_y(x) the target model's probability of x's
label and Pr(x) its average over reference models,

    LR(x, z) = (Pr(x | theta) / Pr(x)) / (Pr(z | theta) / Pr(z)),
    score(x) = fraction of the population samples z with LR(x, z) >= gamma

(their Eq. 4 and the test Score_MIA(x; theta) = Pr_z[LR(x, z) >= gamma]): x is a member if
the target model likes it, relative to how much models in general like it, more than it likes
most population samples, relative to theirs. A pairwise test, so easy examples and easy
models cancel out.

Online, Pr(x) averages reference models that did and did not train on x. Offline, every
reference model is OUT for x, and Pr(x) = (Pr_IN(x) + Pr_OUT(x)) / 2 is approximated by the
linear fit Pr_IN = a Pr_OUT + (1 - a) (their sec. 3, offline):

    Pr(x) = ((1 + a) Pr_OUT(x) + (1 - a)) / 2,

with the same formula for Pr(z). `a` is tuned on reference models (the paper picks it by
attacking one reference model with the others); gamma defaults to 1 (tunable).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fedsim.attacks.membership_signals import true_class_probability
from fedsim.core.membership import MembershipAttack, MembershipTarget
from fedsim.core.registry import ATTACKS


def _as_numpy(values: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, np.float64)


def offline_marginal(reference: np.ndarray, includes: np.ndarray | None, a: float) -> np.ndarray:
    """Pr(x) from the OUT reference models: ((1 + a) mean_out + (1 - a)) / 2, per example.

    `includes` (K, N) marks the reference models that trained on each example (left out of
    its mean); None: every reference model is OUT. An example with IN models only gets
    mean_out from inverting the same linear fit, (mean_in - (1 - a)) / a (a > 0; a = 0 says
    Pr_IN = 1, and then Pr(x) = mean_in).
    """
    is_in = np.zeros_like(reference, dtype=bool) if includes is None else np.asarray(includes, bool)
    out_count, in_count = (~is_in).sum(0), is_in.sum(0)
    mean_out = (reference * ~is_in).sum(0) / np.maximum(out_count, 1)
    mean_in = (reference * is_in).sum(0) / np.maximum(in_count, 1)
    if a > 0:
        mean_out = np.where(out_count > 0, mean_out, np.clip((mean_in - (1 - a)) / a, 0, 1))
        return ((1 + a) * mean_out + (1 - a)) / 2
    return np.where(out_count > 0, (mean_out + 1) / 2, mean_in)


def rmia_scores(
    target_x: torch.Tensor | np.ndarray,
    reference_x: torch.Tensor | np.ndarray,
    target_z: torch.Tensor | np.ndarray,
    reference_z: torch.Tensor | np.ndarray,
    gamma: float = 1.0,
    offline_a: float | None = None,
    includes_x: np.ndarray | None = None,
    includes_z: np.ndarray | None = None,
) -> np.ndarray:
    """RMIA scores (N,) in [0, 1] of the candidates x.

    `target_x` (N,) / `target_z` (M,): Pr(. | theta) of the candidates and the population
    samples under the target model; `reference_x` (K, N) / `reference_z` (K, M): the same under
    each reference model. `offline_a` None: online (Pr(.) = the mean over every reference
    model); a number: offline, Pr(.) from each example's OUT reference models (`includes_x`,
    `includes_z` (K, .) mark the IN ones; None: all OUT) by the linear approximation.
    """
    px, pz = _as_numpy(target_x), _as_numpy(target_z)
    rx, rz = _as_numpy(reference_x), _as_numpy(reference_z)
    if rx.shape[1:] != px.shape or rz.shape[1:] != pz.shape or len(rx) != len(rz):
        raise ValueError(f"signals x {px.shape} / {rx.shape}, z {pz.shape} / {rz.shape}")
    if offline_a is None:
        marginal_x, marginal_z = rx.mean(0), rz.mean(0)
    else:
        marginal_x = offline_marginal(rx, includes_x, offline_a)
        marginal_z = offline_marginal(rz, includes_z, offline_a)
    ratio_x = px / np.maximum(marginal_x, 1e-30)
    ratio_z = np.sort(pz / np.maximum(marginal_z, 1e-30))
    # LR(x, z) >= gamma  <=>  ratio_z <= ratio_x / gamma: count by binary search
    return np.searchsorted(ratio_z, ratio_x / gamma, side="right") / len(ratio_z)


@ATTACKS.register("rmia")
class RMIA(MembershipAttack):
    """RMIA (Zarifzadeh et al. 2024): likelihood ratio of x against population samples z."""

    threat_model = (
        "model holder, black-box, with reference federations of the same scenario and "
        "population samples known not to be members (the server's test data)"
    )
    needs_classes = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        reference_models: int = Field(4, ge=1, description="reference federations (shared with LiRA's shadows)")
        gamma: float = Field(1.0, gt=0, description="LR(x, z) threshold of the pairwise test")
        offline_a: float | None = Field(
            None, ge=0, le=1,
            description="null: online; a number: offline, Pr(x) = ((1 + a) Pr_OUT(x) + 1 - a) / 2",
        )
        population: int = Field(1000, ge=1, description="at most this many population samples z")

    def score(self, target: MembershipTarget) -> np.ndarray:
        references = target.reference_models(self.params.reference_models)
        count = min(self.params.population, len(target.population_y))
        z_x, z_y = target.population_x[:count], target.population_y[:count]
        models = [r.model for r in references]
        return rmia_scores(
            true_class_probability(target.model, target.x, target.y),
            torch.stack([true_class_probability(m, target.x, target.y) for m in models]),
            true_class_probability(target.model, z_x, z_y),
            torch.stack([true_class_probability(m, z_x, z_y) for m in models]),
            gamma=self.params.gamma,
            offline_a=self.params.offline_a,
            includes_x=np.stack([r.includes for r in references]),
            includes_z=np.stack([r.includes_population[:count] for r in references]),
        )
