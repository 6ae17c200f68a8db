"""Quantisation of the update: what the server receives is the dequantised update.

Each method comes with the error bound the tests check, per floating-point tensor u:

- `fp16`: round to IEEE half precision (values beyond +-65504, the fp16 range, saturate there).
  |e_i| <= max(2^-11 |u_i|, 2^-25): unit roundoff 2^-11 for normal numbers, half the
  subnormal spacing 2^-24 below 2^-14.
- `int8`: per-tensor affine, 256 levels spanning [min u, max u]:
  q_i = round((u_i - min) / s) in {0..255}, s = (max - min) / 255, sent as bytes plus (min, s);
  |e_i| <= s / 2.
- `sign`: scaled sign compression, as in EF-signSGD (Karimireddy et al. 2019):
  u -> (||u||_1 / d) sign(u), one bit per entry plus one scale; it keeps the L1 norm and
  ||e||^2 <= ||u||^2 - ||u||_1^2 / d (equality when no entry is zero).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedsim.core.defense import UpdateTimeDefense
from fedsim.core.registry import DEFENSES

FP16_MAX = torch.finfo(torch.float16).max
INT8_LEVELS = 255


def fp16(u: torch.Tensor) -> torch.Tensor:
    return u.clamp(-FP16_MAX, FP16_MAX).half().to(u.dtype)


def int8_affine(u: torch.Tensor) -> torch.Tensor:
    low, high = u.min(), u.max()
    step = (high - low) / INT8_LEVELS
    if step == 0:  # a constant tensor is exact as its offset
        return u.clone()
    codes = torch.round((u - low) / step).to(torch.uint8)
    return low + codes.to(u.dtype) * step


def scaled_sign(u: torch.Tensor) -> torch.Tensor:
    return u.abs().mean() * torch.sign(u)


QUANTISERS = {"fp16": fp16, "int8": int8_affine, "sign": scaled_sign}


@DEFENSES.register("quantize")
class Quantize(UpdateTimeDefense):
    """Quantise every tensor of the update (fp16, int8 per-tensor affine, or scaled sign)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        method: Literal["fp16", "int8", "sign"] = Field(
            "int8", description="fp16 rounding, int8 per-tensor affine, or scaled sign (1 bit)"
        )

    params: Params

    def transform(
        self, update: dict[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        quantise = QUANTISERS[self.params.method]
        return {
            name: quantise(t) if t.is_floating_point() and t.numel() else t
            for name, t in update.items()
        }
