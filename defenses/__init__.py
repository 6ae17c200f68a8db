"""Defenses: each module registers one defense in fedsim.registry.DEFENSES."""

from defenses import central_dp, dp_sgd, pruning

__all__ = ["central_dp", "dp_sgd", "pruning"]
