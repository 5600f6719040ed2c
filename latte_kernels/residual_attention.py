"""Bidirectional attention with the timestep-gated previous-layer logits (SPEC 2.5)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from torch import Tensor

from . import reference


def residual_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    q_prev: Optional[Tensor] = None,
    k_prev: Optional[Tensor] = None,
    gate: Optional[Tensor] = None,
    scale: Optional[float] = None,
    prev_scale: Optional[float] = None,
    state: Optional[Tuple[Tensor, Tensor]] = None,
    rope_grid: Optional[Sequence[int]] = None,
    rope_theta: float = 10000.0,
) -> Tuple[Tensor, Tensor]:
    """``softmax(scale q k^T + tanh(gate) prev_scale q_prev k_prev^T) v``, merged with ``state``."""
    return reference.residual_attention(
        q, k, v, q_prev=q_prev, k_prev=k_prev, gate=gate, scale=scale, prev_scale=prev_scale,
        state=state, rope_grid=rope_grid, rope_theta=rope_theta,
    )
