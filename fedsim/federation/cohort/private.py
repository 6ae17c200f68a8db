"""DP-SGD's step gradient for a cohort of clients at once, as Opacus computes it per client.

Per client: every example's gradient is clipped to `max_grad_norm` (Opacus's factor
C / (norm + 1e-6), at most 1), the clipped gradients are summed, Gaussian noise of std
`noise_multiplier * C` from the client's own generator is added, and the sum is divided by the
expected batch size (`fedsim.core.defense.PrivateSteps`).

Materialising per-example gradients costs batch x parameters per client, which for a wide
nn.Linear is most of DP-SGD's price (Opacus's hooks mode: 65x the plain step for an MLP
[512, 256] on 3x32x32). So nn.Linear layers are book-kept (Bu et al. 2023, "Differentially
private optimization on large model at small cost"): a zero probe added to each layer's output
gives, in the same backward pass, the per-example output gradients G_i, and the layer's input
A_i is kept; the weight gradient's norm is then sqrt(sum((G_i G_i^T) * (A_i A_i^T))) (ghost
norm, Li et al. 2022; ||G_i|| ||A_i|| for one row) and the clipped sum is
sum_i c_i G_i^T A_i, one matmul, without any per-example weight gradient. Every other
parameter (convolutions, norms' affine weights) gets its per-example gradient from
`torch.func` (`vmap` over the batch inside the `vmap` over clients). A linear layer called more
than once per forward (shared) is treated as any other parameter.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fedsim.core.defense import PrivateSteps

Params = dict[str, torch.Tensor]


def linear_probes(model: nn.Module, example: torch.Tensor) -> dict[str, torch.Size]:
    """The nn.Linear layers called exactly once on `example` (a batch of one): name -> the
    shape of their output, where the probe goes."""
    calls: Counter[str] = Counter()
    shapes: dict[str, torch.Size] = {}

    def seen(name: str, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        calls[name] += 1
        shapes[name] = output.shape

    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    handles = [m.register_forward_hook(partial(seen, name)) for name, m in linears.items()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return {name: shapes[name] for name in linears if calls[name] == 1}


class PrivateGradients:
    """Per-client DP-SGD gradients of `model` for stacked parameters `[clients, ...]`."""

    def __init__(self, model: nn.Module, example: torch.Tensor, loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """`example`: one input batch of one (finds the book-kept layers); `loss_of(output,
        targets)`: the per-example task loss."""
        self.probes = linear_probes(model, example)
        modules = dict(model.named_modules())
        self.kept = {
            f"{name}.{kind}" for name in self.probes for kind in ("weight", "bias")
            if getattr(modules[name], kind) is not None
        }  # fmt: skip
        self.has_bias = {name: modules[name].bias is not None for name in self.probes}

        def example_parts(
            free: Params, zeros: Params, kept: Params, x1: torch.Tensor, y1: torch.Tensor
        ) -> tuple[Params, Params, Params, torch.Tensor]:
            """One example: gradients of the free parameters and of the probes, the inputs
            of the book-kept layers, the loss."""

            def loss(free: Params, zeros: Params) -> tuple[torch.Tensor, tuple[Params, torch.Tensor]]:
                inputs: Params = {}

                def probe(name: str, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
                    inputs[name] = args[0]
                    return output + zeros[name]

                handles = [modules[name].register_forward_hook(partial(probe, name)) for name in zeros]
                try:
                    out = functional_call(model, {**free, **kept}, (x1[None],))
                finally:
                    for handle in handles:
                        handle.remove()
                value = loss_of(out, y1[None])[0]
                return value, (inputs, value)

            (g_free, g_out), (inputs, value) = grad(loss, argnums=(0, 1), has_aux=True)(free, zeros)
            return g_free, g_out, inputs, value

        per_example = vmap(example_parts, in_dims=(None, None, None, 0, 0))
        self.per_client = vmap(per_example, in_dims=(0, None, 0, 0, 0))

    def __call__(
        self,
        params: Params,
        xb: torch.Tensor,
        yb: torch.Tensor,
        weight: torch.Tensor,
        on: torch.Tensor,
        private: list[PrivateSteps],
    ) -> tuple[Params, torch.Tensor]:
        """The step's private gradient per client and its mean loss over the real rows
        (`weight`); noise only for the clients taking this step (`on`)."""
        free = {k: v for k, v in params.items() if k not in self.kept}
        kept = {k: v for k, v in params.items() if k in self.kept}
        zeros = {name: torch.zeros(shape, device=xb.device) for name, shape in self.probes.items()}
        g_free, g_out, inputs, losses = self.per_client(free, zeros, kept, xb, yb)
        clients, width = weight.shape
        squared = sum((g.reshape(clients, width, -1).square().sum(2) for g in g_free.values()), torch.zeros_like(weight))
        rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in self.probes:  # [clients, width, rows per example, features]
            g = g_out[name].reshape(clients, width, -1, g_out[name].shape[-1])
            a = inputs[name].reshape(clients, width, -1, inputs[name].shape[-1])
            rows[name] = g, a
            if g.shape[2] == 1:
                squared = squared + g.square().sum((2, 3)) * a.square().sum((2, 3))
            else:
                squared = squared + (g @ g.transpose(2, 3) * (a @ a.transpose(2, 3))).sum((2, 3))
            if self.has_bias[name]:
                squared = squared + g.sum(2).square().sum(2)
        bound = torch.tensor([p.max_grad_norm for p in private], device=weight.device)
        factor = (bound[:, None] / (squared.sqrt() + 1e-6)).clamp(max=1.0) * weight
        summed = {k: torch.einsum("cw,cw...->c...", factor, g) for k, g in g_free.items()}
        for name, (g, a) in rows.items():
            summed[f"{name}.weight"] = torch.einsum("cwto,cwti->coi", g * factor[:, :, None, None], a)
            if self.has_bias[name]:
                summed[f"{name}.bias"] = torch.einsum("cw,cwto->co", factor, g)
        summed = {k: summed[k] for k in params}  # parameters() order: the order Opacus draws noise in
        noised = add_noise(summed, on, private)
        return noised, (losses * weight).sum(1) / weight.sum(1).clamp_min(1.0)


def add_noise(summed: Params, on: torch.Tensor, private: list[PrivateSteps]) -> Params:
    """Each stepping client's noise from its own generator, one draw per parameter tensor in
    order (as Opacus's optimizer draws it), then the division by its expected batch size."""
    for c in on.nonzero().flatten().tolist():
        std = private[c].noise_multiplier * private[c].max_grad_norm
        for g in summed.values() if std else ():
            g[c] += torch.normal(0, std, g.shape[1:], generator=private[c].noise, device=g.device, dtype=g.dtype)
    first = next(iter(summed.values()))
    scale = torch.tensor([p.expected_batch_size for p in private], device=first.device, dtype=first.dtype)
    return {k: g.div_(scale.view(-1, *[1] * (g.dim() - 1))) for k, g in summed.items()}
