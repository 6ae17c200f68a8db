"""Defenses: each module registers one defense in fedsim.core.registry.DEFENSES."""

from importlib.util import find_spec

from fedsim.defenses import (
    central_dp,
    clipping,
    diff2,
    dp_sgd,
    local_dp,
    mid,
    noise,
    pruning,
    quantisation,
    secagg,
)

__all__ = [
    "central_dp",
    "clipping",
    "diff2",
    "dp_sgd",
    "local_dp",
    "mid",
    "noise",
    "pruning",
    "quantisation",
    "secagg",
]

if find_spec("pennylane") is not None:  # Opacus per-example gradients for quantum layers
    from fedsim.defenses import quantum_grad_sampler  # noqa: F401
