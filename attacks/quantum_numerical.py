"""Numerical gradient inversion of a `vqc` gradient (Papadopoulos et al. 2025, arXiv 2504.12806).

The attack loss D(x') (attacks/quantum_oracle.py) of an expressive encoding has exponentially
many local minima (Kumar et al.), so its exact gradient leads local search into the nearest
one. Papadopoulos et al. descend a low-pass filtered gradient instead, estimated from loss
values only. For feature j, window samples n = 1..N and step h:

    d_j = 1/N sum_{n=1..N} [D(x' + n h e_j) - D(x' - n h e_j)] / (2 n h)

averages central differences over the window N h, which damps oscillations of D faster than
about 1 / (N h) cycles per unit: the search first sees D's coarse shape, then, as the window
shrinks, the finer one. The window starts at `window` (a fraction of the unit input range) and
shrinks by `shrink` for a candidate whose loss has not improved for `patience` iterations, down
to `min_window`. A scalar Kalman filter per feature (the paper's convergence aid) smooths the
successive estimates: the N central differences give a measurement and its variance (their
spread / N), the filter's state carries over between iterations with process noise
`process_noise` x the measurement's size. The step is x' <- x' - lr d (plain gradient descent), wrapped
into the input domain.

A fixed step cannot settle in the basin it finds: D's curvature there grows like f_max^2, so
lr d overshoots. fedsim therefore ends with `polish` monotone iterations from each candidate's
best point (its addition, not the paper's): a step is kept only if it lowers D, and the step
size grows by 1.5 after a kept step and halves after a refused one.

Every restart's 2 N F perturbed points and its current point are one batch of candidates, one
broadcast circuit call per iteration. The reconstruction is the restart with the lowest D.

Example: `fedsim attack runs/quantum_privacy/latest --attack quantum_numerical --set labels=known`.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from fedsim.attacks.quantum_matching import QuantumAttack, QuantumAttackParams, into_domain
from fedsim.attacks.quantum_oracle import QuantumGradientOracle
from fedsim.core.attack import GradientTarget, Reconstruction
from fedsim.core.registry import ATTACKS

IMPROVEMENT = 1e-3
"""A loss below (1 - IMPROVEMENT) x a candidate's best so far counts as progress."""


def window_offsets(features: int, samples: int) -> tuple[Tensor, Tensor]:
    """The perturbation pattern: signs x multiples n of h along each axis.

    Returns `steps` (2 N F, F), whose row for (sign s, sample n, feature j) is s n e_j, and
    `divisors` (N,) = 2 n, so that difference / (divisor h) is a central difference.
    """
    n = torch.arange(1, samples + 1, dtype=torch.float64)
    axes = torch.eye(features, dtype=torch.float64)
    plus = (n[:, None, None] * axes[None]).reshape(-1, features)  # (N F, F), sample-major
    return torch.cat([plus, -plus]), 2 * n


def filtered_gradient(
    oracle: QuantumGradientOracle, x: Tensor, h: Tensor, samples: int
) -> tuple[Tensor, Tensor, Tensor]:
    """D at x (R,), the window-averaged central differences d (R, F) and their variance (R, F).

    x: (R, F) candidates, h: (R,) step per candidate. One oracle call evaluates all
    R (2 N F + 1) points.
    """
    restarts, features = x.shape
    steps, divisors = window_offsets(features, samples)
    points = x[:, None, :] + h[:, None, None] * steps[None]  # (R, 2NF, F)
    batch = torch.cat([x[:, None, :], points], dim=1).reshape(-1, features)
    values = oracle(into_domain(batch, oracle.period), create_graph=False).loss.detach()
    values = values.reshape(restarts, 1 + 2 * samples * features)
    plus, minus = values[:, 1:].reshape(restarts, 2, samples, features).unbind(1)
    differences = (plus - minus) / (divisors[None, :, None] * h[:, None, None])  # (R, N, F)
    spread = differences.var(dim=1, unbiased=True) if samples > 1 else torch.zeros_like(differences[:, 0])
    return values[:, 0], differences.mean(dim=1), spread / samples


@ATTACKS.register("quantum_numerical")
class QuantumNumericalInversion(QuantumAttack):
    """Finite-difference descent with an adaptive low-pass window and Kalman smoothing (Papadopoulos et al.)."""

    class Params(QuantumAttackParams):
        restarts: int = Field(8, ge=1, description="random starts, all optimised together")
        iterations: int = Field(400, ge=1, description="descent iterations")
        lr: float = Field(0.02, gt=0, description="gradient-descent step size")
        samples: int = Field(8, ge=1, description="window samples N of the low-pass filter")
        window: float = Field(0.1, gt=0, description="initial window N h, as a fraction of the unit input range")
        min_window: float = Field(1e-7, gt=0, description="the window stops shrinking here")
        shrink: float = Field(0.5, gt=0, lt=1, description="window factor when a candidate stalls")
        patience: int = Field(10, ge=1, description="iterations without progress before the window shrinks")
        polish: int = Field(100, ge=0, description="monotone iterations at the end (fedsim's addition)")
        kalman: bool = Field(True, description="smooth successive gradient estimates with a Kalman filter")
        process_noise: float = Field(
            0.1, gt=0, description="Kalman process-noise variance, relative to the squared estimate"
        )

    params: Params

    def reconstruct(self, target: GradientTarget) -> Reconstruction:
        p = self.params
        oracle = self.oracle(target)
        x = torch.rand(p.restarts, oracle.dimension, generator=self.generator(target), dtype=torch.float64)
        window = torch.full((p.restarts,), p.window, dtype=torch.float64)
        best = torch.full((p.restarts,), torch.inf, dtype=torch.float64)
        best_x, stalled = x.clone(), torch.zeros(p.restarts, dtype=torch.long)
        estimate, variance = torch.zeros_like(x), torch.full_like(x, torch.inf)
        for _ in range(p.iterations):  # the paper's filtered descent
            loss, measured, noise = filtered_gradient(oracle, x, window / p.samples, p.samples)
            improved = loss < best * (1 - IMPROVEMENT)
            best_x[improved], best[improved] = x[improved], loss[improved]
            stalled = torch.where(improved, 0, stalled + 1)
            shrinking = stalled >= p.patience
            window = torch.where(shrinking, (window * p.shrink).clamp_min(p.min_window), window)
            stalled[shrinking] = 0
            if p.kalman:
                estimate, variance = kalman_update(estimate, variance, measured, noise, p.process_noise)
            else:
                estimate = measured
            x = into_domain(x - p.lr * estimate, oracle.period)
        best_x = polish(oracle, best_x, window / p.samples, p)
        final = oracle(best_x, create_graph=False)
        winner = int(final.loss.argmin())
        return self.reconstruction(
            target,
            oracle,
            best_x[winner],
            final.labels[winner],
            float(final.loss[winner]),
            restarts=p.restarts,
            objective_evaluations=(p.iterations + p.polish + 1) * p.restarts * (1 + 2 * p.samples * oracle.dimension),
            final_window=float(window[winner]),
            restart_losses=final.loss.tolist(),
        )


def polish(oracle: QuantumGradientOracle, x: Tensor, h: Tensor, p: QuantumNumericalInversion.Params) -> Tensor:
    """`p.polish` monotone steps from x (R, F) on the filtered gradient at step h (R,): a step
    is kept only if it lowers D; the step size grows by 1.5 after a kept step, halves otherwise."""
    loss, gradient, _ = filtered_gradient(oracle, x, h, p.samples)
    lr = torch.full_like(loss, p.lr)
    for _ in range(p.polish):
        proposal = into_domain(x - lr[:, None] * gradient, oracle.period)
        proposed_loss, proposed_gradient, _ = filtered_gradient(oracle, proposal, h, p.samples)
        kept = proposed_loss < loss
        x, loss = torch.where(kept[:, None], proposal, x), torch.where(kept, proposed_loss, loss)
        gradient = torch.where(kept[:, None], proposed_gradient, gradient)
        lr = torch.where(kept, lr * 1.5, lr * 0.5)
    return x


def kalman_update(
    estimate: Tensor, variance: Tensor, measured: Tensor, noise: Tensor, process_noise: float
) -> tuple[Tensor, Tensor]:
    """One step of a scalar Kalman filter per entry (random-walk state model).

    Predict: P <- P + q with q = process_noise x measured^2 (the gradient may move by about
    that much between iterations); update: K = P / (P + r), estimate <- estimate + K
    (measured - estimate), P <- (1 - K) P, with r the measurement's variance. A first
    measurement (P infinite) is taken as it is.
    """
    predicted = variance + process_noise * measured.square()
    gain = torch.where(torch.isinf(predicted), 1.0, predicted / (predicted + noise).clamp_min(1e-300))
    return estimate + gain * (measured - estimate), torch.where(torch.isinf(predicted), noise, (1 - gain) * predicted)
