"""Empirical epsilon lower bounds from a membership attack on canaries (DP auditing).

A DP guarantee caps how well *any* test can tell whether a canary was in the training data;
an attack that tells them apart better than the cap allows falsifies the claimed epsilon. Two
estimators, both sound at confidence 1 - beta (the bound exceeds the true epsilon with
probability at most beta over the training randomness and the canaries' coin flips):

**One run** (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1) Training Run").
m canaries, each included independently with probability 1/2 (S_i = +1 in, -1 out), in one
training run. The auditor guesses T_i = +1 for its k+ highest-scored canaries, T_i = -1 for its
k- lowest, and abstains on the rest: r = k+ + k- guesses, v of them correct. If the training
is (eps, delta)-DP with respect to each canary, then (their main theorem; the delta term as in
the p-value algorithm of their appendix)

    P[v correct] is dominated as   P[W >= v] <= P[Bin(r, q) >= v] + 2 m delta * alpha,
    q = e^eps / (1 + e^eps),   alpha = max_{i=1..v} P[v - i <= Bin(r, q) < v] / i,

so observing v correct guesses rejects "(eps, delta)-DP" at level beta whenever that p-value is
below beta; the lower bound is the largest such eps (`one_run_epsilon`). Only the guesses'
correctness is random; for delta = 0 the bound is the classical one of r independent
randomised responses. A perfect attack on m canaries reaches at most the eps solving
q^r = beta (r = m): an audit with few canaries cannot certify a large epsilon.

**Multi run** (Jagielski, Ullman, Oprea 2020; Nasr et al. 2021). Over paired runs with and
without a canary, a threshold test on the attack's score has false-positive / false-negative
rates that (eps, delta)-DP bounds by FPR + e^eps FNR >= 1 - delta and FNR + e^eps FPR >= 1 - delta.
With one-sided Clopper-Pearson upper confidence bounds FPR_hi, FNR_hi (each at level beta/2):

    eps_lb = max(log((1 - delta - FPR_hi) / FNR_hi), log((1 - delta - FNR_hi) / FPR_hi), 0).

**Gaussian trade-off** (Dong, Roth, Su 2019, mu-GDP; the GDP audits of Nasr et al. 2023 and
jax-privacy's `epsilon_from_gdp`). A mechanism is mu-GDP when no test tells in from out
better than two unit Gaussians mu apart, so every threshold test has

    mu >= Phi^-1(1 - FPR) - Phi^-1(FNR),

and the Clopper-Pearson upper bounds FPR_hi, FNR_hi turn each test into a lower bound on mu
at confidence 1 - beta (`gdp_audit`; Bonferroni over a grid of thresholds, which
jax-privacy's estimate omits). The epsilon of a mu_lb-GDP mechanism at delta (their
Corollary 2.13, `gdp_epsilon`) is then a lower bound on the epsilon of any claim that
describes the mechanism as Gaussian (DP-SGD without subsampling is exactly that). It uses
the trade-off curve's shape where the (eps, delta) bounds above use one point of it, so it
gets much closer to a Gaussian mechanism's epsilon; it is not a bound for mechanisms of
another shape. Both it and the multi-run bound need independent trials: paired runs, or
canaries whose readings share no randomness (Dirac gradient canaries on distinct
coordinates with independent noise).

Choosing the threshold (or k+, k-) after seeing the scores is paid for by a Bonferroni
correction: every candidate is tested at level beta / (number of candidates), so the best
of them is still a bound at confidence 1 - beta.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy import optimize, special, stats

DEFAULT_BETA = 0.05
"""One minus the confidence of every lower bound (Steinke et al. report 95 % confidence)."""


# ------------------------------------------------------------------------------- one run


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of v or more correct guesses out of r, among m canaries, under (eps, delta)-DP.

    Steinke et al. (2023), their p-value algorithm (see the module doc). For delta = 0
    it is the binomial tail P[Bin(r, q) >= v] with q = e^eps / (1 + e^eps).
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = special.expit(epsilon)
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    if delta == 0 or v == 0:
        return tail
    i = np.arange(1, v + 1)
    # P[v - i <= Bin(r, q) < v] = P[Bin >= v - i] - P[Bin >= v]
    window = stats.binom.sf(v - i - 1, r, q) - tail
    alpha = float(np.max(window / i))
    return min(tail + 2 * m * delta * alpha, 1.0)


def one_run_epsilon(m: int, r: int, v: int, delta: float, beta: float = DEFAULT_BETA) -> float:
    """The largest eps that v correct guesses out of r (m canaries) reject at level beta; 0 if none.

    The p-value grows with eps, so the bound is the root of p(eps) = beta (Brent's method, to
    1e-6), or 0 when even eps = 0 is not rejected.
    """
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")

    def excess(epsilon: float) -> float:  # < 0 while "(epsilon, delta)-DP" is rejected
        return one_run_p_value(m, r, v, epsilon, delta) - beta

    if r == 0 or excess(0.0) >= 0:
        return 0.0
    high = 1.0
    while excess(high) < 0:
        if high > 1e3:  # every eps rejected: only when v = r and delta = 0 with beta > q^r
            return math.inf
        high *= 2
    return float(optimize.brentq(excess, 0.0, high, xtol=1e-6))


def _ordered(scores: Any, included: Any) -> tuple[np.ndarray, np.ndarray]:
    score = _numpy(scores).astype(np.float64).ravel()
    truth = _numpy(included).astype(bool).ravel()
    if score.shape != truth.shape:
        raise ValueError(f"{score.shape[0]} scores for {truth.shape[0]} canaries")
    if not np.isfinite(score).all():
        raise ValueError("canary scores must be finite")
    return score, truth


def _numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def one_run_guesses(scores: Any, included: Any, k_plus: int, k_minus: int) -> tuple[int, int]:
    """(guesses r, correct v): "in" for the k+ highest scores, "out" for the k- lowest.

    Ties are broken by position (a stable sort), never by the truth.
    """
    score, truth = _ordered(scores, included)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > len(score):
        raise ValueError(f"k+ = {k_plus}, k- = {k_minus} guesses on {len(score)} canaries")
    order = np.argsort(-score, kind="stable")
    correct = int(truth[order[:k_plus]].sum())
    if k_minus:
        correct += int((~truth[order[len(score) - k_minus :]]).sum())
    return k_plus + k_minus, correct


@dataclass(frozen=True)
class OneRunAudit:
    """A one-run audit's result: the bound and the guesses that gave it."""

    epsilon_lower_bound: float
    canaries: int
    included: int
    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    delta: float
    beta: float
    candidates: int  # (k+, k-) pairs tried; each was tested at beta / candidates

    def as_dict(self) -> dict[str, Any]:
        return {"estimator": "one_run", **asdict(self)}


def default_guess_counts(m: int) -> list[tuple[int, int]]:
    """(k+, k-) candidates: k+ on a 1-2-5 grid up to m, alone and with as many "out" guesses."""
    steps = sorted({k for e in range(7) for f in (1, 2, 5) if (k := f * 10**e) <= m} | {m})
    pairs = [(k, 0) for k in steps] + [(k, k) for k in steps if 2 * k <= m]
    return pairs


def one_run_audit(
    scores: Any,
    included: Any,
    delta: float,
    beta: float = DEFAULT_BETA,
    guess_counts: list[tuple[int, int]] | None = None,
) -> OneRunAudit:
    """Steinke et al.'s one-run lower bound, maximised over (k+, k-) with a Bonferroni correction.

    `scores[i]` is the attack's score of canary i (higher = "in"), `included[i]` whether it was
    in the training data (each with probability 1/2, independently: the caller's design).
    """
    score, truth = _ordered(scores, included)
    pairs = guess_counts or default_guess_counts(len(score))
    best: tuple[float, int, int, int, int] = (-1.0, 0, 0, 0, 0)
    for k_plus, k_minus in pairs:
        r, v = one_run_guesses(score, truth, k_plus, k_minus)
        epsilon = one_run_epsilon(len(score), r, v, delta, beta / len(pairs))
        if epsilon > best[0]:
            best = (epsilon, k_plus, k_minus, r, v)
    epsilon, k_plus, k_minus, r, v = best
    return OneRunAudit(
        epsilon, len(score), int(truth.sum()), k_plus, k_minus, r, v, delta, beta, len(pairs)
    )


# ----------------------------------------------------------------------------- multi run


def clopper_pearson_upper(k: Any, n: Any, alpha: float) -> Any:
    """One-sided Clopper-Pearson upper bound on a binomial rate: P[rate > bound] <= alpha.

    The (1 - alpha) quantile of Beta(k + 1, n - k); 1 where k = n. Elementwise on arrays.
    """
    k, n = np.asarray(k), np.asarray(n)
    if np.any((k < 0) | (k > n) | (n == 0)):
        raise ValueError(f"need 0 <= k ({k}) <= n ({n}) and n > 0")
    upper = np.where(k < n, stats.beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1)), 1.0)
    return float(upper) if upper.ndim == 0 else upper


def _epsilon_from_rates(fpr_hi: Any, fnr_hi: Any, delta: float) -> np.ndarray:
    """max(log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR), 0), elementwise."""
    fpr_hi, fnr_hi = np.asarray(fpr_hi, np.float64), np.asarray(fnr_hi, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        one = np.log(np.clip(1 - delta - fpr_hi, 0, None) / fnr_hi)
        two = np.log(np.clip(1 - delta - fnr_hi, 0, None) / fpr_hi)
    return np.maximum(np.nan_to_num(np.maximum(one, two), nan=0.0, neginf=0.0), 0.0)


def multi_run_epsilon(
    tp: int, fp: int, fn: int, tn: int, delta: float, beta: float = DEFAULT_BETA
) -> float:
    """Jagielski et al.'s lower bound from one threshold test's counts over paired runs.

    tp/fn: runs with the canary guessed in/out; fp/tn: runs without it guessed in/out.
    FPR and FNR get Clopper-Pearson upper bounds at level beta/2 each (see the module doc).
    """
    fpr_hi = clopper_pearson_upper(fp, fp + tn, beta / 2)
    fnr_hi = clopper_pearson_upper(fn, fn + tp, beta / 2)
    return float(_epsilon_from_rates(fpr_hi, fnr_hi, delta))


@dataclass(frozen=True)
class MultiRunAudit:
    """A multi-run audit's result: the bound, the threshold and the counts behind it."""

    epsilon_lower_bound: float
    threshold: float
    tp: int
    fp: int
    fn: int
    tn: int
    delta: float
    beta: float
    candidates: int  # thresholds tried; each was tested at beta / candidates

    def as_dict(self) -> dict[str, Any]:
        return {"estimator": "multi_run", **asdict(self)}


def multi_run_audit(
    scores: Any, included: Any, delta: float, beta: float = DEFAULT_BETA
) -> MultiRunAudit:
    """The best Clopper-Pearson bound over every threshold "in iff score >= t" (Bonferroni).

    `scores[j]` is the attack's score in run j, `included[j]` whether run j trained with the
    canary (or one entry per canary and run, when the canaries are exchangeable).
    """
    score, truth = _ordered(scores, included)
    if truth.all() or not truth.any():
        raise ValueError("a multi-run audit needs runs with and without the canary")
    thresholds = np.unique(score)
    members, non_members = int(truth.sum()), int((~truth).sum())
    tp = members - np.searchsorted(np.sort(score[truth]), thresholds, side="left")
    fp = non_members - np.searchsorted(np.sort(score[~truth]), thresholds, side="left")
    alpha = beta / len(thresholds) / 2  # Bonferroni over thresholds, then FPR and FNR
    epsilon = _epsilon_from_rates(
        clopper_pearson_upper(fp, non_members, alpha),
        clopper_pearson_upper(members - tp, members, alpha),
        delta,
    )
    best = int(np.argmax(epsilon))
    return MultiRunAudit(
        float(epsilon[best]), float(thresholds[best]), int(tp[best]), int(fp[best]),
        members - int(tp[best]), non_members - int(fp[best]), delta, beta, len(thresholds),
    )  # fmt: skip


# ------------------------------------------------------------------------ Gaussian trade-off

GDP_THRESHOLDS = 64
"""Thresholds `gdp_audit` tries: the score quantiles at 1/65, ..., 64/65 (Bonferroni over them)."""


def gdp_epsilon(mu: float, delta: float) -> float:
    """Epsilon of a mu-GDP mechanism at delta: the root of
    Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) = delta (Dong et al., Corollary 2.13)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if mu <= 0:
        return 0.0

    def excess(epsilon: float) -> float:  # log delta(eps) - log delta, decreasing in eps
        upper = stats.norm.logcdf(-epsilon / mu + mu / 2)
        lower = epsilon + stats.norm.logcdf(-epsilon / mu - mu / 2)
        return float(upper + np.log1p(-np.exp(min(lower - upper, 0.0))) - np.log(delta))

    if excess(0.0) <= 0:
        return 0.0
    high = max(1.0, mu * mu)
    while excess(high) > 0:
        high *= 2
    return float(optimize.brentq(excess, 0.0, high, xtol=1e-9))


@dataclass(frozen=True)
class GdpAudit(MultiRunAudit):
    """A Gaussian-trade-off audit: the multi-run audit's record (bound, threshold, counts) plus
    the lower bound on mu that its epsilon is converted from."""

    mu_lower_bound: float

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "estimator": "gdp"}


def gdp_audit(
    scores: Any, included: Any, delta: float, beta: float = DEFAULT_BETA, candidates: int = GDP_THRESHOLDS
) -> GdpAudit:
    """The best Gaussian-trade-off bound over `candidates` threshold tests "in iff score >= t".

    `scores[j]` / `included[j]` are independent trials (see the module doc): with confidence
    1 - beta the mechanism is not mu-GDP for any mu below `mu_lower_bound`.
    """
    score, truth = _ordered(scores, included)
    if truth.all() or not truth.any():
        raise ValueError("a Gaussian audit needs trials with and without the canary")
    thresholds = np.unique(np.quantile(score, np.arange(1, candidates + 1) / (candidates + 1)))
    members, non_members = int(truth.sum()), int((~truth).sum())
    tp = members - np.searchsorted(np.sort(score[truth]), thresholds, side="left")
    fp = non_members - np.searchsorted(np.sort(score[~truth]), thresholds, side="left")
    alpha = beta / len(thresholds) / 2  # Bonferroni over thresholds, then FPR and FNR
    fpr_hi = clopper_pearson_upper(fp, non_members, alpha)
    fnr_hi = clopper_pearson_upper(members - tp, members, alpha)
    mu = np.maximum(stats.norm.isf(fpr_hi) - stats.norm.ppf(fnr_hi), 0.0)
    best = int(np.argmax(mu))
    return GdpAudit(
        gdp_epsilon(float(mu[best]), delta), float(thresholds[best]), int(tp[best]), int(fp[best]),
        members - int(tp[best]), non_members - int(fp[best]), delta, beta, len(thresholds), float(mu[best]),
    )  # fmt: skip
