"""Local training of many clients at once: stacked parameters, one `vmap`ped step.

Every client of a chunk runs the same model on its own parameters (`torch.func.functional_call`
over parameters stacked on a leading client axis). Clients differ in data size and step count:
a step's batch is padded to `batch_size` with zero-weight rows, and a client that has finished
its steps is masked out of the update (its parameters and optimizer state are kept), so no
client is dropped and each one takes exactly the steps, batches and optimizer arithmetic of
`fedsim.federation.training.train_locally` (SGD with momentum / weight decay, Adam, FedProx's
proximal pull added to the gradient before the optimizer's weight decay, as there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

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
    """Per client: trained parameters (on CPU), mean step loss, its step schedule."""

    params: list[dict[str, torch.Tensor]]
    mean_losses: list[float]


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
) -> CohortResult:
    """Train len(starts) clients from their start parameters on their data, in one batch."""
    names = [name for name, _ in model.named_parameters()]
    clients, width, steps = len(starts), hp.batch_size, max(map(len, schedules))
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
    active = weight.sum(2) > 0  # [steps, clients]: the client takes step s

    def loss_of(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
        per = per_example_loss(functional_call(model, p, (xb,)), yb, regression)
        return (per * wb).sum() / wb.sum().clamp_min(1.0)

    step_grads = vmap(grad_and_value(loss_of))
    rows = torch.arange(clients, device=device)[:, None]
    first = {k: torch.zeros_like(v) for k, v in params.items()}  # momentum buffer / Adam moments
    second = {k: torch.zeros_like(v) for k, v in params.items()}
    taken = torch.zeros(clients, device=device)
    loss_sum = torch.zeros(clients, device=device)
    for s in range(steps):
        grads, losses = step_grads(params, x[rows, index[s]], y[rows, index[s]], weight[s])
        on = active[s]
        loss_sum += torch.where(on, losses.detach(), 0.0)
        for k in names:
            p, g = params[k], grads[k]
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
                second[k] = torch.where(_expand(on, p), v, second[k])
            elif hp.momentum:
                m = torch.where(_expand(taken == 0, p), g, hp.momentum * first[k] + g)
                new = p - hp.lr * m
            else:
                m, new = first[k], p - hp.lr * g
            first[k] = torch.where(_expand(on, p), m, first[k])
            params[k] = torch.where(_expand(on, p), new, p).detach()
        taken += on
    counts = [len(s) for s in schedules]
    cpu = {k: v.cpu() for k, v in params.items()}
    return CohortResult(
        params=[{k: v[c] for k, v in cpu.items()} for c in range(clients)],
        mean_losses=[float(l) / n for l, n in zip(loss_sum.cpu(), counts)],
    )
