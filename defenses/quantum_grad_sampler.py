"""Per-example gradients of a quantum layer for Opacus, so DP-SGD on `vqc`/`hybrid` is correct.

Opacus 1.6 has no rule for PennyLane circuits and silently returns zero per-example
gradients for a `TorchLayer` (shared/PAPERS.md). fedsim's `QuantumLayer` gets its own rule.
For a batch x_1..x_B, Opacus hands over the layer's inputs and the gradients of the loss
with respect to the layer's outputs, b_i = dL/dy_i. The per-example gradient is

    g_i = (d y(x_i, w) / d w)^T b_i.

Giving every example its own copy w_i of the weights, y_i = y(x_i, w_i) depends on w_i only,
so d/dw_i of sum_i <b_i, y(x_i, w_i)> is exactly g_i: one broadcast circuit call (PennyLane
parameter broadcasting) and one backward pass give all B per-example gradients.

With finite shots the per-example gradients are random and cannot be checked against the
batch gradient, so DP-SGD refuses such a model (dp_sgd's check would otherwise flag it with a
less precise message).
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler

from fedsim.core.errors import UserError
from fedsim.models.quantum import QuantumLayer


@register_grad_sampler(QuantumLayer)
def quantum_layer_grad_sample(
    layer: QuantumLayer, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """g_i = J(x_i)^T b_i for every example, through per-example copies of the weights."""
    if layer.circuit.params.shots is not None:
        raise UserError(
            "dp_sgd: per-example gradients of a circuit with finite shots are random and "
            "cannot be verified; set model.shots: null (exact simulation) for DP-SGD"
        )
    inputs = activations[0]
    per_example = layer.weights.detach().expand(len(inputs), *layer.weights.shape).clone()
    per_example.requires_grad_(True)
    with torch.enable_grad():
        outputs = layer.circuit(inputs.detach(), per_example)  # the circuit, not the hooked module
        (grads,) = torch.autograd.grad(
            outputs, per_example, grad_outputs=backprops.to(outputs.dtype)
        )
    return {layer.weights: grads.to(layer.weights.dtype)}
