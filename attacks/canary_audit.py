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
"""

from __future__ import annotations

import numpy as np
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

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        beta: float = Field(0.05, gt=0, lt=0.5, description="1 - confidence of the lower bound")

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
        rounds: dict[int, list[GradientTarget]] = {}
        for update in target.updates:
            rounds.setdefault(update.server_round, []).append(update)
        if not any(len(updates) > 1 for updates in rounds.values()):
            raise UserError(
                "canary_update_audit compares clients of a round: record at least two "
                "(observer.clients: all)"
            )
        scores = np.zeros(len(target.y))
        for updates in (u for u in rounds.values() if len(u) > 1):
            aligned = np.stack([alignment_scores(u, target.x, target.y).numpy() for u in updates])
            for row, update in enumerate(updates):
                mine = target.canary_clients == update.client
                control = np.delete(aligned, row, axis=0).mean(0)  # the other clients' pull
                scores[mine] += aligned[row, mine] - control[mine]
        return scores
