"""One scenario seed derives every other seed.

`derive_seed(seed, "train", round, client)` gives an independent, reproducible 63-bit seed for
each purpose, so adding a new consumer of randomness never shifts the others.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A stable seed for (seed, *keys), independent of Python's hash randomisation."""
    text = "/".join([str(seed), *map(str, keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def torch_generator(seed: int, *keys: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def numpy_rng(seed: int, *keys: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))


@contextmanager
def numpy_global_seed(seed: int, *keys: object) -> Iterator[None]:
    """Seed numpy's global generator for a block, then restore its previous state.

    For library code that draws from `np.random` directly (Flower's DP mods and wrappers).
    """
    previous = np.random.get_state()
    np.random.seed(derive_seed(seed, *keys) % 2**32)
    try:
        yield
    finally:
        np.random.set_state(previous)
