"""What a model says about single examples: the signals membership attacks score.

All are computed in eval mode without gradients, in batches, on the model's own device:

- `example_losses`: the per-example task loss (cross-entropy; squared error for regression,
  `num_classes` 0, where y is float);
- `true_class_probability`: p_y(x) = softmax(f(x))_y, RMIA's Pr(x | theta);
- `logit_confidence`: LiRA's phi = log(p_y / (1 - p_y)), computed stably from the logits as
  z_y - logsumexp_{j != y} z_j (Carlini et al. 2022, sec. 4: the logit scaling makes the
  confidence of IN and OUT models approximately Gaussian).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

BATCH = 512


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's outputs on `x`, in eval mode, batched, on CPU (mode restored afterwards)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat(
                [model(x[i : i + BATCH].to(device)).float().cpu() for i in range(0, len(x), BATCH)]
            )
    finally:
        model.train(was_training)


def example_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example loss (N,): cross-entropy for integer labels, squared error for float targets."""
    out = _outputs(model, x)
    if y.is_floating_point():
        return (out.reshape(len(y), -1).squeeze(-1) - y).pow(2)
    return F.cross_entropy(out, y, reduction="none")


def true_class_probability(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """p_y(x) (N,): the probability the model gives each example's own label."""
    return _outputs(model, x).softmax(-1).gather(1, y[:, None]).squeeze(1)


def logit_confidence(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """phi(x) = log p_y - log(1 - p_y) (N,), as z_y - logsumexp over the other classes' logits."""
    logits = _outputs(model, x).double()
    own = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf")).logsumexp(1)
    return (own - others).float()
