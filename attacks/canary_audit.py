"""The auditor's attacks on canaries, black-box (final model) and white-box (every update).

Threat model 5 (DESIGN.md), auditor: it plants mislabelled canaries (`data.canaries`,
`fedsim.data.canaries`), each designated to a client and included with probability 1/2. The
membership stage turns the scores of included and excluded canaries into Steinke et al.'s
one-run epsilon lower bound (`fedsim.evaluation.auditing.one_run_audit`) and compares it with
the run's reported example-level epsilon.

- `canary_audit` (black-box, final model): the loss-threshold score of the canary's wrong
  label, -loss(f_theta(x), y'); only a model that trained on the canary has reason to fit y'.
- `canary_update_audit` (white-box, the curious server's view of every observed round): the
  alignment of the designated client's update with the canary's negative gradient at the sent
  model (`update_membership`), minus its mean alignment with the other clients' updates of the
  same round (which never hold the canary), summed over rounds. The other clients' updates
  carry the same pull of the ordinary data on the canary's gradient direction, so the
  difference leaves the canary's own clipped gradient plus noise: under DP-SGD exactly the
  quantity the accountant analyses. Needs every client of a round observed
  (`observer: {rounds: all, clients: all}` for the tightest audit).
- `canary_client_audit` (white-box, client level; `data.canaries.kind: client`): canary
  clients join every cohort under server-side central DP (`central_dp_fixed`), each a Dirac
  update of the clipping norm on its own coordinate, or zero when left out
  (`fedsim.federation.canary_clients`); the score is that coordinate's change from the model
  sent in round 1 to the final one. The bound is compared with the run's client-level epsilon.
- `canary_gradient_audit` (white-box, the strongest setting; `data.canaries.kind: gradient`):
  Dirac gradient canaries, which DP-SGD adds as per-example gradients of norm C on one
  coordinate each. The score is the single-step gradient the designated client's update
  implies on the canary's coordinate, -(returned - sent)[j] / lr, times the expected batch size
  (so it reads as the clipped sum: C for the canary plus N(0, (sigma C)^2) noise plus the
  client's own data's pull on j), minus the same reading of the round's other clients
  (their data's pull on j, never the canary), summed over rounds. With one local plain-SGD
  step per round the reading is exact and the score is the Gaussian mechanism's own
  sufficient statistic. The canaries sit on distinct coordinates, each read through its own
  independent noise, so their scores are independent trials of one Gaussian mechanism and the
  audit stage adds the Gaussian-trade-off bound (`fedsim.evaluation.auditing.gdp_audit`) to
  the one-run bound. Exact for one round; over several rounds the model, hence the data's
  pull on a coordinate, depends on all earlier noise, a dependence the subtraction of the
  other clients' readings removes to first order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fedsim.attacks.loss_threshold import loss_threshold_scores
from fedsim.attacks.update_membership import alignment_scores
from fedsim.core.attack import GradientTarget
from fedsim.core.errors import UserError
from fedsim.core.membership import MembershipAttack, MembershipTarget
from fedsim.core.registry import ATTACKS


@ATTACKS.register("canary_audit")
class CanaryAudit(MembershipAttack):
    """DP audit (Steinke et al. 2023, one run): an epsilon lower bound from mislabelled canaries."""

    threat_model = (
        "auditor: plants mislabelled canaries (each included with probability 1/2), then "
        "queries the final model's loss on them"
    )
    granted = "canaries"
    needs_classes = True
    canary_kind: ClassVar[str] = "input"  # the `data.canaries.kind` it scores
    # whether the canaries' scores are independent trials of one mechanism (no shared
    # randomness), so the Gaussian-trade-off audit may pool them (`auditing.gdp_audit`)
    independent_trials: ClassVar[bool] = False
    audited_level: ClassVar[str] = "example"  # the unit of the reported epsilon it is compared with

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        beta: float = Field(0.05, gt=0, lt=0.5, description="1 - confidence of the lower bound")

    @classmethod
    def check_scenario(cls, params: BaseModel, scenario: Any) -> None:
        super().check_scenario(params, scenario)
        if scenario.data.canaries.kind != cls.canary_kind:
            raise ValueError(
                f"attack '{cls.registered_name}' scores {cls.canary_kind} canaries; set "
                f"data.canaries.kind: {cls.canary_kind}"
            )

    def score(self, target: MembershipTarget) -> np.ndarray:
        return loss_threshold_scores(target.model, target.x, target.y).numpy()


@ATTACKS.register("canary_update_audit")
class CanaryUpdateAudit(CanaryAudit):
    """DP audit (one run), white-box: canaries' gradient alignment with their client's updates."""

    threat_model = (
        "auditor with the curious server's view: plants mislabelled canaries (each included "
        "with probability 1/2) and sees every recorded update of their designated clients"
    )
    sees_updates = True

    def score(self, target: MembershipTarget) -> np.ndarray:
        assert target.canary_clients is not None
        return controlled_scores(
            target, lambda update: alignment_scores(update, target.x, target.y).numpy()
        )


@ATTACKS.register("canary_gradient_audit")
class CanaryGradientAudit(CanaryUpdateAudit):
    """DP audit (one run), white-box: Dirac gradient canaries read off their client's updates."""

    threat_model = (
        "auditor with the curious server's view: plants Dirac gradient canaries (per-example "
        "gradients on one coordinate each, included with probability 1/2) and sees every "
        "recorded update of their designated clients"
    )
    needs_classes = False
    canary_kind = "gradient"
    independent_trials = True  # distinct coordinates, independent noise (see the module doc)

    def score(self, target: MembershipTarget) -> np.ndarray:
        assert target.canary_coordinates is not None
        coordinates = torch.as_tensor(target.canary_coordinates)
        return controlled_scores(target, lambda update: spike_reading(update, coordinates))


def spike_reading(update: GradientTarget, coordinates: torch.Tensor) -> np.ndarray:
    """The clipped-sum gradient one step implies at `coordinates`: -update / lr times Opacus's
    expected batch size (n times the sample rate 1 / ceil(n / batch size)). Under DP the reply
    hides n and the server knows only its plan (batch size times steps): then the factor is
    the same for every client, and the scores rank as unscaled readings."""
    gradient = torch.cat([g.flatten() for g in update.single_step_gradient()])
    n = update.num_examples
    expected_batch = int(n / math.ceil(n / update.batch_size))
    return (gradient[coordinates] * expected_batch).double().numpy()


def controlled_scores(
    target: MembershipTarget, reading: Callable[[GradientTarget], np.ndarray]
) -> np.ndarray:
    """Sum over rounds of each canary's `reading` of its designated client's update, minus the
    mean reading of the round's other clients (which never hold that canary)."""
    rounds: dict[int, list[GradientTarget]] = {}
    for update in target.updates:
        rounds.setdefault(update.server_round, []).append(update)
    if not any(len(updates) > 1 for updates in rounds.values()):
        raise UserError(
            "canary audits on updates compare the clients of a round: record at least two "
            "(observer.clients: all)"
        )
    scores = np.zeros(len(target.canary_clients))
    for updates in (u for u in rounds.values() if len(u) > 1):
        read = np.stack([reading(update) for update in updates])
        for row, update in enumerate(updates):
            mine = target.canary_clients == update.client
            control = np.delete(read, row, axis=0).mean(0)  # the other clients' pull
            scores[mine] += read[row, mine] - control[mine]
    return scores


@ATTACKS.register("canary_client_audit")
class CanaryClientAudit(CanaryUpdateAudit):
    """DP audit, white-box, client level: Dirac canary clients read off the released models."""

    threat_model = (
        "auditor: adds canary clients to every cohort (a Dirac update of the clipping norm on "
        "one coordinate each, or zero, with probability 1/2) and sees the models the server "
        "releases; audits central DP's client-level epsilon"
    )
    needs_classes = False
    canary_kind = "client"
    audited_level = "client"
    independent_trials = True  # distinct coordinates, independent noise (fedsim.federation.canary_clients)

    @classmethod
    def check_scenario(cls, params: BaseModel, scenario: Any) -> None:
        super().check_scenario(params, scenario)
        rounds = scenario.observer.rounds
        if not (rounds == "all" or (isinstance(rounds, list) and 1 in rounds)):
            raise ValueError(
                f"attack '{cls.registered_name}' reads the model sent in round 1; set observer.rounds "
                "to include round 1 (e.g. observer: {rounds: [1], clients: all})"
            )

    def score(self, target: MembershipTarget) -> np.ndarray:
        """The change of each canary's coordinate over the whole run: the final model minus the
        one sent in round 1 (a positive factor away from C x rounds x [in] + noise)."""
        assert target.canary_coordinates is not None
        first = [u for u in target.updates if u.server_round == 1]
        if not first:
            raise UserError(f"attack '{self.name}': no recorded observation of round 1; observe round 1")
        start = torch.cat([p.detach().flatten() for p in first[0].model.parameters()])
        end = torch.cat([p.detach().flatten() for p in target.model.parameters()])
        coordinates = torch.as_tensor(target.canary_coordinates)
        return (end - start)[coordinates].double().numpy()
