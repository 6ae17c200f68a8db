"""The classifier head of any fedsim model: the last linear layer, which maps features to logits.

Architecture-changing defenses replace it (an information bottleneck before the logits) and
evaluators read the features that enter it, so both need to find it in a model they did not
build. Every classical model registers its final `nn.Linear` last, so "the last `nn.Linear`
in registration order" is that layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedsim.core.errors import UserError


def classifier_head(model: nn.Module, who: str) -> tuple[str, nn.Linear]:
    """(qualified name, layer) of the model's last `nn.Linear`; `who` names the caller in errors."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(
            f"{who}: the model has no linear layer to use as its classifier head; "
            "use a model that ends in a linear layer (mlp, lenet, convnet, resnet18, resnet20)"
        )
    return linears[-1]


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` (dotted, as in `named_modules`) was."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def features_and_logits(
    model: nn.Module, head: nn.Module
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """x -> (the features entering `head`, the model's output), by a forward hook."""

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        hook = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
        try:
            logits = model(x)
        finally:
            hook.remove()
        return captured[-1].flatten(1), logits

    return run
