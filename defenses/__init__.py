"""Defenses: each module registers one defense in fedsim.registry.DEFENSES."""
