"""The attack loss seen globally: a grid scan (the strongest attacker for few features) and
its local minima (the landscape argument of Kumar et al. 2023).

The vqc output is a trigonometric polynomial in each feature with frequencies up to
f_max = `Circuit.max_frequency` cycles per unit. The loss gradient multiplies two such
polynomials (2 f_max) and D squares the difference to the observed gradient, so D varies no
faster than 4 f_max cycles per unit. A grid of `points_per_cycle` points per such cycle
therefore sees every basin of D: the global scan evaluates D on it (in chunks, one broadcast
circuit call each), keeps the best few grid points and polishes them with local search. Its
cost grows like (4 f_max)^F, cheap for one or two features whatever the landscape looks like.

`local_minima` counts the strict local minima of D on such a grid, for the study of how
their number grows with the qubits per feature m.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor

from fedsim.attacks.quantum_matching import QuantumAttack, QuantumAttackParams, local_search
from fedsim.attacks.quantum_oracle import QuantumGradientOracle
from fedsim.core.attack import GradientTarget, Reconstruction
from fedsim.core.errors import UserError
from fedsim.core.registry import ATTACKS

LOSS_BANDWIDTH = 4
"""D's highest frequency in units of the model's f_max (see the module docstring)."""


def grid_size(oracle: QuantumGradientOracle, points_per_cycle: int) -> int:
    """Grid points per feature that resolve D's fastest oscillation."""
    return max(2, math.ceil(points_per_cycle * LOSS_BANDWIDTH * oracle.max_frequency))


def feature_grid(points: int, features: int, periodic: bool) -> Tensor:
    """Every point of the regular grid on [0, 1)^F (periodic) or [0, 1]^F, (points^F, F)."""
    axis = torch.arange(points, dtype=torch.float64) / (points if periodic else points - 1)
    return torch.cartesian_prod(*[axis] * features).reshape(-1, features)


def loss_on_grid(oracle: QuantumGradientOracle, grid: Tensor, chunk: int) -> Tensor:
    """D at every grid point (one target: K = 1), evaluated `chunk` points per circuit call."""
    return torch.cat([oracle(part, create_graph=False).loss.detach() for part in grid.split(chunk)])


def local_minima(values: Tensor, periodic: bool) -> Tensor:
    """Indices of the strict local minima of a 1-D profile (lower than the left neighbour,
    not higher than the right one), wrapping around when `periodic`."""
    left, right = torch.roll(values, 1), torch.roll(values, -1)
    is_min = (values < left) & (values <= right)
    if not periodic:
        is_min[0] = values[0] <= values[1]
        is_min[-1] = values[-1] < values[-2]
    return torch.nonzero(is_min).flatten()


@ATTACKS.register("quantum_grid_scan")
class QuantumGridScan(QuantumAttack):
    """The global attacker: D on a grid fine enough for every minimum, best points polished."""

    class Params(QuantumAttackParams):
        points_per_cycle: int = Field(
            8, ge=2, description="grid points per cycle of D's fastest frequency (4 f_max)"
        )
        max_points: int = Field(
            2_000_000,
            ge=1,
            description="refuse grids larger than this (the cost is points^features)",
        )
        chunk: int = Field(8192, ge=1, description="grid points per circuit call")
        refine: int = Field(8, ge=1, description="best grid points polished by local search")
        iterations: int = Field(100, ge=0, description="Adam iterations of the polish")

    params: Params

    def reconstruct(self, target: GradientTarget) -> Reconstruction:
        oracle = self.oracle(target)
        x, loss, labels, points = grid_scan(oracle, self.params)
        return self.reconstruction(
            target, oracle, x[0], labels[0], float(loss[0]), grid_points=points
        )


def grid_scan(
    oracle: QuantumGradientOracle, p: QuantumGridScan.Params
) -> tuple[Tensor, Tensor, Tensor, int]:
    """The scan on each of the oracle's K targets: best inputs (K, F), their losses and labels
    (K,), and the grid points per target. The polish of all K targets is one batch."""
    points = grid_size(oracle, p.points_per_cycle)
    total = points**oracle.num_features
    if total > p.max_points:
        raise UserError(
            f"quantum_grid_scan: {oracle.num_features} features need {points}^{oracle.num_features} = "
            f"{total} grid points, above max_points {p.max_points}; lower points_per_cycle or use quantum_gradient_matching"
        )
    grid = feature_grid(points, oracle.num_features, oracle.period is not None)
    targets, refine = len(oracle.observed), min(p.refine, len(grid))
    values = torch.stack(
        [loss_on_grid(oracle.targets(k, k + 1), grid, p.chunk) for k in range(targets)]
    )
    starts = grid[values.topk(refine, dim=1, largest=False).indices].reshape(targets * refine, -1)
    x, loss, labels = local_search(oracle, starts, p.iterations, lr=0.5 / points)
    keep = loss.reshape(targets, refine).argmin(dim=1) + refine * torch.arange(targets)
    return x[keep], loss[keep], labels[keep], total
