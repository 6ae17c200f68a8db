"""Local DP on the update with Flower's `LocalDpMod`, and the epsilon it composes to.

Flower's mod clips the update (weights sent minus weights received) to L2 norm C and adds
Gaussian noise of the classic calibration (Dwork & Roth, Thm 3.22)

    std = sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon,

so each release is (epsilon, delta)-DP at the client level for that round. That theorem is
proved for epsilon < 1; at any epsilon the noise is a Gaussian mechanism with noise multiplier
z = std / sensitivity, and fedsim reports, per client, `local_dp_epsilon`: the RDP composition
of the k releases the client has made so far (k counted in Flower's `Context.state`), at the
same delta. The default sensitivity is 2C: any two clipped updates differ by at most 2C.

The defense runs as Flower's mod itself (`client_mod`), after every update-time `transform`;
the mod draws from numpy's global generator, which fedsim's ClientApp seeds per client and
round (see `fedsim.federation.client.defense_mods`).
"""

from __future__ import annotations

import math
from typing import ClassVar

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.mod import LocalDpMod
from flwr.clientapp.typing import ClientAppCallable, Mod
from pydantic import BaseModel, ConfigDict, Field

from fedsim.defenses.central_dp import tolerating_zero_updates
from fedsim.core.defense import Defense, PrivacyUnit, Stage
from fedsim.core.registry import DEFENSES

RELEASES_KEY = "fedsim.local_dp"


@DEFENSES.register("local_dp")
class LocalDp(Defense):
    """Flower's LocalDpMod: clip the update to C, add (epsilon, delta) Gaussian noise."""

    stage: ClassVar[Stage] = "update"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        clipping_norm: float = Field(1.0, gt=0, description="L2 bound C on the update")
        sensitivity: float | None = Field(
            None, gt=0, description="L2 sensitivity of the clipped update (null: 2 * clipping_norm)"
        )
        epsilon: float = Field(1.0, gt=0, description="epsilon of one release (one round)")
        delta: float = Field(1e-5, gt=0, lt=1, description="delta of one release")

    params: Params

    @property
    def sensitivity(self) -> float:
        return self.params.sensitivity or 2 * self.params.clipping_norm

    @property
    def noise_std(self) -> float:
        p = self.params
        return self.sensitivity * math.sqrt(2 * math.log(1.25 / p.delta)) / p.epsilon

    def privacy_unit(self) -> PrivacyUnit:
        """The client's whole update in one round, replace-one: local DP holds for any two
        inputs, which the sensitivity 2C of a clipped update bounds (a smaller `sensitivity`
        does not: say so)."""
        p = self.params
        short = self.sensitivity < 2 * p.clipping_norm
        not_covered = f"two updates further apart than sensitivity {self.sensitivity:g} < 2C" if short else ""
        return PrivacyUnit("client", "replace-one", p.delta, "rdp", "local_dp_epsilon", not_covered)

    def composed_epsilon(self, releases: int) -> float:
        """RDP epsilon of `releases` Gaussian releases with z = noise_std / sensitivity."""
        from opacus.accountants import RDPAccountant  # here: validating Params needs no Opacus

        accountant = RDPAccountant()
        accountant.history = [(self.noise_std / self.sensitivity, 1.0, releases)]
        return float(accountant.get_epsilon(self.params.delta))

    def client_mod(self) -> Mod:
        p = self.params
        flower_mod = tolerating_zero_updates(
            LocalDpMod(p.clipping_norm, self.sensitivity, p.epsilon, p.delta)
        )

        def local_dp_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
            reply = flower_mod(message, context, call_next)
            if reply.has_error():
                return reply
            record = context.state.get(RELEASES_KEY)
            releases = (int(record["releases"]) if record is not None else 0) + 1
            context.state[RELEASES_KEY] = ConfigRecord({"releases": releases})
            reply.content["metrics"]["local_dp_epsilon"] = self.composed_epsilon(releases)
            return reply

        return local_dp_mod
