"""SPEAR: exact recovery of a whole batch from a linear layer followed by ReLU (Dimitrov et al. 2024).

Threat model: the honest-but-curious server (one client's update, the weights sent); the model
begins with a linear layer with bias on the flattened input whose outputs go through a ReLU
(`mlp` with relu). No optimisation, no prior. Why this analytic attack and not R-GAP: R-GAP
solves a chain of linear systems layer by layer and is exact only for batch 1 (it needs as
many equations as unknowns per layer); SPEAR recovers a batch of B examples exactly, which
is what a FedAvg client sends.

For z_b = W x_b + b and the batch's loss, dL/dW = G X with G = [g_1 .. g_B] (m x B, g_b =
dL/dz_b) and X = [x_1 .. x_B]^T (B x n): rank B. The SVD gives dL/dW = L R with L (m x B) and
R (B x n), so G = L Q and X = Q^-1 R for an unknown invertible Q (B x B). The ReLU makes G
sparse: g_bi = 0 wherever example b left unit i inactive (about half the units). A column q of
Q is therefore found by sampling B - 1 rows I of L and taking the direction q with L_I q = 0:
when the B - 1 rows are zeros of one column g_b, L q is proportional to g_b and has zeros on
all of its inactive units, many more than the B - 1 forced ones, while any other q has only
those. The attack keeps the sparsest distinct directions, B of them, as the columns of Q (up
to their scales s). The bias fixes the scales: dL/db = sum_b g_b = L Q s, so s = Q^-1 L^+ dL/db,
and then X = (Q diag(s))^-1 R exactly.

A draw finds a given column with probability about p_b^(B-1), p_b the share of units example b
left inactive (about 0.4 for a random ReLU layer), so the draws needed grow exponentially in B:
`samples` (at most 400,000, drawn until B columns are found) covers batches up to about 8-10; `directions_found` reports how many of the B columns
were found (fewer than B: the reconstruction is not exact). Several local steps, each on its
own examples, add their rank-B terms: the attack then recovers S B examples, as exactly; later
epochs over the same examples mix supports and are approximate. Labels come from label
inference, as for `analytic_fc`.

Example: `fedsim run scenarios/dlg_mlp_digits.yaml --set 'attacks=[spear]' --set training.batch_size=8`.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from fedsim.attacks.analytic_fc import exact_reconstruction, input_layer
from fedsim.core.attack import GradientAttack, GradientTarget, Reconstruction
from fedsim.core.errors import UserError
from fedsim.core.registry import ATTACKS
from fedsim.core.seeding import torch_generator

DRAW_CHUNK = 20_000
"""Draws of B - 1 rows per batched null-space computation."""

RELATIVE_SPARSITY = 0.6
"""A direction needs at least this share of the sparsest candidate's zeros."""

def sparse_directions(left: Tensor, samples: int, tolerance: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Up to B unit directions q (k, B) with L q sparse, sparsest first, and their zero counts.

    Each draw takes B - 1 random rows of L (m x B; units that no example activated, zero rows,
    left out) and the q spanning their null space (the last right singular vector); L q's
    entries below `tolerance` x its largest count as zeros. A draw is a candidate when it has
    more zeros than twice the B - 1 it was forced to have. Not every candidate is a column of
    Q: rows that are zeros of two examples b, c give q with L q = a g_b + c g_c, zero where
    both examples are inactive, a subset of g_b's zeros (plus the B - 1 forced ones). So
    candidates are taken sparsest first, and one whose zeros, but for at most B - 1, lie among
    the zeros of a direction already taken (a mixture, or the same direction again) is skipped; so is one with fewer than `RELATIVE_SPARSITY` x the sparsest candidate's zeros (a
    mixture's zeros are the units both examples left inactive, about p^2 m against p m). Draws
    come in chunks of `DRAW_CHUNK`
    until B directions are taken or `samples` draws are spent.
    """
    norms = left.norm(dim=1)
    left = left[norms > tolerance * norms.max()]  # units no example activated are zero for every q
    units, rank = left.shape
    if rank == 1:  # one example: L itself is its column
        return torch.ones(1, 1, dtype=left.dtype), torch.zeros(1, dtype=torch.long)
    directions, zeros = torch.empty(0, rank, dtype=left.dtype), torch.empty(0, units, dtype=torch.bool)
    taken: list[int] = []
    for start in range(0, samples, DRAW_CHUNK):
        draws = min(DRAW_CHUNK, samples - start)
        rows = torch.rand(draws, units, generator=generator, dtype=torch.float64).argsort(1)[:, : rank - 1]
        _, _, vh = torch.linalg.svd(left[rows])  # (draws, B - 1, B) -> right singular vectors
        q = vh[:, -1]
        g = q @ left.T
        zero = g.abs() <= tolerance * g.abs().amax(1, keepdim=True)
        sparse = zero.sum(1) > 2 * (rank - 1)
        directions, zeros = torch.cat([directions, q[sparse]]), torch.cat([zeros, zero[sparse]])
        counts = zeros.sum(1)
        taken = []
        for i in counts.argsort(descending=True).tolist():
            if counts[i] < RELATIVE_SPARSITY * counts.max():
                break
            if all((zeros[i] & ~zeros[j]).sum() >= rank for j in taken):  # beyond its B - 1 forced zeros
                taken.append(i)
                if len(taken) == rank:
                    return directions[taken], zeros[taken].sum(1)
    return directions[taken], zeros[taken].sum(1)


def recover_batch(weight_grad: Tensor, bias_grad: Tensor, count: int, samples: int, tolerance: float,
                  generator: torch.Generator) -> tuple[Tensor, int]:  # fmt: skip
    """X (count, n) from dL/dW (m x n) and dL/db (m,) of a linear layer followed by ReLU, and
    how many of the `count` columns of Q were found."""
    u, singular, vh = torch.linalg.svd(weight_grad, full_matrices=False)
    left, right = u[:, :count] * singular[:count], vh[:count]  # dL/dW ~ L R at rank `count`
    directions, _ = sparse_directions(left, samples, tolerance, generator)
    found = len(directions)
    if found < count:  # complete Q with the sparsest leftovers so the solve still runs
        extra = torch.linalg.qr(torch.cat([directions, torch.eye(count, dtype=left.dtype)]).T).Q.T
        directions = torch.cat([directions, extra[found:count]])
    q = directions.T  # (B, B), columns up to scale
    scales = torch.linalg.solve(q, torch.linalg.pinv(left) @ bias_grad)
    return torch.linalg.solve(q * scales, right), found


@ATTACKS.register("spear")
class Spear(GradientAttack):
    """Whole-batch exact recovery from a linear layer + ReLU by the low rank and sparsity of its gradient (SPEAR)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        images: int | None = Field(
            None, ge=1, description="examples to recover; default: min(num_examples, local_steps * batch_size)"
        )
        samples: int = Field(400_000, ge=1, description="at most this many random (B - 1)-row draws of the low-rank factor")
        zero_tolerance: float = Field(1e-4, gt=0, lt=1, description="entries below this share of the largest count as zeros")

    params: Params
    needs_classes = True
    threat_model = (
        "honest-but-curious server (one client's update, the weights sent); model starts with a "
        "linear layer with bias followed by ReLU"
    )

    def reconstruct(self, target: GradientTarget) -> Reconstruction:
        layer = input_layer(target.model, target.input_shape, self.name)
        weight_grad = -target.update[f"{layer}.weight"].double()
        bias_grad = -target.update[f"{layer}.bias"].double()
        if not bias_grad.abs().max() > 0:
            raise UserError(f"attack '{self.name}': the update of layer '{layer}' is zero; nothing to recover")
        count = self.params.images or max(1, min(target.num_examples, target.local_steps * target.batch_size))
        count = min(count, *weight_grad.shape)
        generator = torch_generator(self.seed, "spear", target.server_round, target.client)
        images, found = recover_batch(weight_grad, bias_grad, count, self.params.samples, self.params.zero_tolerance, generator)
        details = {"layer": layer, "directions_found": found, "batch": count}
        return exact_reconstruction(self, target, images, details)
