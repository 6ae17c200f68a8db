"""fedsim's reported epsilons against dp-accounting's tight PLD, as a markdown table.

    python benchmarks/accountants.py
"""

from __future__ import annotations

from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
from dp_accounting.pld import PLDAccountant

from fedsim.defenses.diff2 import epsilon_after
from fedsim.defenses.dp_sgd import history_epsilon

DELTA = 1e-5
SETTINGS = [(1 / 129, 0.5, 100), (0.01, 1.0, 1000), (0.1, 1.0, 100), (1.0, 2.0, 10)]


def pld_epsilon(q: float, sigma: float, steps: int) -> float:
    event = GaussianDpEvent(sigma) if q == 1 else PoissonSampledDpEvent(q, GaussianDpEvent(sigma))
    accountant = PLDAccountant(value_discretization_interval=1e-3)
    accountant.compose(SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(DELTA)


def main() -> None:
    print("| mechanism | q | sigma | steps | delta | fedsim epsilon | PLD epsilon | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for q, sigma, steps in SETTINGS:
        reference = pld_epsilon(q, sigma, steps)
        rows = [(f"DP-SGD {name}", history_epsilon([[sigma, q, steps]], name, DELTA))
                for name in ("prv", "rdp")]
        if q == 1:  # central DP and DP-GD: one full Gaussian release per round, Opacus RDP
            rows.append(("central DP / DP-GD (rdp)", epsilon_after({"gradient": steps}, {"gradient": sigma}, DELTA)))
        for name, epsilon in rows:
            print(f"| {name} | {q:.4g} | {sigma:g} | {steps} | {DELTA:g} | {epsilon:.3f} | "
                  f"{reference:.3f} | {epsilon / reference:.3f} |")


if __name__ == "__main__":
    main()
