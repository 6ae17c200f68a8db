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
those. Not every sparse draw is a column: rows that are zeros of two examples give a mixture
of their columns, zero where both are inactive, a subset of one column's zeros; those are
skipped (`distinct_directions`). The bias fixes the columns' scales s: dL/db = sum_b g_b =
L Q s, so s = Q^-1 L^+ dL/db, and then X = (Q diag(s))^-1 R exactly. A chosen Q is accepted
when its reconstruction agrees with the ReLU (the units each recovered x_b activates, W x_b +
b > 0 at the sent weights, are those where its g_b is nonzero); otherwise the next choices
swap in other candidates and the sampling goes on.

A draw finds a given column with probability about p_b^(B-1), p_b the share of units example b
left inactive (about 0.4 for a random ReLU layer), so the draws needed grow exponentially in B:
`samples` (at most 400,000, drawn until a consistent batch is found) covers batches up to
about 8-10; the result reports `directions_found` (fewer than B: not exact) and
`relu_consistency`. Several local steps, each on its own examples, add their rank-B terms:
the attack then recovers S B examples, as exactly (the consistency check then uses the sent
weights for every step, so it only approximates); later epochs over the same examples mix
supports and are approximate. Labels come from label inference, as for `analytic_fc`.

Example: `fedsim run scenarios/imprint_secagg.yaml --set 'defenses=[]' --set 'attacks=[spear]'` (4 clients, batch 8).
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

SPARES = 8
"""Candidates beyond the B sparsest that a selection may swap in."""

CONSISTENT = 0.995
"""ReLU consistency at which a reconstruction is accepted (see BatchSolver)."""

def distinct_directions(zeros: Tensor, rank: int) -> list[int]:
    """Indices of the candidates (rows of the zero masks `zeros`) that may be columns of Q,
    sparsest first: one whose zeros, but for at most B - 1, lie among the zeros of a
    candidate already kept (a mixture of two columns, or the same column again) is skipped,
    and so is one with fewer than `RELATIVE_SPARSITY` x the sparsest's zeros (a mixture's
    zeros are the units both examples left inactive, about p^2 m against p m)."""
    counts = zeros.sum(1)
    kept: list[int] = []
    for i in counts.argsort(descending=True).tolist():
        if counts[i] < RELATIVE_SPARSITY * counts.max():
            break
        if all((zeros[i] & ~zeros[j]).sum() >= rank for j in kept):  # beyond its B - 1 forced zeros
            kept.append(i)
    return kept


def choices(kept: list[int], rank: int) -> list[list[int]]:
    """The selections of B kept candidates to try, most likely first: the B sparsest, then
    each of them swapped for one of the next `SPARES` candidates (least sparse swapped first)."""
    first, spares = kept[:rank], kept[rank : rank + SPARES]
    return [first] + [first[:j] + [e] + first[j + 1 :] for j in reversed(range(rank)) for e in spares]


class BatchSolver:
    """X from the gradient of z = W x + b (followed by ReLU) at rank B, for a choice of Q.

    `left`, `right`: the rank-B factors of dL/dW restricted to the units some example
    activated; the reconstruction of a choice is checked against the ReLU: example b's
    units with z_bi > 0 must be those where its column g_b is nonzero (`consistency`, the
    share of (b, i) where they agree; 1 for the true batch up to ties at z = 0).
    """

    def __init__(self, left: Tensor, right: Tensor, bias_grad: Tensor, weight: Tensor, bias: Tensor, tolerance: float) -> None:
        self.left, self.right, self.bias_grad = left, right, bias_grad
        self.weight, self.bias, self.tolerance = weight, bias, tolerance

    def __call__(self, directions: Tensor) -> tuple[Tensor, float]:
        """(X (B, n), consistency) for the columns `directions` (B, B) of Q, up to scale."""
        q = directions.T
        scales = torch.linalg.solve(q, torch.linalg.pinv(self.left) @ self.bias_grad)
        x = torch.linalg.solve(q * scales, self.right)
        g = self.left @ (q * scales)  # (m, B): each example's dL/dz
        nonzero = g.abs() > self.tolerance * g.abs().amax(0, keepdim=True)
        active = (x @ self.weight.T + self.bias).T > 0
        return x, float((nonzero == active).double().mean())


def recover_batch(
    weight_grad: Tensor, bias_grad: Tensor, weight: Tensor, bias: Tensor, count: int,
    samples: int, tolerance: float, generator: torch.Generator,
) -> tuple[Tensor, int, float]:  # fmt: skip
    """X (count, n) from dL/dW (m x n) and dL/db (m,) of z = W x + b followed by ReLU, how many
    of the `count` columns of Q the chosen solution has (fewer: completed arbitrarily), and
    its ReLU consistency.

    Draws of B - 1 random rows of L (units no example activated, zero rows, left out) give the
    q spanning their null space (the last right singular vector); L q's entries below
    `tolerance` x its largest count as zeros, and a draw is a candidate when it has more than
    twice the B - 1 zeros it was forced to have. Draws come in chunks of `DRAW_CHUNK`; after
    each, the distinct candidates' selections (`choices`) are solved until one is consistent
    with the ReLU (`CONSISTENT`), or `samples` draws are spent (then the most consistent).
    """
    u, singular, vh = torch.linalg.svd(weight_grad, full_matrices=False)
    left, right = u[:, :count] * singular[:count], vh[:count]  # dL/dW ~ L R at rank `count`
    norms = left.norm(dim=1)
    units = norms > tolerance * norms.max()  # units no example activated are zero for every q
    solve = BatchSolver(left[units], right, bias_grad[units], weight[units], bias[units], tolerance)
    if count == 1:  # one example: L itself is its column
        x, consistency = solve(torch.ones(1, 1, dtype=left.dtype))
        return x, 1, consistency
    left = left[units]
    directions, zeros = torch.empty(0, count, dtype=left.dtype), torch.empty(0, len(left), dtype=torch.bool)
    best: tuple[Tensor, int, float] | None = None
    for start in range(0, samples, DRAW_CHUNK):
        draws = min(DRAW_CHUNK, samples - start)
        rows = torch.rand(draws, len(left), generator=generator, dtype=torch.float64).argsort(1)[:, : count - 1]
        _, _, vh_rows = torch.linalg.svd(left[rows])  # (draws, B - 1, B) -> right singular vectors
        q = vh_rows[:, -1]
        g = q @ left.T
        zero = g.abs() <= tolerance * g.abs().amax(1, keepdim=True)
        sparse = zero.sum(1) > 2 * (count - 1)
        directions, zeros = torch.cat([directions, q[sparse]]), torch.cat([zeros, zero[sparse]])
        kept = distinct_directions(zeros, count)
        for choice in choices(kept, count) if len(kept) >= count else []:
            x, consistency = solve(directions[choice])
            if best is None or consistency > best[2]:
                best = (x, count, consistency)
            if consistency >= CONSISTENT:
                return best
    if best is None:  # fewer than B columns: complete Q arbitrarily so the solve still runs
        found = directions[distinct_directions(zeros, count)] if len(directions) else directions
        extra = torch.linalg.qr(torch.cat([found, torch.eye(count, dtype=left.dtype)]).T).Q.T
        x, consistency = solve(torch.cat([found, extra[len(found) : count]]))
        best = (x, len(found), consistency)
    return best


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
        sent = target.model.state_dict()
        weight, bias = sent[f"{layer}.weight"].double(), sent[f"{layer}.bias"].double()
        images, found, consistency = recover_batch(
            weight_grad, bias_grad, weight, bias, count, self.params.samples, self.params.zero_tolerance, generator
        )
        details = {"layer": layer, "directions_found": found, "batch": count, "relu_consistency": consistency}
        return exact_reconstruction(self, target, images, details)
