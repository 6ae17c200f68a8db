"""One scenario seed derives every other seed; no message reveals it.

`derive_seed(seed, "train", round, client)` gives an independent, reproducible 63-bit seed for
each purpose, so adding a new consumer of randomness never shifts the others. It is SHA-256
based, hence one-way: a derived seed reveals nothing of the seed it came from.

The server is the attacker, so the scenario seed is split in two:

- the **public seed**, `public_seed(seed)`, is the only seed the federation sees: the server
  runs on `Scenario.public()` and every train message carries that scenario. Everything both
  sides must agree on, and the server may know, derives from it: data partitions, the initial
  model, cohorts, server-side noise.
- each node's **secret**, in its node config under `fedsim-secret` (`SECRET_KEY`), roots every
  client-side draw (Poisson batches, hence DP-SGD noise; update-defense noise; Flower mods'
  noise; DIFF2/DP-GD noise; SecAgg+ rounding), with purpose and round as further keys. The
  simulation engines set it to `client_secret(seed, partition id)`, so runs repeat; under
  `flwr run` the operator may set it per node (`--node-config "fedsim-secret=<int>"`), and
  otherwise the node draws one from OS entropy (`secrets`) and keeps it in its `Context.state`.

No message carries the scenario seed or a secret, and the hash cannot be inverted, so the
server cannot replay a client's noise or batch sample -- provided it cannot guess the scenario
seed either: a small seed (`seed: 3`) is found by trying seeds until the public seed (or the
initial model) matches. Runs whose privacy matters against such an attacker set
`simulation.secret_seed` (the secrets' root instead of the seed; `Scenario.public()` drops
it, so no message carries it) or take an unguessable seed, e.g.
`python -c "import secrets; print(secrets.randbits(63))"`.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # Flower only where a node's context is at hand: the scenario needs seeds alone
    from flwr.app import Context

SECRET_KEY = "fedsim-secret"
_DRAWN_SECRET = "fedsim.secret"  # Context.state record of a secret drawn from OS entropy


def derive_seed(seed: int, *keys: object) -> int:
    """A stable seed for (seed, *keys), independent of Python's hash randomisation."""
    text = "/".join([str(seed), *map(str, keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def public_seed(seed: int) -> int:
    """The seed the federation (server and messages) sees in place of the scenario seed.

    32 bits, the range every seeded library accepts (scikit-learn's `random_state`).
    """
    return derive_seed(seed, "public") % 2**32


def client_secret(seed: int, partition_id: int) -> int:
    """A simulated node's secret: reproducible from the scenario seed, never sent."""
    return derive_seed(seed, "client-secret", partition_id)


def node_secret(context: Context) -> int:
    """This node's secret: `fedsim-secret` from its node config, else one drawn once from OS
    entropy and kept in the node's state (under `flwr run` without that key)."""
    from flwr.app import ConfigRecord

    if SECRET_KEY in context.node_config:
        return int(context.node_config[SECRET_KEY])
    if _DRAWN_SECRET not in context.state:
        context.state[_DRAWN_SECRET] = ConfigRecord({"secret": secrets.randbits(63)})
    return int(context.state[_DRAWN_SECRET]["secret"])


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
