"""Client-level central DP: Flower's four DP strategy wrappers, with the epsilon they spend.

Each round the server releases one noised average of the cohort's clipped updates (new
weights minus the global ones). Clipping bounds each client's contribution to C; the average
gets Gaussian noise of std `z * C / m` (Flower's `compute_stdv`, m = cohort size).

| defense | who clips | clipping norm C |
|---|---|---|
| `central_dp_fixed` | server | fixed |
| `central_dp_fixed_client` | client (Flower's `fixedclipping_mod`) | fixed |
| `central_dp_adaptive` | server | adapted to a target quantile of update norms (Andrew et al. 2021) |
| `central_dp_adaptive_client` | client (Flower's `adaptiveclipping_mod`) | as above |

The client-side variants return Flower's mod from `client_mod`, so fedsim's ClientApp runs it
only in scenarios that use them; the server then sees clipped (but not noised) updates.

Accounting (`accounting: true`, the default) composes one Gaussian release per aggregated
round with Rényi DP, without amplification by sampling: the epsilon holds however the cohort
is chosen. It needs what the noise calibration assumes, so it refuses the rest (when the
scenario is validated, `check_scenario`, and again when the server wraps the strategy):

- the inner strategy must release the plain FedAvg average (fedavg, fedprox). FedAdam and
  FedAvgM change the average before the wrapper adds noise to their output; with
  `accounting: false` any strategy is wrapped, and no epsilon is reported;
- every client weighs 1/m: the inner strategy averages by the constant `unit-weight` metric
  each fedsim client reports, not by example counts;
- every sampled client replies: a round with a failed or dropped client (see the scenario's
  `faults` and `federation.accept_failures`) releases nothing, so the model stays and no
  epsilon is composed for it (Flower's accounted fixed-clipping mode does the same).

Fixed clipping uses Flower's own accounted mode. Flower's adaptive wrappers have no accountant;
fedsim accounts them the same way, per round, for the two releases they make: the noised sum
(noise multiplier z_d, the one Flower derives from the requested z) and the noised count of
clipped clients (std sigma_b). Andrew et al.'s z = (z_d^-2 + (2 sigma_b)^-2)^-1/2 assumes
centred bits (b - 1/2, sensitivity 1/2); Flower's clients send 0/1 bits (sensitivity 1), so
fedsim accounts with the effective z_eff = (z_d^-2 + sigma_b^-2)^-1/2, a little below the
requested z. The clipping norm itself is post-processing of earlier releases.

Flower 1.41's adaptive wrappers move the clipping norm the wrong way: their clients' bit means
"clipped" (Andrew et al.'s, and Flower's older DP-FedAvg client's, means "not clipped"), but
the update C <- C exp(-lr (fraction - target)) was kept, so C shrinks while most updates are
clipped and the norm collapses. fedsim's wrappers update it as C <- C exp(lr (clipped fraction
- target_clipped_quantile)), which converges to the norm that clips the target fraction.

They also update the norm before adding the noise, so updates clipped to C_t were noised with
std z C_{t+1} / m (effective multiplier z C_{t+1} / C_t, set by the noisy count, unbounded
below). fedsim's wrappers move the norm after the noise: std z C_t / m, the accounted z_d.

The neighbouring relation is client-level zero-out (`privacy_unit`): m is fixed and every
sampled client must reply, so a neighbour has one client's update (and bit) set to zero.

Flower 1.41's clipping divides by the update's norm (factor min(1, C / ||u||)), so an update
that is exactly zero (the weights came back unchanged, e.g. under a saturated loss) raises
ZeroDivisionError mid-run. `tolerating_zero_updates` runs Flower's DP code with that norm as a
numpy float, whose division by zero gives inf: the factor is 1, the update stays zero and
counts as not clipped. Every fedsim wrapper and mod that clips goes through it.

Flower's RDP backend (`flwr.serverapp.RdpAccountant`) needs the optional `dp-accounting`
package (`flwr[dp]`), which fedsim does not depend on; `OpacusRdpAccountant` gives the wrappers
the same RDP composition computed by Opacus, which fedsim already has.
"""

from __future__ import annotations

import functools
import math
from abc import abstractmethod
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from unittest.mock import patch

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import Mod
from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    PrivacySpent,
    SamplingMethod,
)
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.supercore import differential_privacy as flower_dp
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedsim.core.defense import PrivacyUnit, ServerTimeDefense
from fedsim.core.errors import UserError
from fedsim.core.registry import DEFENSES, STRATEGIES

if TYPE_CHECKING:
    from fedsim.core.config import Scenario

F = TypeVar("F", bound=Callable[..., Any])
_flower_get_norm = flower_dp.get_norm


def tolerating_zero_updates(function: F) -> F:
    """`function` with Flower's clipping made safe for an all-zero update (module docstring)."""

    @functools.wraps(function)
    def safe(*args: Any, **kwargs: Any) -> Any:
        norm = lambda arrays: np.float64(_flower_get_norm(arrays))
        with patch.object(flower_dp, "get_norm", norm), np.errstate(divide="ignore"):
            return function(*args, **kwargs)

    return safe  # type: ignore[return-value]


class OpacusRdpAccountant:
    """The part of Flower's `PrivacyAccountant` protocol that the DP wrappers use, on Opacus.

    Without amplification every release is a full Gaussian mechanism, i.e. Opacus's sampled
    Gaussian with sampling rate 1.
    """

    def __init__(self, config: PrivacyConfig) -> None:
        if config.sampling_method is not SamplingMethod.NO_AMPLIFICATION:
            raise ValueError("OpacusRdpAccountant accounts only no-amplification releases")
        from opacus.accountants import RDPAccountant  # here: validating Params needs no Opacus

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


class CentralDpParams(BaseModel):
    """What every central-DP defense takes."""

    model_config = ConfigDict(extra="forbid")

    noise_multiplier: float = Field(
        1.0, ge=0, description="noise std / clipping norm, before dividing by the cohort"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the reported epsilon")
    accounting: bool = Field(
        True,
        description="report epsilon (needs fedavg/fedprox and noise_multiplier > 0); false: "
        "wrap any strategy, report no epsilon",
    )

    @model_validator(mode="after")
    def _noise_for_accounting(self) -> CentralDpParams:
        if self.accounting and self.noise_multiplier == 0:
            raise ValueError("noise_multiplier must be > 0 for an epsilon; or accounting: false")
        return self


class FixedParams(CentralDpParams):
    clipping_norm: float = Field(1.0, gt=0, description="bound C on each client's update")


class AdaptiveParams(CentralDpParams):
    initial_clipping_norm: float = Field(0.1, gt=0, description="C in round 1")
    target_clipped_quantile: float = Field(
        0.5, ge=0, le=1, description="fraction of updates the norm adapts to clip"
    )
    clip_norm_lr: float = Field(0.2, gt=0, description="geometric step of the norm update")
    clipped_count_stddev: float | None = Field(
        None,
        ge=0,
        description="noise std on the count of clipped clients (null: cohort / 20, Flower's "
        "default; it must exceed noise_multiplier / 2)",
    )


def _averages_plainly(strategy: type) -> bool:
    """Whether `strategy` releases FedAvg's own average (what the noise is calibrated to)."""
    return issubclass(strategy, FedAvg) and strategy.aggregate_train is FedAvg.aggregate_train


class CentralDp(ServerTimeDefense):
    """Wraps the strategy in one of Flower's DP wrappers; reports epsilon and clipping norm."""

    Params: ClassVar[type[CentralDpParams]]
    mod: ClassVar[Mod | None] = None  # Flower's client mod, for the client-side variants
    takes_client_canaries: ClassVar[bool] = True  # the wrapper clips and noises them with the cohort (canary_clients)

    params: CentralDpParams
    _strategy: Any = None
    _accountant: OpacusRdpAccountant | None = None

    @classmethod
    def check_scenario(cls, params: BaseModel, scenario: Scenario) -> None:
        """Refuse, at validation, a strategy the wrapper cannot account for or be built
        around (e.g. fedadam with accounting), as the server would when it starts."""
        spec = scenario.federation.strategy
        strategy = STRATEGIES.get(spec.name).build(spec.params)
        try:
            cls(params).wrapped(strategy, scenario.cohort_size)
        except UserError as err:
            raise ValueError(f"defenses.{err}") from None

    def wrap(self, strategy: Strategy, cohort_size: int, total_rounds: int) -> Strategy:
        """Flower's wrapper around `strategy`; with accounting, every client weighs 1/m."""
        if self.params.accounting:
            strategy.weighted_by_key = "unit-weight"
            self._accountant = OpacusRdpAccountant(
                PrivacyConfig(
                    target_delta=self.params.delta,
                    population_size=cohort_size,  # only labels events without amplification
                    neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                    sampling_method=SamplingMethod.NO_AMPLIFICATION,
                )
            )
        self._strategy = self.wrapped(strategy, cohort_size)
        return self._strategy

    def wrapped(self, strategy: Strategy, cohort_size: int) -> Strategy:
        """`build`, or a UserError naming the defense when `strategy` breaks its guarantee
        (it changes the average the noise is calibrated to) or Flower's wrapper refuses it."""
        name = self.registered_name
        if self.params.accounting and not _averages_plainly(type(strategy)):
            raise UserError(
                f"{name}: strategy {type(strategy).__name__} changes the average before "
                "the DP noise is added, so no epsilon holds; use fedavg or fedprox, or "
                "set accounting: false (no epsilon reported)"
            )
        try:
            return self.build(strategy, cohort_size)
        except ValueError as err:
            raise UserError(f"{name}: {err}") from None

    @abstractmethod
    def build(self, strategy: Strategy, cohort_size: int) -> Strategy:
        """The Flower wrapper (accounting with `self._accountant` when it is set)."""

    def client_mod(self) -> Mod | None:
        return self.mod

    def current_clipping_norm(self) -> float:
        """The norm this round's updates are clipped to (adaptive variants move it each round)."""
        return float(self._strategy.clipping_norm)

    def privacy_unit(self) -> PrivacyUnit | None:
        """Client-level, zero-out: the cohort size m is fixed (every sampled client must
        reply, and the sum is divided by m), so the neighbour keeps m clients, one of them
        sending a zero update (sensitivity C of the sum; its clipped bit becomes 0). Reported
        as the round metric "epsilon" (the server records `central_epsilon`)."""
        if not self.params.accounting:
            return None
        return PrivacyUnit(
            level="client",
            relation="zero-out",
            delta=self.params.delta,
            accountant="rdp",
            metric="epsilon",
            not_covered="the metrics clients send in the clear with their updates",
        )

    def round_metrics(self, server_round: int) -> dict[str, float]:
        """The epsilon of all the aggregates released so far, and the clipping norm."""
        metrics = {"clipping_norm": float(self._strategy.clipping_norm)}
        if self._accountant is not None:
            metrics["epsilon"] = self._accountant.get_epsilon(self.params.delta)
        return metrics


class ServerSideFixed(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, safe for all-zero updates."""

    @tolerating_zero_updates
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(server_round, replies)


@DEFENSES.register("central_dp_fixed")
class CentralDpFixed(CentralDp):
    """Client-level central DP: server-side fixed clipping + Gaussian noise (Flower)."""

    Params = FixedParams
    params: FixedParams
    wrapper: ClassVar[type] = ServerSideFixed

    def build(self, strategy: Strategy, cohort_size: int) -> Strategy:
        """Flower's fixed-clipping wrapper, in its own accounted mode when accounting."""
        p = self.params
        return self.wrapper(
            strategy,
            p.noise_multiplier,
            p.clipping_norm,
            num_sampled_clients=cohort_size,
            accountant=self._accountant,
        )


@DEFENSES.register("central_dp_fixed_client")
class CentralDpFixedClient(CentralDpFixed):
    """Client-level central DP: client-side fixed clipping (Flower's mod) + server noise."""

    wrapper = DifferentialPrivacyClientSideFixedClipping
    mod = staticmethod(tolerating_zero_updates(fixedclipping_mod))


class AccountedAdaptive:
    """Per-round accounting, the corrected norm update and zero-update safety, mixed in
    before a Flower adaptive-clipping wrapper (see the module docstring).

    One composed event per aggregated round, with the effective noise multiplier of the
    round's two releases.
    """

    accountant: OpacusRdpAccountant | None = None
    noise_multiplier: float
    clipped_count_stddev: float
    num_sampled_clients: int
    clipping_norm: float
    clip_norm_lr: float
    target_clipped_quantile: float

    @property
    def effective_noise_multiplier(self) -> float:
        """z_eff = (z_d^-2 + sigma_b^-2)^-1/2: the sum (sensitivity C) and the 0/1 count."""
        return (self.noise_multiplier**-2 + self.clipped_count_stddev**-2) ** -0.5

    _pending_fraction: float | None = None

    def _geometric_update(self, clipped_fraction: float) -> None:
        """Flower calls this before it adds the noise; keep the fraction for after it, so the
        noise std is z * C_t / m with C_t the norm this round's updates were clipped to
        (Flower's order noises with C_{t+1}: effective multiplier z C_{t+1} / C_t, unbounded)."""
        self._pending_fraction = clipped_fraction

    def _apply_norm_update(self) -> None:
        """C <- C exp(lr (clipped fraction - target)): grow while too many are clipped."""
        if self._pending_fraction is not None:
            self.clipping_norm *= math.exp(
                self.clip_norm_lr * (self._pending_fraction - self.target_clipped_quantile)
            )
            self._pending_fraction = None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self.accountant is not None and len(replies) != self.num_sampled_clients:
            # the noise is calibrated to the full cohort: release nothing (as Flower's
            # accounted fixed-clipping mode does); the model stays, no epsilon is spent
            return None, None
        aggregate = tolerating_zero_updates(super().aggregate_train)  # type: ignore[misc]
        arrays, metrics = aggregate(server_round, replies)
        self._apply_norm_update()
        if arrays is not None and self.accountant is not None:
            self.accountant.compose(
                GaussianPrivacyEvent(
                    self.effective_noise_multiplier,
                    len(replies),
                    self.accountant.config.population_size,
                )
            )
        return arrays, metrics


class AccountedServerSideAdaptive(AccountedAdaptive, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, accounted."""


class AccountedClientSideAdaptive(AccountedAdaptive, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping, accounted."""


@DEFENSES.register("central_dp_adaptive")
class CentralDpAdaptive(CentralDp):
    """Client-level central DP: server-side adaptive clipping (Andrew et al.) + noise (Flower)."""

    Params = AdaptiveParams
    params: AdaptiveParams
    wrapper: ClassVar[type[AccountedAdaptive]] = AccountedServerSideAdaptive

    def build(self, strategy: Strategy, cohort_size: int) -> Strategy:
        p = self.params
        wrapped = self.wrapper(
            strategy,
            p.noise_multiplier,
            cohort_size,
            initial_clipping_norm=p.initial_clipping_norm,
            target_clipped_quantile=p.target_clipped_quantile,
            clip_norm_lr=p.clip_norm_lr,
            clipped_count_stddev=p.clipped_count_stddev,
        )
        wrapped.accountant = self._accountant
        return wrapped

    def round_metrics(self, server_round: int) -> dict[str, float]:
        metrics = super().round_metrics(server_round)
        if self._accountant is not None:
            metrics["effective_noise_multiplier"] = self._strategy.effective_noise_multiplier
        return metrics


@DEFENSES.register("central_dp_adaptive_client")
class CentralDpAdaptiveClient(CentralDpAdaptive):
    """Client-level central DP: client-side adaptive clipping (Flower's mod) + server noise."""

    wrapper = AccountedClientSideAdaptive
    mod = staticmethod(tolerating_zero_updates(adaptiveclipping_mod))

