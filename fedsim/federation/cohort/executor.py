"""Local training of many clients at once: stacked parameters, one `vmap`ped step.

Every client of a chunk runs the same model on its own parameters (`torch.func.functional_call`
over parameters stacked on a leading client axis). Clients differ in data size and step count:
a step's batch is padded to `batch_size` with zero-weight rows, and a client that has finished
its steps is masked out of the update (its parameters and optimizer state are kept), so no
client is dropped and each one takes exactly the steps, batches and optimizer arithmetic of
`fedsim.federation.training.train_locally` (SGD with momentum / weight decay, Adam, FedProx's
proximal pull added to the gradient before the optimizer's weight decay, as there).

DP-SGD (`PrivateSteps`, from the defense) replaces a step's mean gradient by Opacus's clipped,
noised sum (`fedsim.federation.cohort.private`); Poisson batches of any size are padded to the
largest one. A defense's `BatchedLoss` (MID's KL) adds its per-example term to the loss, with
each client's model noise for every step drawn before training and handed to the model inside
the `vmap`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedsim.core.defense import BatchedLoss, PrivateSteps
from fedsim.federation.cohort.private import PrivateGradients
from fedsim.data.datasets import TensorData
from fedsim.federation.training import LocalHyperParams

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which the inline path uses


def batch_schedule(num_examples: int, hp: LocalHyperParams, generator: torch.Generator) -> list[torch.Tensor]:
    """The example indices of each local step, drawn exactly as `make_loader`'s DataLoader draws
    them from the client's secret generator: per pass, the loader's base seed, then a permutation."""
    total, steps = hp.steps_for(num_examples), []
    while len(steps) < total:
        if steps:  # the finished pass's sampler drew one more (empty) permutation at its end
            torch.randperm(num_examples, generator=generator)
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # DataLoader's base seed
        order = torch.randperm(num_examples, generator=generator)
        steps.extend(order[i : i + hp.batch_size] for i in range(0, num_examples, hp.batch_size))
    return steps[:total]


@dataclass
class CohortResult:
    """The trained parameters, stacked on a leading client axis (on CPU: a few large tensors,
    which is also what a Ray worker sends back cheaply), and per client the mean step loss and
    the batch mean of the `BatchedLoss` term at each of its steps (empty without one)."""

    params: dict[str, torch.Tensor]
    mean_losses: list[float]
    term_means: list[list[float]]

    def client_params(self, c: int) -> dict[str, torch.Tensor]:
        """Client c's trained parameters (views into `params`)."""
        return {k: v[c] for k, v in self.params.items()}

    @staticmethod
    def concatenate(parts: list[CohortResult]) -> CohortResult:
        """The results of consecutive chunks as one, in client order."""
        return CohortResult(
            params={k: torch.cat([p.params[k] for p in parts]) for k in parts[0].params},
            mean_losses=[loss for p in parts for loss in p.mean_losses],
            term_means=[means for p in parts for means in p.term_means],
        )


def warm_up() -> None:
    """Pay torch.func's one-time cost now: its first `vmap(grad(...))` imports torch._dynamo
    (about 1 s), which a Ray worker then pays while starting, not in round 1."""
    vmap(grad_and_value(lambda p: (p * p).sum()))(torch.ones(2, 1))


def per_example_loss(output: torch.Tensor, y: torch.Tensor, regression: bool) -> torch.Tensor:
    if regression:
        return (output.reshape(y.shape) - y) ** 2
    return nn.functional.cross_entropy(output, y, reduction="none")


def _expand(flags: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return flags.view(-1, *[1] * (like.dim() - 1))


def train_cohort(
    model: nn.Module,
    starts: list[dict[str, torch.Tensor]],
    datas: list[TensorData],
    schedules: list[list[torch.Tensor]],
    hp: LocalHyperParams,
    device: torch.device,
    private: list[PrivateSteps] | None = None,
    extra: list[BatchedLoss] | None = None,
) -> CohortResult:
    """Train len(starts) clients from their start parameters on their data, in one batch
    (DP-SGD steps where `private` gives each client's; then `schedules` are its batches; the
    loss term of `extra`, one per client, where given)."""
    names = [name for name, _ in model.named_parameters()]
    clients, steps = len(starts), max(map(len, schedules))
    longest_batch = max((len(b) for schedule in schedules for b in schedule), default=0)
    width = max(1, longest_batch) if private else hp.batch_size  # Poisson batches vary in size
    regression = datas[0].is_regression
    params = {k: torch.stack([s[k] for s in starts]).to(device, torch.float32) for k in names}
    anchor = {k: v.clone() for k, v in params.items()}
    longest = max(len(d) for d in datas)
    x = torch.zeros(clients, longest, *datas[0].x.shape[1:], dtype=datas[0].x.dtype)
    y = torch.zeros(clients, longest, *datas[0].y.shape[1:], dtype=datas[0].y.dtype)
    index = torch.zeros(steps, clients, width, dtype=torch.long)
    weight = torch.zeros(steps, clients, width)
    for c, (data, schedule) in enumerate(zip(datas, schedules)):
        x[c, : len(data)], y[c, : len(data)] = data.x, data.y
        for s, batch in enumerate(schedule):
            index[s, c, : len(batch)], weight[s, c, : len(batch)] = batch, 1.0
    x, y, index, weight = x.to(device), y.to(device), index.to(device), weight.to(device)
    counts = [len(s) for s in schedules]
    active = (torch.arange(steps)[:, None] < torch.tensor(counts)).to(device)  # [steps, clients]: a
    # client takes step s (a Poisson batch may be empty: that step adds noise only)
    noise = None if extra is None else model_noise(extra, schedules, width).to(device)

    def loss_of(
        p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor, eps: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted mean loss, and the weighted mean of the extra term (0 without one)."""
        total = wb.sum().clamp_min(1.0)
        if eps is None:
            per = per_example_loss(functional_call(model, p, (xb,)), yb, regression)
            return (per * wb).sum() / total, torch.zeros(())
        term = extra[0]
        term.inject(model, eps)
        try:
            per = per_example_loss(functional_call(model, p, (xb,)), yb, regression)
            added = term.term(model)
        finally:
            term.inject(model, None)
        return ((per + term.weight * added) * wb).sum() / total, (added * wb).sum() / total

    step_grads = vmap(grad_and_value(loss_of, has_aux=True), in_dims=(0, 0, 0, 0, None if noise is None else 0))
    if private is not None:
        private_grads = PrivateGradients(model, x[0, :1], lambda out, yb: per_example_loss(out, yb, regression))
    rows = torch.arange(clients, device=device)[:, None]
    moments = 2 if hp.optimizer == "adam" else int(bool(hp.momentum))  # optimizer state tensors
    first = {k: torch.zeros_like(v) for k, v in params.items()} if moments else {}  # momentum / Adam's m
    second = {k: torch.zeros_like(v) for k, v in params.items()} if moments == 2 else {}  # Adam's v
    taken = torch.zeros(clients, device=device)
    loss_sum = torch.zeros(clients, device=device)
    term_means = []
    for s in range(steps):
        on, xb, yb, wb = active[s], x[rows, index[s]], y[rows, index[s]], weight[s]
        if private is None:
            grads, (losses, term_mean) = step_grads(params, xb, yb, wb, None if noise is None else noise[s])
            term_means.append(term_mean.detach())
        else:
            grads, losses = private_grads(params, xb, yb, wb, on, private)
        loss_sum += torch.where(on, losses.detach(), 0.0)
        everyone = bool(on.all())  # the common case: no masking (the update ops dominate a step)

        def kept(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
            return new if everyone else torch.where(_expand(on, old), new, old)

        for k in names:
            p, g = params[k], grads[k].detach()
            if hp.proximal_mu:
                g = g + hp.proximal_mu * (p - anchor[k])
            if hp.weight_decay:
                g = g + hp.weight_decay * p
            if hp.optimizer == "adam":
                t = _expand(taken + 1, p)
                m = ADAM_BETAS[0] * first[k] + (1 - ADAM_BETAS[0]) * g
                v = ADAM_BETAS[1] * second[k] + (1 - ADAM_BETAS[1]) * g * g
                denom = v.sqrt() / (1 - ADAM_BETAS[1] ** t).sqrt() + ADAM_EPS
                new = p - (hp.lr / (1 - ADAM_BETAS[0] ** t)) * m / denom
                second[k] = kept(v, second[k])
                first[k] = kept(m, first[k])
            elif hp.momentum:
                m = g if s == 0 else torch.where(_expand(taken == 0, p), g, hp.momentum * first[k] + g)
                new = torch.add(p, m, alpha=-hp.lr)
                first[k] = kept(m, first[k])
            else:
                new = torch.add(p, g, alpha=-hp.lr)
            params[k] = kept(new, p)
        taken += on
    cpu = {k: v.cpu() for k, v in params.items()}
    terms = torch.stack(term_means).T.tolist() if extra is not None else [[]] * clients  # [clients, steps]
    return CohortResult(
        params=cpu,
        mean_losses=[float(l) / n for l, n in zip(loss_sum.cpu(), counts)],
        term_means=[row[:n] for row, n in zip(terms, counts)],
    )


def model_noise(extra: list[BatchedLoss], schedules: list[list[torch.Tensor]], width: int) -> torch.Tensor:
    """[steps, clients, width, ...]: each client's model noise for each of its steps, drawn
    from its own stream in step order, padded with zeros to the batch width."""
    draws = [[term.draw(len(batch)) for batch in schedule] for term, schedule in zip(extra, schedules)]
    shape = next(d for per_client in draws for d in per_client).shape[1:]
    noise = torch.zeros(max(map(len, schedules)), len(schedules), width, *shape)
    for c, per_client in enumerate(draws):
        for s, eps in enumerate(per_client):
            noise[s, c, : len(eps)] = eps
    return noise
