"""The attack loss seen globally: a grid scan (the strongest attacker for few features) and
its local minima (the landscape argument of Kumar et al. 2023).

The vqc output is a trigonometric polynomial in each feature with frequencies up to
f_max = `Circuit.max_frequency` cycles per unit. The loss gradient multiplies two such
polynomials (2 f_max) and D squares the difference to the observed gradient, so D varies no
faster than 4 f_max cycles per unit. The global scan evaluates D on a grid of
`points_per_cycle` points per such cycle (in chunks, one broadcast circuit call each), keeps
the best `refine` grid points and polishes them with local search. A coarse grid can still
rank the true basin's nearest point below `refine` others (8 points per cycle missed 4 of 646
independent experiments in an external re-check), so the scan refines adaptively: while the
polished loss of a target is above `tolerance` it doubles the points per cycle, up to
`max_points_per_cycle`, and keeps each target's best answer. D is relative to ||g||^2, so the
tolerance bounds the residual at ||G(x') - g|| <= sqrt(tolerance) ||g||. A target still above
it is reported (`basin_found` false, the loss in the result): with exact gradients the
true input has D = 0, so a high final loss means the scan missed or the gradient is noisy.
Its cost grows like (4 f_max)^F per cycle, cheap for one or two features.

`local_minima` counts the strict local minima of D on such a grid, for the study of how
their number grows with the qubits per feature m.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    """The global attacker: D on a grid fine enough for every minimum, best points polished,
    the grid refined while the loss says the basin was missed."""

    class Params(QuantumAttackParams):
        points_per_cycle: int = Field(
            8, ge=2, description="grid points per cycle of D's fastest frequency (4 f_max), first pass"
        )
        max_points_per_cycle: int = Field(
            64, ge=2, description="refine (doubling the points per cycle) up to this resolution"
        )
        tolerance: float = Field(
            1e-3,
            gt=0,
            description="polished D = ||G - g||^2 / ||g||^2 below this: basin found, stop refining",
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
        scan = grid_scan(oracle, self.params)
        return self.reconstruction(
            target,
            oracle,
            scan.x[0],
            scan.labels[0],
            float(scan.loss[0]),
            grid_points=int(scan.grid_points[0]),
            points_per_cycle=int(scan.points_per_cycle[0]),
            basin_found=bool(scan.found[0]),
        )


@dataclass
class ScanResult:
    """Per target (K of them): best input (K, n F), its loss D (K,) and implied labels (K, n), the
    resolution of the last pass, the grid points evaluated over all passes, and whether D
    fell below the tolerance."""

    x: Tensor
    loss: Tensor
    labels: Tensor
    points_per_cycle: Tensor
    grid_points: Tensor
    found: Tensor


def grid_scan(oracle: QuantumGradientOracle, p: QuantumGridScan.Params) -> ScanResult:
    """The adaptive scan on each of the oracle's K targets (module docstring). Each pass polishes
    all targets still above the tolerance as one batch; a pass whose grid would exceed
    `max_points` ends the refinement (the first one is refused)."""
    features, periodic = oracle.dimension, oracle.period is not None
    targets = len(oracle.observed)
    result = ScanResult(
        x=torch.zeros(targets, features, dtype=torch.float64),
        loss=torch.full((targets,), math.inf, dtype=torch.float64),
        labels=torch.zeros(targets, oracle.examples, dtype=torch.float64 if oracle.regression else torch.int64),
        points_per_cycle=torch.zeros(targets, dtype=torch.int64),
        grid_points=torch.zeros(targets, dtype=torch.int64),
        found=torch.zeros(targets, dtype=torch.bool),
    )
    pending, resolution = torch.arange(targets), p.points_per_cycle
    while len(pending):
        points = grid_size(oracle, resolution)
        total = points**features
        if total > p.max_points:
            if resolution == p.points_per_cycle:
                raise UserError(
                    f"quantum_grid_scan: {features} unknowns (features x examples) need {points}^{features} = {total} grid "
                    f"points, above max_points {p.max_points}; lower points_per_cycle or use quantum_gradient_matching"
                )
            break
        grid = feature_grid(points, features, periodic)
        refine = min(p.refine, len(grid))
        best_points = [
            loss_on_grid(oracle.subset(k.reshape(1)), grid, p.chunk)
            .topk(refine, largest=False)
            .indices
            for k in pending
        ]
        starts = grid[torch.cat(best_points)]
        x, loss, labels = local_search(oracle.subset(pending), starts, p.iterations, lr=0.5 / points)
        keep = loss.reshape(-1, refine).argmin(dim=1) + refine * torch.arange(len(pending))
        better = loss[keep] < result.loss[pending]
        for field, value in (("x", x), ("loss", loss), ("labels", labels)):
            stored = getattr(result, field)
            stored[pending[better]] = value[keep][better]
        result.points_per_cycle[pending] = resolution
        result.grid_points[pending] += total
        result.found = result.loss <= p.tolerance
        pending = pending[~result.found[pending]]
        resolution *= 2
        if resolution > p.max_points_per_cycle:
            break
    return result
