"""Gradient matching on a `vqc` gradient from many random starts, run as one batched problem.

Kumar et al. 2023 minimise the attack loss D(x') (attacks/quantum_oracle.py) with Adam
(lr 0.01, 60 iterations) from random starts in [0, 1)^F. Here all R restarts are one tensor
of candidates (R, F): one broadcast circuit call evaluates every restart's gradient, and
because the restarts' losses are independent, the gradient of their sum moves each restart
exactly as its own Adam run would. The reconstruction is the restart with the lowest attack
loss (the attacker cannot see the truth); success, scored later, is the distance to the truth.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from fedsim.attacks.quantum_oracle import QuantumGradientOracle
from fedsim.core.attack import GradientAttack, GradientTarget, Reconstruction
from fedsim.core.errors import UserError
from fedsim.core.registry import ATTACKS
from fedsim.core.seeding import torch_generator

THREAT_MODEL = (
    "honest-but-curious server (Kumar et al.): knows the circuit, weights, observable and loss; "
    "sees one client's SGD update (Kumar et al.: one example, one step)"
)


class QuantumAttackParams(BaseModel):
    """What every quantum attack's threat model may grant: the label or not."""

    model_config = ConfigDict(extra="forbid")

    labels: Literal["unknown", "known"] = Field(
        "unknown",
        description="known: the server also knows the example's label (Kumar et al.); "
        "unknown: the loss derivative is solved for (least squares)",
    )


class QuantumAttack(GradientAttack):
    """Shared by the quantum attacks: threat model, oracle, seeded randomness, output."""

    params: QuantumAttackParams
    takes_batches: ClassVar[bool] = True
    """The attack inverts a batch's averaged gradient and several local steps (the candidate
    is every example behind the update); False: one example's single step only."""

    @property
    def threat_model(self) -> str:  # type: ignore[override]
        return THREAT_MODEL + (", and its label" if self.params.labels == "known" else "")

    def oracle(self, target: GradientTarget) -> QuantumGradientOracle:
        label = None
        if self.params.labels == "known":
            if target.known_labels is None:
                raise UserError(
                    "attack labels: known, but the target carries no labels; set labels: unknown"
                )
            label = target.known_labels
        return QuantumGradientOracle.for_target(target, label, batches=self.takes_batches)

    def generator(self, target: GradientTarget) -> torch.Generator:
        return torch_generator(self.seed, "quantum", target.server_round, target.client)

    @staticmethod
    def reconstruction(
        target: GradientTarget,
        oracle: QuantumGradientOracle,
        x: Tensor,
        label: Tensor,
        loss: float,
        **details: object,
    ) -> Reconstruction:
        """The reconstructed examples x (n F,), shaped like the data, with the labels they imply.

        `details["period"]` tells the scorer the inputs are periodic (Fourier encoding).
        """
        return Reconstruction(
            images=x.detach().float().reshape(-1, *target.input_shape),
            labels=label.detach().reshape(-1),
            attack_loss=loss,
            details={"period": oracle.period, **details},
        )


def into_domain(x: Tensor, period: float | None) -> Tensor:
    """Wrap periodic inputs onto [0, period), clamp others to [0, 1]."""
    return torch.remainder(x, period) if period is not None else x.clamp(0, 1)


def local_search(
    oracle: QuantumGradientOracle, starts: Tensor, iterations: int, lr: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Adam on D from every start at once: final points (R, F), losses (R,), implied labels (R,)."""
    x = starts.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    for _ in range(iterations):
        optimizer.zero_grad()
        oracle(x).loss.sum().backward()
        optimizer.step()
        with torch.no_grad():
            x.copy_(into_domain(x, oracle.period))
    final = oracle(x.detach(), create_graph=False)
    return x.detach(), final.loss.detach(), final.labels


@ATTACKS.register("quantum_gradient_matching")
class QuantumGradientMatching(QuantumAttack):
    """Gradient matching on a vqc's gradient: Adam from many random starts, batched (Kumar et al.)."""

    class Params(QuantumAttackParams):
        restarts: int = Field(100, ge=1, description="random starts, all optimised together")
        iterations: int = Field(60, ge=1, description="Adam iterations (Kumar et al.: 60)")
        lr: float = Field(0.01, gt=0, description="Adam learning rate (Kumar et al.: 0.01)")

    params: Params

    def reconstruct(self, target: GradientTarget) -> Reconstruction:
        oracle = self.oracle(target)
        starts = torch.rand(
            self.params.restarts,
            oracle.dimension,
            generator=self.generator(target),
            dtype=torch.float64,
        )
        x, loss, labels = local_search(oracle, starts, self.params.iterations, self.params.lr)
        best = int(loss.argmin())
        return self.reconstruction(
            target,
            oracle,
            x[best],
            labels[best],
            float(loss[best]),
            restarts=self.params.restarts,
            restart_losses=loss.tolist(),
        )
