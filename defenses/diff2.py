"""DIFF2 (Murata & Suzuki, ICML 2023) and its baseline DP-GD: private full-batch optimisation.

Every round each client releases one Gaussian mechanism over its n examples z_1..z_n:

- a gradient release (DP-GD every round; DIFF2 every `refresh_every` rounds):
      g = ( sum_i clip_C1(grad l(x_t; z_i)) + N(0, (2 sigma_g C1)^2 I) ) / n
- a difference release (DIFF2 in the other rounds), from the last two global models:
      d = ( sum_i clip_C2(grad l(x_t; z_i) - grad l(x_{t-1}; z_i)) + N(0, (2 sigma_d C2)^2 I) ) / n

where l is the task's loss (cross-entropy; squared error for regression) and
clip_C(u) = u * min(1, C / ||u||) on the whole flattened per-example gradient. Clients send
no example count (`num-examples` is 1), so the server averages the releases uniformly and keeps
the global gradient estimator

      v_t = mean_k g_k                 (refresh rounds)
      v_t = v_{t-1} + mean_k d_k       (other rounds)
      x_{t+1} = x_t - lr * v_t

Privacy (sample-level, replace-one, per client, against the server and everyone after it):
replacing one example moves a clipped sum by at most 2C, and the noise std is sigma*2C, so
each release (divided by the client's n, fixed between such neighbours) is a Gaussian mechanism of noise multiplier sigma_g or sigma_d, of Renyi DP
alpha / (2 sigma^2) at every order alpha. R rounds of DP-GD at `noise_multiplier` sigma cost
alpha R / (2 sigma^2). DIFF2 makes N_g = ceil(R/T) gradient and N_d = R - N_g difference
releases and gives a `refresh_share` s of that same budget to the gradients:

      N_g / sigma_g^2 = s R / sigma^2,      N_d / sigma_d^2 = (1 - s) R / sigma^2,

so after R rounds it has spent exactly DP-GD's Renyi DP at every order, hence the same epsilon.
The rare gradient releases get less noise than DP-GD's (sigma_g < sigma when N_g < s R), and
the difference releases are cheap because C2 << C1: near convergence consecutive gradients
differ little. Each client's epsilon is Opacus's RDP accountant over the releases it made
(rounds it sat out cost nothing; no amplification by sampling is claimed).

With `clients_per_round` below the federation size the means are over each round's cohort
(the paper has every client in every round). DP-GD is DIFF2 with `refresh_every: 1`; both
send messages of type "train.diff2". Gradients
are those of the model in eval mode (dropout off, batch-norm statistics frozen), so both
models x_t and x_{t-1} are differentiated as the same deterministic function. The releases are
not weights, so the observer records only their metrics (each client's epsilon).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fedsim.core.defense import PrivacyUnit
from fedsim.core.registry import CLIENT_ACTIONS, STRATEGIES
from fedsim.data.datasets import TensorData
from fedsim.federation.client_call import ClientCall
from fedsim.federation.strategies import TAKE_ALL_NODES
from fedsim.federation.training import task_criterion

ACTION = "diff2"
MESSAGE_TYPE = f"train.{ACTION}"
RELEASE_KEY = "diff2.release"
PREVIOUS_KEY = "previous-arrays"
RELEASES_STATE = "fedsim.diff2"
Release = Literal["gradient", "difference"]


class DpGdParams(BaseModel):
    """Parameters shared by DP-GD and DIFF2."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(0.5, gt=0, description="server step size on the gradient estimator")
    clip: float = Field(1.0, gt=0, description="per-example gradient norm bound C1")
    noise_multiplier: float | None = Field(
        None, gt=0, description="DP-GD's noise std / clipping bound (1.0 unless target_epsilon is set)"
    )
    target_epsilon: float | None = Field(
        None, gt=0, description="instead of noise_multiplier: the noise that reaches this epsilon after all rounds"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the reported epsilon")
    chunk_size: int = Field(256, ge=1, description="examples per vectorised per-example-gradient pass (memory only)")

    @model_validator(mode="before")
    @classmethod
    def _default_noise(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("noise_multiplier") is None and data.get("target_epsilon") is None:
            return {**data, "noise_multiplier": 1.0}
        return data

    @model_validator(mode="after")
    def _one_noise_source(self) -> DpGdParams:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("set exactly one of noise_multiplier and target_epsilon")
        return self

    @property
    def refresh(self) -> int:
        return 1

    @property
    def difference_clip(self) -> float:
        return self.clip

    @property
    def budget_share(self) -> float:
        return 1.0


class Diff2Params(DpGdParams):
    """DIFF2: DP-GD's parameters plus the refresh period and the difference bound."""

    refresh_every: int = Field(10, ge=1, description="rounds between full gradient releases (T)")
    clip_diff: float = Field(0.1, gt=0, description="per-example gradient-difference norm bound C2")
    refresh_share: float = Field(
        0.5, gt=0, lt=1, description="share of the privacy budget spent on the gradient releases"
    )

    @property
    def refresh(self) -> int:
        return self.refresh_every

    @property
    def difference_clip(self) -> float:
        return self.clip_diff

    @property
    def budget_share(self) -> float:
        return self.refresh_share


@lru_cache(maxsize=64)
def _calibrated_noise(target_epsilon: float, delta: float, rounds: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier  # Opacus where it is used

    return get_noise_multiplier(
        target_epsilon=target_epsilon, target_delta=delta, sample_rate=1.0, steps=rounds, accountant="rdp"
    )


def release_noise(params: DpGdParams, rounds: int) -> dict[Release, float]:
    """(sigma_g, sigma_d): the budget of `rounds` DP-GD steps at sigma, split by `budget_share`.

    sigma is `noise_multiplier`, or the one at which `rounds` DP-GD steps spend
    `target_epsilon`.
    """
    sigma = params.noise_multiplier
    if sigma is None:
        sigma = _calibrated_noise(params.target_epsilon, params.delta, rounds)
    gradients = -(-rounds // params.refresh)  # rounds 1, 1 + T, 1 + 2T, ...
    differences = rounds - gradients
    if differences == 0:
        return {"gradient": sigma, "difference": sigma}
    share = params.budget_share
    return {
        "gradient": sigma * math.sqrt(gradients / (share * rounds)),
        "difference": sigma * math.sqrt(differences / ((1 - share) * rounds)),
    }


def epsilon_after(releases: dict[Release, int], noise: dict[Release, float], delta: float) -> float:
    """Opacus RDP epsilon of the Gaussian releases made so far (sampling rate 1)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise[kind], 1.0, count) for kind, count in releases.items() if count]
    return float(accountant.get_epsilon(delta))


def per_example_gradients(
    model: nn.Module, weights: dict[str, Tensor], x: Tensor, y: Tensor, criterion: nn.Module
) -> Tensor:
    """Per-example gradients of `criterion` at `weights`, flattened to (B, d) in `weights` order."""

    def loss_of_one(w: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return criterion(functional_call(model, w, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(weights, x, y)
    return torch.cat([grads[name].reshape(len(x), -1) for name in weights], dim=1)


def sensitivity(bound: float) -> float:
    """L2 sensitivity of a clipped sum under replace-one: one row swapped moves it by <= 2C.

    Replace-one keeps n fixed, so dividing by the exact n is post-processing; under
    add/remove, n itself would differ between neighbours and 1/n would leak it.
    """
    return 2 * bound


def clipped_sum(vectors: Tensor, bound: float) -> Tensor:
    """sum_i v_i * min(1, bound / ||v_i||): each row's contribution is at most `bound`."""
    norms = vectors.norm(dim=1, keepdim=True)
    return (vectors * (bound / (norms + 1e-12)).clamp(max=1.0)).sum(0)


def private_release(
    model: nn.Module,
    data: TensorData,
    current: dict[str, Tensor],
    previous: dict[str, Tensor] | None,
    bound: float,
    sigma: float,
    generator: torch.Generator,
    chunk_size: int,
) -> Tensor:
    """(clipped sum of per-example gradients at `current`, minus those at `previous` if given,
    plus N(0, (sigma * 2 bound)^2 I)) / n, flattened in `current`'s parameter order."""
    model.eval()
    criterion = task_criterion(data)
    total = torch.zeros(sum(w.numel() for w in current.values()))
    for start in range(0, len(data), chunk_size):
        x, y = data.x[start : start + chunk_size], data.y[start : start + chunk_size]
        grads = per_example_gradients(model, current, x, y, criterion)
        if previous is not None:
            grads = grads - per_example_gradients(model, previous, x, y, criterion)
        total += clipped_sum(grads.detach(), bound)
    noise = torch.normal(0.0, sigma * sensitivity(bound), size=total.shape, generator=generator)
    return (total + noise) / len(data)


@CLIENT_ACTIONS.register(ACTION)
def release(content: RecordDict, call: ClientCall) -> RecordDict:
    """A client's DP-GD/DIFF2 release for this round; its epsilon composes over all its rounds."""
    scenario = call.setup.scenario
    params: DpGdParams = scenario.federation.strategy.params
    train_data = call.train_data()
    model = call.setup.new_model()
    names = [name for name, _ in model.named_parameters()]

    def parameters(record: ArrayRecord) -> dict[str, Tensor]:
        state = record.to_torch_state_dict()
        return {name: state[name] for name in names}

    kind: Release = str(call.config[RELEASE_KEY])  # type: ignore[assignment]
    previous = parameters(content[PREVIOUS_KEY]) if kind == "difference" else None
    noise = release_noise(params, scenario.federation.rounds)
    flat = private_release(
        model,
        train_data,
        parameters(content["arrays"]),
        previous,
        params.clip if kind == "gradient" else params.difference_clip,
        noise[kind],
        call.generator("diff2-noise"),
        params.chunk_size,
    )
    made = call.state.get(RELEASES_STATE, ConfigRecord({"gradient": 0, "difference": 0}))
    releases: dict[Release, int] = {"gradient": int(made["gradient"]), "difference": int(made["difference"])}
    releases[kind] += 1
    call.state[RELEASES_STATE] = ConfigRecord(dict(releases))
    shapes = {name: p.shape for name, p in model.named_parameters()}
    pieces = torch.split(flat, [shape.numel() for shape in shapes.values()])
    arrays = ArrayRecord({n: Array(p.reshape(shapes[n]).numpy()) for n, p in zip(names, pieces, strict=True)})
    metrics = call.private_metrics(
        {
            "num-examples": len(train_data),
            "partition-id": call.partition_id,
            "epsilon": epsilon_after(releases, noise, params.delta),
        },
        frozenset({"epsilon"}),
    )
    return RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})


class PrivateGradientDescent(FedAvg):
    """The server of DP-GD / DIFF2: keeps the gradient estimator v and steps x <- x - lr * v.

    Evaluation messages are FedAvg's; train messages carry the current global model and, in a
    difference round, the previous one (`previous-arrays`), so clients keep no model state.
    """

    def __init__(self, lr: float, refresh_every: int, delta: float) -> None:
        super().__init__(**TAKE_ALL_NODES)
        self.lr = lr
        self.delta = delta
        self.refresh_every = refresh_every
        self.estimate: dict[str, np.ndarray] = {}
        self.current: ArrayRecord | None = None
        self.previous: ArrayRecord | None = None

    def privacy_unit(self) -> PrivacyUnit:
        """Each client's epsilon: one example, replace-one (noise calibrated to 2C, n fixed)."""
        return PrivacyUnit("example", "replace-one", self.delta, "rdp", "epsilon")

    def release_kind(self, server_round: int) -> Release:
        """A full gradient every `refresh_every` rounds from round 1, differences in between."""
        return "gradient" if (server_round - 1) % self.refresh_every == 0 else "difference"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        kind = self.release_kind(server_round)
        self.current = arrays
        content: dict[str, Any] = {
            "arrays": arrays,
            "config": ConfigRecord({**config, "server-round": server_round, RELEASE_KEY: kind}),
        }
        if kind == "difference":
            content[PREVIOUS_KEY] = self.previous
        return [
            Message(RecordDict(content), dst_node_id=node, message_type=MESSAGE_TYPE)
            for node in grid.get_node_ids()
        ]

    def aggregate_train(
        self, server_round: int, replies: Any
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """v <- mean release (refresh) or v + mean release (difference); x <- x - lr * v."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        mean = aggregate_arrayrecords([m.content for m in valid], self.weighted_by_key)
        if self.release_kind(server_round) == "gradient":
            self.estimate = {name: a.numpy() for name, a in mean.items()}
        else:
            self.estimate = {name: self.estimate[name] + a.numpy() for name, a in mean.items()}
        current = {name: a.numpy() for name, a in self.current.items()}
        stepped = {
            name: Array((w - self.lr * self.estimate[name]).astype(w.dtype) if name in self.estimate else w)
            for name, w in current.items()
        }
        self.previous = self.current
        return ArrayRecord(stepped), None


@STRATEGIES.register("dp_gd")
class DpGd:
    """DP-GD: full-batch gradient descent on clipped, Gaussian-noised client gradients."""

    releases_weights: ClassVar[bool] = False  # clients send noised gradients (see above)

    Params: type[DpGdParams] = DpGdParams

    @classmethod
    def build(cls, params: DpGdParams) -> PrivateGradientDescent:
        return PrivateGradientDescent(params.lr, params.refresh, params.delta)


@STRATEGIES.register("diff2")
class Diff2(DpGd):
    """DIFF2 (Murata & Suzuki 2023): DP-GD on noised gradient differences, refreshed every T rounds."""

    Params = Diff2Params
