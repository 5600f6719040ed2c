"""2D axial RoPE (SPEC 2.1) and Qwen2-VL M-RoPE (SPEC 2.2)."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from . import reference


def rope_2d(x: Tensor, grid_hw: Sequence[int], *, theta: float = 10000.0, positions: Optional[Tensor] = None) -> Tensor:
    """Rotates ``x`` (B, N, H, D) by 2D axial RoPE: token n sits at (n // gw, n % gw) of ``grid_hw``."""
    return reference.rope_2d(x, grid_hw, theta=theta, positions=positions)


def mrope(x: Tensor, positions: Tensor, *, mrope_section: Sequence[int] = (16, 24, 24), theta: float = 1000000.0) -> Tensor:
    """Rotates ``x`` (B, N, H, D) by Qwen2-VL's 3D M-RoPE at ``positions`` (3, B, N)."""
    return reference.mrope(x, positions, mrope_section=mrope_section, theta=theta)
