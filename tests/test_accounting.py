"""Every epsilon fedsim reports, checked against dp-accounting's PLD accountant.

Each accountant must be sound (epsilon >= PLD's, up to 1e-6) and not wasteful (at most a
stated factor above PLD). PLD (Koskela et al.; Google's dp-accounting) is tight for the
Poisson-subsampled Gaussian, so it is the independent reference.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fedsim.defenses.diff2 import epsilon_after
from fedsim.defenses.dp_sgd import DpSgd, history_epsilon
from fedsim.defenses.local_dp import LocalDp
from dp_reference import DELTA, pld_epsilon, within

GRID = [
    (q, sigma, steps)
    for q in (1 / 129, 0.1, 1.0)
    for sigma in (0.5, 1.0, 2.0)
    for steps in (1, 10, 100)
]


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize(("q", "sigma", "steps"), GRID)
def test_dp_sgd_epsilon_bounds_pld(accountant: str, q: float, sigma: float, steps: int) -> None:
    reported = history_epsilon([[sigma, q, steps]], accountant, DELTA)
    reference = pld_epsilon(q, sigma, steps)
    assert within(reported, reference, accountant)


@pytest.mark.parametrize(("sigma", "steps"), [(0.5, 10), (1.0, 1), (1.0, 100), (2.0, 10)])
def test_dp_gd_epsilon_bounds_pld(sigma: float, steps: int) -> None:
    """DP-GD / DIFF2: full-batch Gaussian releases (q = 1), Opacus RDP."""
    reported = epsilon_after({"gradient": steps}, {"gradient": sigma}, DELTA)
    reference = pld_epsilon(1.0, sigma, steps)
    assert within(reported, reference, "rdp")


@pytest.mark.parametrize("releases", [1, 10, 50])
def test_local_dp_epsilon_bounds_pld(releases: int) -> None:
    """LocalDpMod's Gaussian noise (std from the stated epsilon), composed with RDP."""
    defense = LocalDp(LocalDp.Params(epsilon=1.0, delta=DELTA))
    z = defense.noise_std / defense.sensitivity
    reported = defense.composed_epsilon(releases)
    reference = pld_epsilon(1.0, z, releases)
    assert within(reported, reference, "rdp")
    if releases == 1:  # one release: the classic calibration's epsilon holds (epsilon < 1)
        assert reference <= 1.0 + 1e-6


def test_gdp_is_refused() -> None:
    with pytest.raises(ValidationError, match="gdp is not offered"):
        DpSgd.Params(accountant="gdp")


def test_non_poisson_sampling_is_refused() -> None:
    with pytest.raises(ValidationError, match="poisson_sampling: false is refused"):
        DpSgd.Params(poisson_sampling=False)


def test_default_accountant_is_prv() -> None:
    assert DpSgd.Params().accountant == "prv"


@pytest.mark.parametrize(("sigma", "rounds"), [(0.5, 10), (1.0, 1), (1.0, 100), (2.0, 10)])
def test_central_dp_epsilon_bounds_pld(sigma: float, rounds: int) -> None:
    """Central DP's accountant: one Gaussian release per round, no amplification (q = 1)."""
    from flwr.serverapp import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )

    from fedsim.defenses.central_dp import OpacusRdpAccountant

    config = PrivacyConfig(
        DELTA, 10, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION
    )
    accountant = OpacusRdpAccountant(config)
    accountant.compose(GaussianPrivacyEvent(sigma, 10, 10), count=rounds)
    assert within(accountant.get_epsilon(DELTA), pld_epsilon(1.0, sigma, rounds), "rdp")


def test_delta_at_least_one_over_n_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedsim.defenses.dp_sgd as dp_sgd

    warnings: list[str] = []
    monkeypatch.setattr(dp_sgd.log, "warning", lambda message, *args: warnings.append(message % args))
    dp_sgd._warn_large_delta(1e-5, 1000)
    assert not warnings
    dp_sgd._warn_large_delta(0.05, 50)
    assert warnings and warnings[0].startswith("dp_sgd.delta: 0.05 >= 1/n")
