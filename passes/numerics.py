"""Numerics shared by the rules: where sums of squares are accumulated. A leaf module."""
from __future__ import annotations

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """t in float32 when it is float16 or bfloat16 (squared norms overflow or lose digits there),
    else t as it is (float32 and float64 stay)."""
    return t.float() if t.dtype in LOW_PRECISION else t
