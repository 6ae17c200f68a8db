"""L-BFGS on many independent problems at once: one row of a (rows, D) tensor each.

torch.optim.LBFGS treats all its parameters as one vector, so R stacked restarts would share
one curvature history and one step: their dot products would mix. `BatchedLBFGS` keeps
every quantity per row. For each row it follows torch's L-BFGS with a fixed step
(`line_search_fn=None`, as DLG uses it), one iteration per call:

    first call:   d = -g,                 t = lr * min(1, 1 / ||g||_1)
    later calls:  y = g - g_prev, s = t_prev d_prev; keep (y, s, rho = 1 / y.s) when
                  y.s > 1e-10; H0 = y.s / y.y; d = -H g by the two-loop recursion; t = lr
    step:         x <- x + t d, unless d is not a descent direction (g.d > -1e-9), the
                  gradient vanished (max|g| <= 1e-7) or the row is frozen (t = 0 then).

A history slot is spent every call: a row whose pair fails the curvature test stores a null
pair (rho = 0, no effect) where torch would store nothing, so its memory is one pair shorter
until that pair ages out. Otherwise a single row reproduces torch.optim.LBFGS.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor

CURVATURE_EPS = 1e-10
TOLERANCE_GRAD = 1e-7
TOLERANCE_CHANGE = 1e-9


def row_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-row dot products of two (rows, D) tensors (one fused call: the two-loop recursion
    makes hundreds of them per step, so Python-level overhead counts)."""
    return torch.linalg.vecdot(a, b, dim=1)


class BatchedLBFGS:
    """Per-row L-BFGS directions and steps for a stack of independent problems."""

    def __init__(self, lr: float, history_size: int) -> None:
        self.lr = lr
        self.history: deque[tuple[Tensor, Tensor, Tensor]] = deque(maxlen=history_size)
        self.previous: tuple[Tensor, Tensor, Tensor] | None = None  # g, d, t of the last call
        self.h_diag: Tensor | None = None

    def step(self, grad: Tensor, active: Tensor) -> Tensor:
        """The displacement (rows, D) for gradients `grad` (rows, D); rows where `active` is
        False do not move (and their gradient, possibly non-finite, is ignored)."""
        grad = torch.where(active[:, None], grad, 0.0)
        if self.previous is None:
            direction = -grad
            step = self.lr * grad.abs().sum(dim=1).reciprocal().clamp(max=1.0)
            self.h_diag = torch.ones_like(step)
        else:
            direction = self._direction(grad)
            step = torch.full_like(direction[:, 0], self.lr)
        descent = row_dot(grad, direction) < -TOLERANCE_CHANGE
        moving = active & descent & (grad.abs().amax(dim=1) > TOLERANCE_GRAD)
        step = torch.where(moving, step, 0.0)
        self.previous = (grad, direction, step)
        return torch.where(moving[:, None], direction * step[:, None], 0.0)

    def _direction(self, grad: Tensor) -> Tensor:
        """-H g by the two-loop recursion, after storing the newest curvature pair."""
        assert self.previous is not None and self.h_diag is not None
        last_grad, last_direction, last_step = self.previous
        y = grad - last_grad
        s = last_direction * last_step[:, None]
        ys = row_dot(y, s)
        curved = ys > CURVATURE_EPS
        self.history.append((y, s, torch.where(curved, ys.reciprocal(), 0.0)))
        self.h_diag = torch.where(curved, ys / row_dot(y, y).clamp_min(1e-30), self.h_diag)

        q = -grad
        alphas = []
        for y_i, s_i, rho_i in reversed(self.history):
            alpha = (rho_i * row_dot(s_i, q)).unsqueeze(1)
            q.addcmul_(alpha, y_i, value=-1.0)
            alphas.append(alpha)
        r = q.mul_(self.h_diag[:, None])
        for (y_i, s_i, rho_i), alpha in zip(self.history, reversed(alphas), strict=True):
            beta = (rho_i * row_dot(y_i, r)).unsqueeze(1)
            r.addcmul_(alpha - beta, s_i)
        return r
