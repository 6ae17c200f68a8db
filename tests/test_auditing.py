"""DP audit estimators: exact against closed forms and a maintained implementation, sound on
mechanisms of known epsilon (never above it), tight where the theory says they can be, and a
mechanism that spends more than it claims is caught; canaries in a run, and an audited DP-SGD
run that stays below its reported epsilon.

Reference values marked "jax-privacy" were computed with jax-privacy 2.0.0's
`auditing._one_run_p_value` / `_epsilon_one_run` / `CanaryScoreAuditor.epsilon_clopper_pearson`
(the module loaded on its own; the package itself needs jax, so fedsim does not depend on it).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from rich.console import Console
from scipy import optimize, special, stats

from fedsim.evaluation.auditing import (
    clopper_pearson_upper,
    default_guess_counts,
    multi_run_audit,
    multi_run_epsilon,
    gdp_audit,
    gdp_epsilon,
    one_run_audit,
    one_run_epsilon,
    one_run_guesses,
    one_run_p_value,
)


def randomised_response(included: np.ndarray, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """An eps-DP release of each canary's bit (kept with probability e^eps / (1 + e^eps)), as a
    score with a random tie-break."""
    keep = rng.random(len(included)) < special.expit(epsilon)
    return np.where(keep, included, ~included) + 1e-3 * rng.random(len(included))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon at delta of the Gaussian mechanism with sensitivity / sigma = mu
    (Balle & Wang 2018): delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""

    def gap(eps: float) -> float:
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta

    return optimize.brentq(gap, 0, 100)


def test_p_value_is_the_binomial_tail_without_delta():
    q = special.expit(1.5)
    assert one_run_p_value(500, 100, 80, 1.5, 0.0) == pytest.approx(stats.binom.sf(79, 100, q))


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta", "expected"),
    [  # jax-privacy
        (1000, 100, 90, 2.0, 1e-5, 0.3449868368),
        (1000, 500, 400, 1.0, 1e-3, 0.0387617045),
        (200, 200, 150, 0.5, 1e-5, 0.0001955870),
    ],
)
def test_p_value_matches_jax_privacy(m, r, v, eps, delta, expected):
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("m", "r", "v", "delta", "expected"),
    [  # jax-privacy, 95 % confidence
        (1000, 100, 90, 1e-5, 1.6261437),
        (1000, 1000, 800, 1e-5, 1.2539841),
        (10000, 2000, 1900, 1e-5, 2.7678958),
        (1000, 100, 55, 1e-5, 0.0),
    ],
)
def test_one_run_epsilon_matches_jax_privacy(m, r, v, delta, expected):
    assert one_run_epsilon(m, r, v, delta, 0.05) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_perfect_attack_reaches_the_closed_form_cap(r):
    """r correct guesses out of r, delta 0: the bound solves q^r = beta (Steinke et al.: with
    few canaries no attack, however perfect, certifies a large epsilon)."""
    cap = special.logit(0.05 ** (1 / r))
    assert one_run_epsilon(r, r, r, 0.0, 0.05) == pytest.approx(cap, abs=1e-5)
    assert one_run_epsilon(1000, r, r, 1e-5, 0.05) < cap  # delta only lowers it


def test_guesses_count_top_and_bottom():
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5])
    included = np.array([True, False, False, False, True])
    assert one_run_guesses(scores, included, 2, 0) == (2, 1)
    assert one_run_guesses(scores, included, 1, 2) == (3, 3)


@pytest.mark.parametrize("epsilon", [1.0, 2.0, 4.0])
def test_one_run_bound_is_sound_and_tightens_with_canaries(epsilon):
    """On randomised response (exactly eps-DP per canary) the 95 % bound may exceed eps in at
    most 5 % of repetitions; with the Bonferroni search over (k+, k-) it never does in these
    25. With 10,000 canaries it comes within 10 % of eps (delta = 0)."""
    bounds = []
    for seed in range(25):
        rng = np.random.default_rng(seed)
        included = rng.random(500) < 0.5
        bounds.append(one_run_audit(randomised_response(included, epsilon, rng), included, 1e-5).epsilon_lower_bound)
    assert max(bounds) <= epsilon
    assert np.mean(bounds) > 0.5 * epsilon
    rng = np.random.default_rng(123)
    included = rng.random(10_000) < 0.5
    large = one_run_audit(randomised_response(included, epsilon, rng), included, 0.0, guess_counts=[(5000, 5000), (2000, 0)])
    assert 0.9 * epsilon < large.epsilon_lower_bound <= epsilon


def test_one_run_catches_a_mechanism_that_spends_more_than_it_claims():
    """Noise for eps = 4 spent while eps = 1 is claimed: the audit's bound exceeds the claim."""
    rng = np.random.default_rng(7)
    included = rng.random(1000) < 0.5
    audit = one_run_audit(randomised_response(included, 4.0, rng), included, 1e-5)
    assert audit.epsilon_lower_bound > 1.0
    assert audit.candidates == len(default_guess_counts(1000))


def test_clopper_pearson_closed_forms():
    assert clopper_pearson_upper(0, 50, 0.05) == pytest.approx(1 - 0.05 ** (1 / 50))
    assert clopper_pearson_upper(50, 50, 0.05) == 1.0
    assert clopper_pearson_upper(10, 100, 0.025) == pytest.approx(stats.beta.ppf(0.975, 11, 90))


def test_multi_run_epsilon_matches_jax_privacy():
    # jax-privacy: CanaryScoreAuditor(...).epsilon_clopper_pearson(0.05, 1e-5, one_sided=False,
    # threshold_strategy=Explicit(t)) on these counts
    assert multi_run_epsilon(tp=420, fp=80, fn=80, tn=420, delta=1e-5) == pytest.approx(1.4170149, abs=1e-6)
    assert multi_run_epsilon(tp=5, fp=5, fn=5, tn=5, delta=1e-5) == 0.0


@pytest.mark.parametrize("epsilon", [1.0, 2.0, 4.0])
def test_multi_run_counts_are_sound_and_tight(epsilon):
    """Paired runs of randomised response: the 95 % bound exceeds eps in at most 5 % of
    repetitions, and with a million runs per side it is within 5 % of eps."""
    q = special.expit(epsilon)
    above = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        tp, fp = rng.binomial(200, q), rng.binomial(200, 1 - q)
        above += multi_run_epsilon(tp, fp, 200 - tp, 200 - fp, 0.0) > epsilon
    assert above <= 5
    n = 1_000_000
    tp, fp = round(n * q), round(n * (1 - q))
    assert 0.95 * epsilon < multi_run_epsilon(tp, fp, n - tp, n - fp, 0.0) <= epsilon


def test_multi_run_audit_on_the_gaussian_mechanism_is_sound():
    """Scores from N(mu * [in], 1): (eps, delta)-DP with eps from the exact Gaussian curve;
    the best threshold (Bonferroni over all of them) certifies no more in 5 repetitions."""
    mu, delta = 1.0, 1e-5
    exact = gaussian_epsilon(mu, delta)
    bounds = []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        included = np.arange(4000) < 2000
        scores = rng.standard_normal(4000) + mu * included
        bounds.append(multi_run_audit(scores, included, delta).epsilon_lower_bound)
    assert max(bounds) <= exact  # 4.38
    assert min(bounds) > 0.2 * exact  # 2,000 runs per side: about 1.2 is reachable


# ------------------------------------------------------------------- canaries in a run

CANARY_RUN = {
    "name": "tiny-audit",
    "data": {
        "dataset": "digits", "num_clients": 2, "test_fraction": 0.5, "val_fraction": 0.0,
        "canaries": {"count": 60, "clients": "all"},
    },
    "model": {"name": "mlp", "hidden": [64]},
    "training": {"local_epochs": 2, "batch_size": 32, "lr": 0.1},
    "federation": {"rounds": 2},
    "observer": {"rounds": "none"},
}  # fmt: skip


def test_canaries_are_mislabelled_test_examples_in_their_clients_data():
    from fedsim.core.config import build_scenario
    from fedsim.data.datasets import federated_data

    scenario = build_scenario(CANARY_RUN)
    data = federated_data(scenario.data, scenario.public().seed)
    canaries = data.canaries
    assert len(canaries.index) == 60 and not np.isin(canaries.index, data.test_index).any()
    assert (canaries.y != data.pool.y[canaries.index]).all()  # every label is wrong
    assert 15 < canaries.included.sum() < 45
    assert set(canaries.client) == {0, 1}  # designated round-robin, included or not
    for client in (0, 1):
        own = len(data.client_indices(client)[0])
        train = data.client(client)[0]
        mine = (canaries.client == client) & canaries.included
        assert len(train) == own + mine.sum()
        assert torch.equal(train.y[own:], canaries.y[torch.as_tensor(mine)])


def test_audit_of_a_dp_sgd_run_stays_below_the_reported_epsilon(tmp_path):
    """Soundness on a small DP-SGD run with a fixed seed: the canaries' one-run bound is
    recorded next to the reported example-level epsilon and does not exceed it."""
    from fedsim.core.config import build_scenario
    from fedsim.pipeline.runner import run_scenario

    scenario = build_scenario(
        {
            **CANARY_RUN,
            "defenses": [{"name": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0}],
            "attacks": ["canary_audit"],
        }
    )
    run = run_scenario(scenario, tmp_path / "run", Console(quiet=True))
    record = json.loads((run.attacks_dir / "canary_audit" / "audit.json").read_text())
    assert record["reported"]["kind"] == "example" and record["reported"]["delta"] == 1e-5
    assert 0 <= record["epsilon_lower_bound"] <= record["reported"]["epsilon"]
    assert record["violation"] is False
    assert record["audit"]["canaries"] == 60
    canaries = json.loads((run.attacks_dir / "canary_audit" / "canaries.json").read_text())["canaries"]
    assert sum(c["included"] for c in canaries) == record["audit"]["included"]
    summary = json.loads(run.summary_path.read_text())
    assert summary["attacks"]["canary_audit"]["audit_violation"] is False


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_gdp_epsilon_is_the_gaussian_mechanisms_pld_epsilon(mu: float) -> None:
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1 / mu))  # sensitivity 1, noise 1/mu: mu-GDP
    assert gdp_epsilon(mu, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-6)
    assert gdp_epsilon(0.0, 1e-5) == 0.0


def gaussian_trials(mu: float, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ideal scores of a mu-GDP mechanism: in ~ N(mu, 1), out ~ N(0, 1), each in with probability 1/2."""
    rng = np.random.default_rng(seed)
    included = rng.random(count) < 0.5
    return rng.normal(size=count) + mu * included, included


def test_gdp_audit_is_sound_and_reaches_most_of_a_gaussians_epsilon() -> None:
    above = sum(gdp_audit(*gaussian_trials(1.0, 1000, seed), 1e-5).mu_lower_bound > 1.0 for seed in range(200))
    assert above <= 10  # at most beta = 5% of the draws exceed the true mu (Bonferroni: far fewer)
    audit = gdp_audit(*gaussian_trials(1.0, 2000, 0), 1e-5)
    assert 0.75 < audit.mu_lower_bound <= 1.0
    assert audit.epsilon_lower_bound >= 0.75 * gdp_epsilon(1.0, 1e-5)  # one-run reaches ~0.3x here
    assert audit.epsilon_lower_bound == pytest.approx(gdp_epsilon(audit.mu_lower_bound, 1e-5))
    assert audit.tp + audit.fn + audit.fp + audit.tn == 2000 and audit.candidates == 64
    blind = gdp_audit(*gaussian_trials(0.0, 2000, 1), 1e-5)
    assert blind.mu_lower_bound == 0.0 and blind.epsilon_lower_bound == 0.0
