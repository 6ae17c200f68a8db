"""DP kernel-density classification (after Backurs, Lin, Mahabadi, Silwal, Tarnawski, ICLR 2024).

A DP data structure answers F_c(y) = sum_{x in X_c} f(x, y) over the private examples X_c of
class c, for any query y; the classifier predicts argmax_c F_c(y) / |X_c| (highest average
similarity). The kernel is the paper's Gaussian f(x, y) = exp(-||x - y||^2 / s^2). It is
linearised with random Fourier features (Rahimi & Recht 2007): with w_1..w_{D/2} ~ N(0, (2/s^2) I)
and, optionally, a public Johnson-Lindenstrauss projection P (p x d, entries N(0, 1/p)) applied
first (the paper's dimension-reduction step; it changes the kernel to one on P x),

    phi(x) = (cos(w_j . P x), sin(w_j . P x))_{j <= D/2} / sqrt(D/2),   E[phi(x) . phi(y)] = f(Px, Py),

and ||phi(x)||_2 = 1 exactly. Each client releases once, per class c, the noised sketch

    S_c = sum_{x in its X_c} (phi(x), 1) + N(0, s_noise^2 I_{D+1})      (Gaussian, default)
    S_c = ... + Laplace(b)^{D+1}                                          (mechanism: laplace)

(the last coordinate counts the class's examples, so the average needs no separate release).
Adding or removing one example (x, label) moves one row of the client's (C, D+1) sketch table
by (phi(x), 1): L2 norm sqrt(2), L1 norm at most sqrt(D) + 1. s_noise is the analytic Gaussian
calibration for sensitivity sqrt(2) at (epsilon, delta); b = (sqrt(D) + 1) / epsilon gives pure
epsilon-DP. That is example-level DP per client against the server, for one release.

The server sends its global model (so every client uses the same public random maps) and sums the clients' sketches (plain summation, standing in for SecAgg+'s sum: this
server sees every noised sketch, each DP on its own) and puts the sum into the global `kde`
model, which scores a query y as (S_c[:D] . phi(y)) / S_c[D] per class, leaving out classes
whose noised count S_c[D] is below 3 stds of its noise (public: from epsilon, delta and the
number of sketches), as an empty class's count is noise and its "average" unbounded. The paper's
improved structures (its l1-distance tree, and its bounds for the Gaussian kernel) are not
implemented: this is the random-feature sketch those results are compared with, plus the
public projection; docs/baselines.md says where it differs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from fedsim.core.defense import PrivacyUnit
from fedsim.core.registry import CLIENT_ACTIONS, MODELS, STRATEGIES
from fedsim.defenses.ldp_sparse_regression import analytic_gaussian_sigma
from fedsim.federation.client_call import ClientCall
from fedsim.federation.strategies import TAKE_ALL_NODES

ACTION = "dp_kde"
MESSAGE_TYPE = f"train.{ACTION}"
RELEASED_STATE = "fedsim.dp_kde"
EPSILON_METRIC = "kde_epsilon"
SKETCH = "sketch"
MIN_COUNT = "min_count"
COUNT_THRESHOLD = 3.0  # noise stds a class count must exceed to be predicted
Mechanism = Literal["gaussian", "laplace"]


@MODELS.register("kde")
class KdeClassifier(nn.Module):
    """Kernel-density classifier: average random-Fourier-feature similarity to each class's sketch."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        features: int = Field(1000, ge=2, multiple_of=2, description="random Fourier features D (even)")
        bandwidth: float = Field(
            2.0, gt=0, description="s of the Gaussian kernel exp(-||x - y||^2 / s^2), on the (projected) input"
        )
        projection: int | None = Field(
            None, ge=1, description="public random JL projection to this many dimensions first (null: none)"
        )

    def __init__(self, params: Params, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        dim = math.prod(input_shape)
        # Public randomness: every party builds the same maps from the scenario's public seed.
        if params.projection is not None:
            self.register_buffer("projection", torch.randn(params.projection, dim) / math.sqrt(params.projection))
            dim = params.projection
        else:
            self.projection = None
        self.register_buffer("frequencies", torch.randn(params.features // 2, dim) * math.sqrt(2.0) / params.bandwidth)
        self.register_buffer(SKETCH, torch.zeros(num_classes, params.features + 1))
        self.register_buffer(MIN_COUNT, torch.ones(()))

    def feature_map(self, x: Tensor) -> Tensor:
        """phi(x) (B, D) of the module doc, unit L2 norm per row."""
        flat = x.flatten(1).to(self.frequencies.dtype)
        if self.projection is not None:
            flat = flat @ self.projection.T
        angles = flat @ self.frequencies.T
        return torch.cat([angles.cos(), angles.sin()], 1) / math.sqrt(angles.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        """Per class: estimated average kernel value (S_c[:D] . phi(x)) / S_c[D]; a class whose
        noised count S_c[D] is below `min_count` (set by the server above the count's noise
        level: no real examples told apart from noise) scores -1e4, never the argmax."""
        sums, counts = self.sketch[:, :-1], self.sketch[:, -1]
        kept = counts >= self.min_count
        scores = self.feature_map(x) @ sums.T / counts.clamp_min(self.min_count)
        return scores.masked_fill(~kept, -1e4)


class DpKdeParams(BaseModel):
    """The release mechanism."""

    model_config = ConfigDict(extra="forbid")

    epsilon: float = Field(1.0, gt=0, description="example-level epsilon of a client's one release")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the release (gaussian only)")
    mechanism: Mechanism = Field("gaussian", description="gaussian (analytic, (eps, delta)) or laplace (pure eps)")


def noise_scale(params: DpKdeParams, features: int) -> float:
    """Gaussian std for L2 sensitivity sqrt(2), or Laplace scale for L1 sensitivity sqrt(D) + 1."""
    if params.mechanism == "laplace":
        return (math.sqrt(features) + 1.0) / params.epsilon
    return analytic_gaussian_sigma(math.sqrt(2.0), params.epsilon, params.delta)


def noise_std(params: DpKdeParams, features: int) -> float:
    """Standard deviation of one noise entry (Laplace(b): sqrt(2) b)."""
    scale = noise_scale(params, features)
    return scale * math.sqrt(2.0) if params.mechanism == "laplace" else scale


def count_floor(params: DpKdeParams, features: int, sketches: int) -> float:
    """`min_count` for a sum of `sketches` releases: 3 stds of the summed count noise (>= 1).

    Post-processing from public quantities only (epsilon, delta, D, number of sketches)."""
    return max(1.0, COUNT_THRESHOLD * noise_std(params, features) * math.sqrt(sketches))


def class_sums(model: KdeClassifier, x: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """(C, D+1): per class, sum of (phi(x), 1) over its examples (exact, no noise)."""
    with torch.no_grad():
        rows = torch.cat([model.feature_map(x), torch.ones(len(x), 1)], 1)
    return torch.zeros(num_classes, rows.shape[1]).index_add_(0, y, rows)


def private_sketch(
    model: KdeClassifier, x: Tensor, y: Tensor, num_classes: int, params: DpKdeParams, generator: torch.Generator
) -> Tensor:
    """`class_sums` plus iid noise of `noise_scale` on every entry (all C rows, empty classes too)."""
    sums = class_sums(model, x, y, num_classes)
    scale = noise_scale(params, sums.shape[1] - 1)
    if params.mechanism == "laplace":
        uniform = torch.rand(sums.shape, generator=generator) - 0.5
        noise = -scale * uniform.sign() * torch.log1p(-2 * uniform.abs())
    else:
        noise = torch.normal(0.0, scale, size=sums.shape, generator=generator)
    return sums + noise


class AlreadyReleased(RuntimeError):
    """A client asked for a second sketch: its epsilon covers one release only."""


@CLIENT_ACTIONS.register(ACTION)
def release(content: RecordDict, call: ClientCall) -> RecordDict:
    """A client's one noised sketch table, or `AlreadyReleased` if this node has released before."""
    if RELEASED_STATE in call.state:
        raise AlreadyReleased(f"client {call.partition_id} has released its one sketch already")
    params: DpKdeParams = call.setup.scenario.federation.strategy.params
    model = call.setup.new_model()
    if not isinstance(model, KdeClassifier):
        raise TypeError(f"strategy '{ACTION}' needs model 'kde'")
    model.load_state_dict(content["arrays"].to_torch_state_dict())  # the server's public feature map
    data = call.train_data()
    num_classes = call.setup.data.num_classes
    sketch = private_sketch(model, data.x, data.y, num_classes, params, call.generator("dp-kde-noise"))
    call.state[RELEASED_STATE] = ConfigRecord({"released": True})
    metrics = call.private_metrics(
        {"num-examples": len(data), "partition-id": call.partition_id, EPSILON_METRIC: params.epsilon},
        frozenset({EPSILON_METRIC}),
    )
    return RecordDict({"arrays": ArrayRecord({SKETCH: Array(sketch.numpy())}), "metrics": MetricRecord(metrics)})


class DpKdeServer(FedAvg):
    """Asks each client once for its sketch table; the global model holds their running sum."""

    def __init__(self, params: DpKdeParams) -> None:
        super().__init__(**TAKE_ALL_NODES)
        self.params = params
        self.asked: set[int] = set()
        self.total: np.ndarray | None = None
        self.released = 0  # sketches summed so far
        self.arrays: ArrayRecord | None = None

    def privacy_unit(self) -> PrivacyUnit:
        """One example of a client, add/remove, noised by the client; one release."""
        p = self.params
        accountant = "analytic gaussian" if p.mechanism == "gaussian" else "laplace"
        return PrivacyUnit("example", "add/remove", p.delta if p.mechanism == "gaussian" else 0.0, accountant, EPSILON_METRIC)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        self.arrays = arrays
        nodes = [node for node in grid.get_node_ids() if node not in self.asked]
        self.asked.update(nodes)
        round_config = ConfigRecord({**config, "server-round": server_round})
        content = {"arrays": arrays, "config": round_config}  # the global model: its random maps
        return [
            Message(RecordDict(content), dst_node_id=node, message_type=MESSAGE_TYPE)
            for node in nodes
        ]

    def aggregate_train(
        self, server_round: int, replies: Any
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Add this round's sketches to the sum (the SecAgg+-style aggregate) in the model, and
        set its `min_count` to 3 stds of the summed count noise."""
        replies = list(replies)
        if not replies:
            return None, None
        for reply in replies:
            sketch = reply.content["arrays"][SKETCH].numpy()
            self.total = sketch if self.total is None else self.total + sketch
            self.released += 1
        out = {name: a.numpy() for name, a in self.arrays.items()}
        out[SKETCH] = self.total.astype(out[SKETCH].dtype)
        floor = count_floor(self.params, out[SKETCH].shape[1] - 1, self.released)
        out[MIN_COUNT] = np.asarray(floor, dtype=out[MIN_COUNT].dtype)
        return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in out.items()}), None


@STRATEGIES.register(ACTION)
class DpKde:
    """DP kernel-density classification: one noised random-feature sketch per class and client."""

    releases_weights: ClassVar[bool] = False  # clients send noised sketches, once

    Params: type[DpKdeParams] = DpKdeParams

    @classmethod
    def build(cls, params: DpKdeParams) -> DpKdeServer:
        return DpKdeServer(params)
