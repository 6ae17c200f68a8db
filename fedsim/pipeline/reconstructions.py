"""Reconstructions on disk: each attacked target's images and labels as safetensors, beside
its PNG and JSON (`attacks/<attack>/<target>.safetensors`), so they load back as tensors
(`fedsim.Run.reconstructions`) without pickle and without re-running the attack."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save

from fedsim.core.attack import Reconstruction
from fedsim.core.results import atomic_write_bytes

SUFFIX = ".safetensors"


def save_reconstruction(recon: Reconstruction, path: Path) -> None:
    """Write `recon`'s images and labels to `path` atomically (its loss in the header)."""
    tensors = {
        "images": recon.images.detach().cpu().contiguous(),
        "labels": recon.labels.detach().cpu().contiguous(),
    }
    atomic_write_bytes(path, save(tensors, metadata={"attack_loss": json.dumps(recon.attack_loss)}))


def load_reconstruction(path: Path) -> Reconstruction:
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        loss = json.loads((handle.metadata() or {}).get("attack_loss", "null"))
    return Reconstruction(tensors["images"], tensors["labels"], loss)
