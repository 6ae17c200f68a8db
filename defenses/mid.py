"""MID: mutual-information regularisation against model inversion (Wang, Zhang, Jia, AAAI 2021).

A variational information bottleneck replaces the classifier head (the last linear layer) of
any fedsim model:

    features h -> W_e h = [mu, r]  (k + k outputs),   sigma = softplus(r - 5)
    z = mu + sigma * eps,  eps ~ N(0, I_k)            (reparameterised sample)
    logits = W_d z

and local training minimises  CE(logits, y) + beta * KL(N(mu, diag sigma^2) || N(0, I_k)),
whose closed form per example is

    KL = 1/2 * sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2)   (nats; averaged over the batch).

The KL term upper-bounds the mutual information I(X; Z), so the logits carry less about the
input than the label needs; the paper's claim is that this starves model inversion at a small
utility cost. As in the paper, prediction samples z too (`stochastic_prediction`), so every
party that queries the model, the attacker included, sees noisy outputs.

Every party builds the bottlenecked architecture (`wrap_model`), so the federation trains and
aggregates the head like any other layer. eps comes from torch's global generator, which
`prepare` seeds from the client's batch generator (reproducible per client and round) and
which Opacus's per-example gradient check already controls, so MID composes with DP-SGD.
The vectorised engine trains MID without `prepare` (`Mid.batched_loss`): each client's eps
come from a generator of its own with the same seed, handed to the head per step, so its
clients train exactly as inline ones on CPU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader

from fedsim.core.defense import BatchedLoss, LocalTraining, TrainTimeDefense
from fedsim.models.heads import classifier_head, replace_submodule
from fedsim.core.registry import DEFENSES

SIGMA_SHIFT = 5.0
"""sigma = softplus(r - 5): the bottleneck starts nearly deterministic (sigma ~ 0.007)."""


class InformationBottleneck(nn.Module):
    """features -> (mu, sigma) -> sampled z -> logits (keeps mu, sigma of a training pass)."""

    def __init__(
        self, in_features: int, bottleneck: int, num_classes: int, stochastic_prediction: bool
    ) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        self.stochastic_prediction = stochastic_prediction
        self.encoder = nn.Linear(in_features, 2 * bottleneck)
        self.decoder = nn.Linear(bottleneck, num_classes)
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.noise: torch.Tensor | None = None  # eps for the next forwards, set by a batched engine

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        mu, raw = self.encoder(features).split(self.bottleneck, dim=-1)
        sigma = F.softplus(raw - SIGMA_SHIFT)
        if self.training:  # the KL is a training loss; `kl_divergence` releases these
            self.last = (mu, sigma)
        if self.training or self.stochastic_prediction:
            eps = torch.randn_like(sigma) if self.noise is None else self.noise
            return self.decoder(mu + sigma * eps)
        return self.decoder(mu)

    def kl_per_example(self) -> torch.Tensor:
        """KL(N(mu, sigma^2) || N(0, I)) of each example of the last training forward, in nats."""
        if self.last is None:
            raise RuntimeError("kl_divergence() needs a forward pass in training mode first")
        (mu, sigma), self.last = self.last, None
        return 0.5 * (mu.square() + sigma.square() - 1 - 2 * sigma.log()).sum(-1)

    def kl_divergence(self) -> torch.Tensor:
        """Batch mean of `kl_per_example`."""
        return self.kl_per_example().mean()


def bottlenecks(model: nn.Module) -> list[InformationBottleneck]:
    return [m for m in model.modules() if isinstance(m, InformationBottleneck)]


@DEFENSES.register("mid")
class Mid(TrainTimeDefense):
    """MID (Wang et al. 2021): information bottleneck head, loss CE + beta * KL."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        beta: float = Field(0.01, ge=0, description="weight of the KL term (paper: 0.003-0.01)")
        bottleneck: int | None = Field(
            None, ge=1, description="k, the size of z; null = half the head's input features"
        )
        stochastic_prediction: bool = Field(
            True, description="sample z at prediction too, as in the paper (false: z = mu)"
        )

    params: Params

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self._kl_total = 0.0
        self._kl_batches = 0

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Replace the last linear layer (features -> logits) by the bottleneck head."""
        name, head = classifier_head(model, "defense 'mid'")
        k = self.params.bottleneck or max(1, head.in_features // 2)
        replace_submodule(
            model,
            name,
            InformationBottleneck(
                head.in_features, k, head.out_features, self.params.stochastic_prediction
            ),
        )
        return model

    def prepare(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader,
        training: LocalTraining,
        state: dict[str, Any],
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        """Seed the bottleneck noise from the batch generator: one stream per client and round."""
        if loader.generator is not None:
            torch.manual_seed(int(torch.randint(2**62, (), generator=loader.generator)))
        self._kl_total, self._kl_batches = 0.0, 0
        return model, optimizer, loader

    def loss(self, model: nn.Module, output: Any, target: torch.Tensor) -> torch.Tensor:
        """beta * KL of every bottleneck in the model, for the batch just forwarded."""
        kl = sum(head.kl_divergence() for head in bottlenecks(model))
        self._kl_total += kl.item()
        self._kl_batches += 1
        return self.params.beta * kl

    def finish(self, state: dict[str, Any]) -> dict[str, float]:
        """The mean KL (nats) of this client's round: how much the bottleneck still passes."""
        return {"mid_kl": self._kl_total / max(1, self._kl_batches)}

    def vectorized_refusal(self) -> str | None:
        return None

    def batched_loss(self, model: nn.Module, generator: torch.Generator) -> BatchedLoss:
        """`prepare` and `loss` for the vectorised engine: the seed `prepare` gives torch's
        global generator seeds a generator of this client's own, from which each step draws
        the (batch, k) eps the inline forward's `randn_like` would draw."""
        (head,) = bottlenecks(model)
        noise = torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=generator)))

        def inject(model: nn.Module, eps: torch.Tensor | None) -> None:
            for module in bottlenecks(model):
                module.noise = eps

        def term(model: nn.Module) -> torch.Tensor:
            (module,) = bottlenecks(model)
            return module.kl_per_example()

        return BatchedLoss(
            draw=lambda batch: torch.randn(batch, head.bottleneck, generator=noise),
            inject=inject,
            term=term,
            weight=self.params.beta,
            metrics=lambda means: {"mid_kl": sum(means) / max(1, len(means))},
        )
