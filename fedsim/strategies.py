"""Flower strategies by name."""
