"""Sparse linear regression under non-interactive local DP (Zhu, Ding, Aggarwal, Xu, Wang, ICLR 2024).

Every client i holds (x_i, y_i) (the paper's user holds one pair; a client with m pairs
releases their sums) and sends the server one randomised message, once, before any model
exists (non-interactive). It first truncates each coordinate, x~ = clip(x, -tau_x, tau_x),
y~ = clip(y, -tau_y, tau_y), then releases two Gaussian mechanisms, each at (eps/2, delta/2):

    A_i = sum_{j <= m} x~_j x~_j^T + Z_i,   Z_i symmetric, upper triangle iid N(0, s_A^2)
    c_i = sum_{j <= m} x~_j y~_j   + z_i,   z_i ~ N(0, s_c^2 I_d)

Replacing the client's whole data moves the first sum by at most 2 m ||x~||^2 <= 2 m d tau_x^2
in Frobenius norm (the released upper triangle moves by no more) and the second by at most
2 m sqrt(d) tau_x tau_y in L2, so s_A and s_c are Gaussian-mechanism noise for those
sensitivities. The paper calibrates classically, s = Delta sqrt(2 ln(1.25 / (delta/2))) / (eps/2),
which is proved only for eps/2 < 1; here s is the analytic Gaussian calibration (Balle & Wang
2018, Thm 8), the smallest s that is (eps/2, delta/2)-DP at every eps. Basic composition
makes each client's message (eps, delta)-LDP: client-level, replace-one, against the server.

The server averages the N examples' messages, Sigma = sum_i A_i / N and b = sum_i c_i / N,
and returns the closed-form estimator

    theta^ = H_k( Sigma+^{-1} b ),   Sigma+ = V max(Lambda, floor) V^T   (Sigma = V Lambda V^T)

where Sigma+ is Sigma with its eigenvalues floored (the noised matrix need not be positive
definite) and H_k keeps the k entries of largest magnitude. Its l2 error is
O~(d sqrt(k) / (sqrt(N) eps)) (the paper's non-interactive upper bound): the noise of Sigma
moves each entry of Sigma theta* by ~ d tau^2 / (sqrt(N) eps), and H_k keeps k of them. The
lower bound for any non-interactive LDP algorithm is Omega(sqrt(d k log d) / (sqrt(N) eps)).
Where the paper's estimator differs in detail (its thresholding and its conditioning of
Sigma), this file follows the structure above; docs/baselines.md says so.

The global model is a linear one (`model: {name: mlp, hidden: []}`): theta^ becomes its weight
row; with `intercept` a constant public feature 1 is appended to x before truncation and its
coefficient becomes the bias. Clients that released once are never asked again; a client asked
twice refuses (`AlreadyReleased`; both halves live in `one_release`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from pydantic import BaseModel, ConfigDict, Field
from scipy.special import log_ndtr, ndtr
from torch import Tensor

from fedsim.core.defense import PrivacyUnit
from fedsim.core.registry import CLIENT_ACTIONS, STRATEGIES
from fedsim.defenses.one_release import OneReleaseServer, claim_release
from fedsim.federation.client_call import ClientCall

ACTION = "ldp_sparse_regression"
MESSAGE_TYPE = f"train.{ACTION}"
RELEASED_STATE = "fedsim.ldp_sparse_regression"
EPSILON_METRIC = "ldp_epsilon"


def analytic_gaussian_sigma(sensitivity: float, epsilon: float, delta: float) -> float:
    """Smallest std s at which x + N(0, s^2 I) is (epsilon, delta)-DP for L2 sensitivity Delta.

    Balle & Wang (2018), Thm 8: the mechanism is (epsilon, delta)-DP iff

        Phi(Delta / (2 s) - epsilon s / Delta) - e^epsilon Phi(-Delta / (2 s) - epsilon s / Delta) <= delta,

    whose left side decreases in s; found by bisection on log s (relative precision 1e-10).
    """

    def delta_at(s: float) -> float:
        a, b = sensitivity / (2 * s), epsilon * s / sensitivity
        return float(ndtr(a - b) - math.exp(epsilon + float(log_ndtr(-a - b))))

    low, high = math.log(sensitivity) - 30.0, math.log(sensitivity) + 30.0
    while high - low > 1e-10:
        mid = (low + high) / 2
        low, high = (mid, high) if delta_at(math.exp(mid)) > delta else (low, mid)
    return math.exp(high)


class LdpSparseRegressionParams(BaseModel):
    """The mechanism and the server's estimator."""

    model_config = ConfigDict(extra="forbid")

    epsilon: float = Field(1.0, gt=0, description="local epsilon of a client's one message")
    delta: float = Field(1e-5, gt=0, lt=1, description="local delta of a client's one message")
    sparsity: int | None = Field(
        None, ge=1, description="k: coordinates the estimate keeps (null: all, no thresholding)"
    )
    clip_x: float = Field(1.0, gt=0, description="tau_x: every coordinate of x truncated to [-tau_x, tau_x]")
    clip_y: float = Field(1.0, gt=0, description="tau_y: y truncated to [-tau_y, tau_y]")
    eigen_floor: float = Field(
        0.05, gt=0, description="lower bound on the eigenvalues of the server's covariance estimate"
    )
    intercept: bool = Field(False, description="append a constant feature 1 (its coefficient is the model's bias)")


def features(x: Tensor, intercept: bool) -> Tensor:
    """x flattened to (m, d), with a constant column 1 appended when `intercept`."""
    flat = x.flatten(1).double()
    return torch.cat([flat, torch.ones(len(x), 1, dtype=flat.dtype)], 1) if intercept else flat


def noise_scales(params: LdpSparseRegressionParams, dim: int, examples: int) -> tuple[float, float]:
    """(s_A, s_c): noise stds of the two releases of a client holding `examples` pairs in R^dim.

    Sensitivities (replace the client's data): 2 m max ||x~||^2 and 2 m max ||x~|| tau_y,
    with max ||x~||^2 = dim tau_x^2 (minus tau_x^2 - 1 for the constant intercept feature);
    each release at (epsilon / 2, delta / 2).
    """
    squared_norm = dim * params.clip_x**2
    if params.intercept:
        squared_norm += 1.0 - params.clip_x**2
    half_eps, half_delta = params.epsilon / 2, params.delta / 2
    s_a = analytic_gaussian_sigma(2 * examples * squared_norm, half_eps, half_delta)
    s_c = analytic_gaussian_sigma(2 * examples * math.sqrt(squared_norm) * params.clip_y, half_eps, half_delta)
    return s_a, s_c


def truncated_sums(x: Tensor, y: Tensor, params: LdpSparseRegressionParams) -> tuple[Tensor, Tensor]:
    """(sum x~ x~^T, sum x~ y~) over the rows of x (m, d) and y (m,), in float64."""
    xt = features(x, params.intercept).clamp(-params.clip_x, params.clip_x)
    if params.intercept:
        xt[:, -1] = 1.0
    yt = y.double().clamp(-params.clip_y, params.clip_y)
    return xt.T @ xt, xt.T @ yt


def symmetric_noise(dim: int, std: float, generator: torch.Generator) -> Tensor:
    """A symmetric (dim, dim) matrix whose upper triangle (diagonal included) is iid N(0, std^2)."""
    upper = torch.triu(torch.normal(0.0, std, size=(dim, dim), generator=generator, dtype=torch.float64))
    return upper + torch.triu(upper, 1).T


def private_message(
    x: Tensor, y: Tensor, params: LdpSparseRegressionParams, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """One client's message (A, c): its truncated sums plus the Gaussian noise of `noise_scales`."""
    xx, xy = truncated_sums(x, y, params)
    s_a, s_c = noise_scales(params, len(xy), len(x))
    noise_c = torch.normal(0.0, s_c, size=xy.shape, generator=generator, dtype=torch.float64)
    return xx + symmetric_noise(len(xy), s_a, generator), xy + noise_c


def pooled_noise(
    dim: int, clients: int, params: LdpSparseRegressionParams, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """The summed noise of `clients` one-pair clients' messages in R^dim, drawn in one go.

    Equal in distribution to the sum of their `private_message` noises: `clients` independent
    N(0, s^2) entries sum to one N(0, clients s^2) (for benchmarks at large n).
    """
    s_a, s_c = noise_scales(params, dim, 1)
    root = math.sqrt(clients)
    noise_c = torch.normal(0.0, root * s_c, size=(dim,), generator=generator, dtype=torch.float64)
    return symmetric_noise(dim, root * s_a, generator), noise_c


def pooled_messages(
    x: Tensor, y: Tensor, params: LdpSparseRegressionParams, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """The sum of the messages of n one-pair clients (the rows of x, y), via `pooled_noise`."""
    xx, xy = truncated_sums(x, y, params)
    noise_xx, noise_xy = pooled_noise(len(xy), len(x), params, generator)
    return xx + noise_xx, xy + noise_xy


def hard_threshold(theta: Tensor, k: int | None) -> Tensor:
    """H_k: theta with all but its k largest-magnitude entries set to 0 (k None: theta)."""
    if k is None or k >= len(theta):
        return theta
    kept = torch.zeros_like(theta)
    top = theta.abs().topk(k).indices
    kept[top] = theta[top]
    return kept


def estimate(
    xx_sum: Tensor, xy_sum: Tensor, count: int, sparsity: int | None, eigen_floor: float
) -> Tensor:
    """theta^ = H_k(Sigma+^{-1} b) with Sigma = xx_sum / N, b = xy_sum / N (see the module doc)."""
    sigma = (xx_sum + xx_sum.T) / (2 * count)
    values, vectors = torch.linalg.eigh(sigma)
    inverse = vectors @ torch.diag(1.0 / values.clamp_min(eigen_floor)) @ vectors.T
    return hard_threshold(inverse @ (xy_sum / count), sparsity)


@CLIENT_ACTIONS.register(ACTION)
def release(content: RecordDict, call: ClientCall) -> RecordDict:
    """A client's one message (A, c), or `AlreadyReleased` if this node has released before.

    The release is marked in the node's persistent state before the message is returned, so no
    second message can leave this node. `num-examples` (m) is fixed by the public partitioning
    (replace-one neighbours keep it), so it is sent as is.
    """
    claim_release(call, RELEASED_STATE)
    params: LdpSparseRegressionParams = call.setup.scenario.federation.strategy.params
    data = call.train_data()
    xx, xy = private_message(data.x, data.y, params, call.generator("ldp-regression-noise"))
    arrays = ArrayRecord({"xx": Array(xx.numpy()), "xy": Array(xy.numpy())})
    metrics = {"num-examples": len(data), "partition-id": call.partition_id, EPSILON_METRIC: params.epsilon}
    return RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})


class LdpSparseRegressionServer(OneReleaseServer):
    """The server: asks each client once for its message and keeps the estimate of all so far.

    Each round it messages only the sampled clients that have not released yet (all of them
    in round 1 when every client is sampled; none later), adds their messages to running sums
    and writes theta^ into the linear global model, which the server's test evaluation scores.
    """

    message_type = MESSAGE_TYPE

    def __init__(self, params: LdpSparseRegressionParams) -> None:
        super().__init__()
        self.params = params
        self.xx: Tensor | None = None
        self.xy: Tensor | None = None
        self.count = 0

    def privacy_unit(self) -> PrivacyUnit:
        """Each client's whole data, replace-one, noised by the client: local DP, one release."""
        return PrivacyUnit(
            "client", "replace-one", self.params.delta, "analytic gaussian x2, basic composition", EPSILON_METRIC
        )

    def fold(self, replies: list[Message]) -> ArrayRecord:
        """Add this round's messages to the sums; theta^ into the linear model's weight (and bias)."""
        for reply in replies:
            xx = torch.from_numpy(reply.content["arrays"]["xx"].numpy())
            xy = torch.from_numpy(reply.content["arrays"]["xy"].numpy())
            self.xx = xx if self.xx is None else self.xx + xx
            self.xy = xy if self.xy is None else self.xy + xy
            self.count += int(reply.content["metrics"]["num-examples"])
        p = self.params
        theta = estimate(self.xx, self.xy, self.count, p.sparsity, p.eigen_floor)
        return linear_model_arrays(self.arrays, theta, p.intercept)


def linear_model_arrays(arrays: ArrayRecord, theta: Tensor, intercept: bool) -> ArrayRecord:
    """`arrays` of a one-layer linear model with its weight row set to theta (bias: the last
    entry if `intercept`, else 0)."""
    state = arrays.to_torch_state_dict()
    weights = [name for name, w in state.items() if w.ndim == 2]
    biases = [name for name, w in state.items() if w.ndim == 1]
    dim = len(theta) - int(intercept)
    if len(state) != 2 or len(weights) != 1 or len(biases) != 1 or state[weights[0]].shape != (1, dim):
        raise ValueError(
            f"strategy '{ACTION}' needs a linear model with one output on {dim} features: "
            "model {name: mlp, hidden: []}"
        )
    weight, bias = state[weights[0]], state[biases[0]]
    out = {
        weights[0]: theta[:dim].reshape(1, dim).to(weight.dtype),
        biases[0]: (theta[dim:] if intercept else torch.zeros(1)).to(bias.dtype),
    }
    return ArrayRecord({name: Array(np.ascontiguousarray(out[name].numpy())) for name in state})


@STRATEGIES.register(ACTION)
class LdpSparseRegression:
    """Zhu et al. 2024: non-interactive LDP sparse linear regression, one message per client."""

    releases_weights: ClassVar[bool] = False  # clients send noised sufficient statistics once

    Params: type[LdpSparseRegressionParams] = LdpSparseRegressionParams

    @classmethod
    def build(cls, params: LdpSparseRegressionParams) -> LdpSparseRegressionServer:
        return LdpSparseRegressionServer(params)
