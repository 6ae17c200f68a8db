"""Labels from the last layer's gradient, inferred before any image is reconstructed.

For cross-entropy, a last linear layer z = W h + b has, averaged over a batch of B examples
with predictions p = softmax(z),

    dL/db_k = mean_b (p_bk - [y_b = k]),        dL/dW_k = mean_b (p_bk - [y_b = k]) h_b.

- One image: **iDLG** (Zhao et al. 2020). With h >= 0 (after a ReLU or a sigmoid) only the
  true class has a negative factor, so y = argmin_k sum_j dL/dW_kj; always right then.
- A batch: **mean-softmax label counts**. dL/db_k = pbar_k - n_k / B, so the number of
  examples of class k is n_k = B (pbar_k - dL/db_k). The attacker does not know pbar, the
  model's mean prediction on the client's data; it estimates it by the mean prediction on
  random images (the white-box impact estimate of LLG, Wainakh et al. 2022, applied to the
  bias as in Geng et al. 2021, "Towards general deep leakage in federated learning"), then
  rounds the counts to B labels by largest remainders. Measured on untrained sigmoid LeNet
  and ConvNet, 40 random batches of real digits each: 100% of labels at B = 2, 4, 8, 16, where
  LLG's simple rule (weight rows, no pbar) falls from 99-100% at B = 2 to 69-72% at B = 16
  (`python benchmarks/ig_table.py`, docs/gradient_inversion.md).

**Unknown scale** (`label_scale: estimated`). The counts need the gradient's true scale, but a
client that clips its update (norm clipping, DP's clipping of the whole update) sends
c * dL/db with an unknown c <= 1. Classes absent from the batch have dL/db_k = pbar_k, so
their ratio r_k = (c dL/db_k) / pbar_k is c itself, while present classes have
r_k = c (1 - n_k / (B pbar_k)) < c. With fewer present classes than absent ones, the median
of the positive ratios is c; the counts are then taken from the rescaled gradient.
`python benchmarks/label_scale.py runs/sweeps/gifd_vs_ig` (3 seeds x 3 clients, B = 4 and 8):
on clipped updates label accuracy 0.42-0.50 at the update's scale, 1.00 estimated; on clean
ones 1.00 both ways; under noise at B = 8 the estimate loses 2 labels of 72, under top-k
pruning 0.29-0.67 against 0.33-0.67 (pruning does not scale the bias gradient, it zeroes
parts of it). Hence an option, not the default.

After several local steps on n distinct examples, the mean step gradient plays the role of
the gradient and n_k = n (pbar_k - mean_t dL/db_k^(t)) still holds when every example is seen
equally often and pbar changes little; the counts are then an estimate, not an identity.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor

from fedsim.core.attack import GradientTarget
from fedsim.core.errors import UserError

PREDICTION_SAMPLES = 256
"""Random images used to estimate the model's mean prediction pbar."""


def last_layer(target: GradientTarget) -> tuple[int, int | None]:
    """Indices (in parameter order) of the classifier's weight (one row per class) and bias.

    The classifier is the last 2-D parameter with `num_classes` rows; its bias is the 1-D
    parameter of the same module, if any.
    """
    names = [name for name, _ in target.model.named_parameters()]
    shapes = [p.shape for _, p in target.model.named_parameters()]
    weights = [i for i, shape in enumerate(shapes) if len(shape) == 2]
    if not weights or shapes[weights[-1]][0] != target.num_classes:
        raise UserError(
            "cannot infer labels: the model does not end in a linear layer with one row per "
            "class; set labels: known (the stronger threat model) or use 'dlg'"
        )
    weight = weights[-1]
    bias_name = names[weight].removesuffix("weight") + "bias"
    return weight, names.index(bias_name) if bias_name in names else None


def idlg_label(weight_gradient: Tensor) -> Tensor:
    """iDLG: the class whose row of dL/dW has the most negative sum, as a (1,) tensor."""
    return weight_gradient.sum(dim=1).argmin().reshape(1).cpu()


@torch.no_grad()
def mean_prediction(target: GradientTarget, generator: torch.Generator) -> Tensor:
    """pbar: the model's mean softmax over `PREDICTION_SAMPLES` random images in [0, 1].

    Runs a copy in training mode (as the client did), so the target's model is untouched.
    """
    model = copy.deepcopy(target.model).train()
    device = next(model.parameters()).device
    noise = torch.rand((PREDICTION_SAMPLES, *target.input_shape), generator=generator)
    return model(noise.to(device)).softmax(-1).mean(0).cpu()


def estimated_scale(bias_gradient: Tensor, mean_softmax: Tensor) -> float:
    """c in (c * dL/db): the median of (c dL/db_k) / pbar_k over the classes where it is
    positive (the absent classes give exactly c); 1 if none is."""
    ratios = bias_gradient / mean_softmax
    positive = ratios[ratios > 0]
    return float(positive.median()) if len(positive) else 1.0


def labels_from_counts(counts: Tensor, total: int) -> Tensor:
    """`total` sorted labels whose class counts follow `counts` (floats, clipped at 0), by
    largest-remainder rounding: floor every count, then give the leftover labels to the
    largest fractional parts."""
    counts = counts.clamp(min=0)
    counts = counts * total / counts.sum() if counts.sum() > 0 else torch.full_like(counts, total / len(counts))
    whole = counts.floor()
    leftover = total - int(whole.sum())
    whole[(counts - whole).argsort(descending=True)[:leftover]] += 1
    return torch.repeat_interleave(torch.arange(len(counts)), whole.long())


def infer_labels(
    target: GradientTarget,
    gradient: list[Tensor],
    count: int,
    generator: torch.Generator,
    attack: str,
    scale: Literal["update", "estimated"] = "update",
) -> tuple[Tensor, str]:
    """`count` labels for the images of `target` and the method's name.

    `gradient` is the mean step gradient in parameter order. One image: iDLG; more: the
    mean-softmax label counts, at the update's scale or at an estimated one (`scale`). A
    one-line UserError names the fix when the model gives no way.
    """
    try:
        weight, bias = last_layer(target)
    except UserError as err:
        raise UserError(f"attack '{attack}': {err}") from None
    if count == 1:
        return idlg_label(gradient[weight].cpu()), "idlg"
    if bias is None:
        raise UserError(
            f"attack '{attack}': counting the labels of {count} images needs a bias in the last "
            "layer; set labels: known (the stronger threat model) or images: 1"
        )
    mean_softmax, bias_gradient = mean_prediction(target, generator), gradient[bias].cpu()
    if scale == "estimated":
        bias_gradient = bias_gradient / estimated_scale(bias_gradient, mean_softmax)
    counts = count * (mean_softmax - bias_gradient)
    method = "mean-softmax-counts" + (" (scale estimated)" if scale == "estimated" else "")
    return labels_from_counts(counts, count), method
