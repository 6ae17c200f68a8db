"""dp-accounting's tight PLD epsilon, the independent reference the privacy tests compare with."""

from __future__ import annotations

from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
from dp_accounting.pld import PLDAccountant

DELTA = 1e-5
# How far above the tight PLD epsilon each accountant may report: factor * PLD + slack. The
# slack covers tiny epsilons: PRV's absolute error (eps_error 0.01), RDP's order grid.
FACTOR = {"prv": 1.05, "rdp": 2.5}
SLACK = {"prv": 0.02, "rdp": 0.8}


def within(reported: float, reference: float, accountant: str) -> bool:
    """Sound (not below PLD) and at most factor * PLD + slack."""
    return reference - 1e-6 <= reported <= FACTOR[accountant] * reference + SLACK[accountant]


def pld_epsilon(q: float, sigma: float, steps: int, delta: float = DELTA) -> float:
    """The PLD epsilon of `steps` Poisson-subsampled (rate q) Gaussian steps, noise multiplier sigma."""
    event = GaussianDpEvent(sigma)
    if q < 1:
        event = PoissonSampledDpEvent(q, event)
    accountant = PLDAccountant(value_discretization_interval=1e-3)
    accountant.compose(SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)
