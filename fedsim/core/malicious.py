"""The malicious-server seam: an attack whose threat model lets the server craft the weights it sends.

An honest-but-curious server only watches; a malicious one (Fowl et al. 2022, "Robbing the
Fed"; Boenisch et al. 2021) also changes the global model before a round so that the clients'
updates leak more. An attack declares that threat model by also subclassing `MaliciousServer`:
the ServerApp calls `craft` on the initial global model before round 1 (the observer then
records the crafted weights as the round's `global.safetensors`, and `craft`'s own record is
written beside them, so the run shows exactly what the server sent).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor, nn


class MaliciousServer(ABC):
    """Mixin of an attack that crafts the weights the server sends (a malicious server)."""

    @abstractmethod
    def craft(self, model: nn.Module, input_shape: tuple[int, ...], public_x: Tensor) -> dict[str, Any]:
        """Change `model` (the global model about to be sent) in place and return a JSON-able
        record of what was changed and why. `public_x` is data the server holds (its test set),
        never a client's."""
