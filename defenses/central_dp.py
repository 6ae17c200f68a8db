"""Client-level central DP: Flower's server-side fixed-clipping wrapper, with its epsilon.

The server clips each client's update (its new weights minus the global ones) to
`clipping_norm` C, averages them with FedAvg and adds Gaussian noise of std
`noise_multiplier * C / cohort_size` (Flower's `compute_stdv`) to the average.

The epsilon comes from the wrapper's own "accounted" mode: it composes one Gaussian release per
aggregated round, and it refuses, with an error, the cases its guarantee does not cover: a
strategy that does not aggregate with `FedAvg.aggregate_train`, unequal client weights (the
noise covers one client's share C/m only when every client weighs 1/m: clients must report
equal `weighted_by_key` metrics), or a cohort with missing replies.
Flower's fixed-clipping accounting supports only `no-amplification`, so no privacy is claimed
from sampling the cohort: the epsilon holds however the clients are chosen.

Flower's RDP backend (`flwr.serverapp.RdpAccountant`) needs the optional `dp-accounting`
package (`flwr[dp]`), which fedsim does not depend on; `OpacusRdpAccountant` gives the wrapper
the same RDP composition computed by Opacus, which fedsim already has.
"""

from __future__ import annotations

from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    PrivacySpent,
    SamplingMethod,
)
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy
from opacus.accountants import RDPAccountant
from pydantic import BaseModel, ConfigDict, Field

from fedsim.defense import ServerTimeDefense
from fedsim.errors import UserError
from fedsim.registry import DEFENSES


class OpacusRdpAccountant:
    """The part of Flower's `PrivacyAccountant` protocol that the DP wrappers use, on Opacus.

    Without amplification every release is a full Gaussian mechanism, i.e. Opacus's sampled
    Gaussian with sampling rate 1.
    """

    def __init__(self, config: PrivacyConfig) -> None:
        if config.sampling_method is not SamplingMethod.NO_AMPLIFICATION:
            raise ValueError("OpacusRdpAccountant accounts only no-amplification releases")
        self.config = config
        self._rdp = RDPAccountant()

    @property
    def num_releases(self) -> int:
        return sum(steps for _, _, steps in self._rdp.history)

    def compose(self, event: GaussianPrivacyEvent, count: int = 1) -> None:
        self._rdp.history.append((event.noise_multiplier, 1.0, count))

    def get_epsilon(self, delta: float) -> float:
        return float(self._rdp.get_epsilon(delta))

    def get_privacy_spent(self, delta: float | None = None) -> PrivacySpent:
        delta = self.config.target_delta if delta is None else delta
        epsilon, order = self._rdp.get_privacy_spent(delta=delta)
        return PrivacySpent(float(epsilon), delta, self.num_releases, "rdp", float(order))


@DEFENSES.register("central_dp_fixed")
class CentralDpFixed(ServerTimeDefense):
    """Client-level central DP: server-side fixed clipping + Gaussian noise (Flower)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        noise_multiplier: float = Field(
            1.0, gt=0, description="noise std / clipping_norm, before dividing by the cohort"
        )
        clipping_norm: float = Field(1.0, gt=0, description="bound C on each client's update")
        delta: float = Field(1e-5, gt=0, lt=1, description="delta of the reported epsilon")

    params: Params
    _strategy: DifferentialPrivacyServerSideFixedClipping | None = None

    def wrap(
        self, strategy: Strategy, cohort_size: int, total_rounds: int
    ) -> DifferentialPrivacyServerSideFixedClipping:
        """Flower's wrapper in accounted mode; every round must aggregate exactly `cohort_size`.

        Client-level DP weighs every client equally, so the inner strategy averages by the
        constant `unit-weight` each fedsim client reports instead of by example counts.
        """
        strategy.weighted_by_key = "unit-weight"
        accountant = OpacusRdpAccountant(
            PrivacyConfig(
                target_delta=self.params.delta,
                population_size=cohort_size,  # only labels the events without amplification
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
        try:
            self._strategy = DifferentialPrivacyServerSideFixedClipping(
                strategy,
                self.params.noise_multiplier,
                self.params.clipping_norm,
                num_sampled_clients=cohort_size,
                accountant=accountant,
            )
        except ValueError as err:
            raise UserError(f"central_dp_fixed: {err}") from None
        return self._strategy

    def round_metrics(self, server_round: int) -> dict[str, float]:
        """The epsilon of all the aggregates released so far (one per aggregated round)."""
        return {"epsilon": self._strategy.privacy_spent().epsilon}
