"""Loss-threshold membership inference (Yeom, Giacomelli, Fredrikson, Jha 2018).

Threat model 3 (DESIGN.md), model holder, black-box: the attacker queries the final global
model on a candidate example (x, y) and reads its loss. Training drives the loss of members
down, so the score is

    score(x, y) = -loss(f_theta(x), y)

and "member" is guessed above a threshold. The ROC curve (`fedsim.evaluation.membership`)
sweeps every threshold; Yeom et al.'s fixed threshold (the mean training loss) is one point on
it. The baseline every other membership attack is compared with: it ignores that some
examples are simply easy (low loss whether or not they were trained on), which is what LiRA
and RMIA calibrate away with reference models.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedsim.attacks.membership_signals import example_losses
from fedsim.core.membership import MembershipAttack, MembershipTarget
from fedsim.core.registry import ATTACKS, NoParams


def loss_threshold_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-loss of every candidate under the target model (N,): higher = more likely a member."""
    return -example_losses(model, x, y)


@ATTACKS.register("loss_threshold")
class LossThreshold(MembershipAttack):
    """Loss-threshold membership inference (Yeom et al. 2018) on the final global model."""

    threat_model = "model holder, black-box: the final model's loss on each candidate"
    Params = NoParams

    def score(self, target: MembershipTarget) -> np.ndarray:
        return loss_threshold_scores(target.model, target.x, target.y).numpy()
