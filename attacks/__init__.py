"""Attacks: each module registers one attack family in fedsim.registry.ATTACKS."""
