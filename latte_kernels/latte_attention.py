"""The whole attention of one LaTtE-Flow generation layer (SPEC 2.6)."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from . import reference


def latte_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid_hw: Sequence[int],
    *,
    k_ctx: Tensor,
    v_ctx: Tensor,
    ctx_lens: Optional[Tensor] = None,
    q_prev: Optional[Tensor] = None,
    k_prev: Optional[Tensor] = None,
    gate: Optional[Tensor] = None,
    scale: Optional[float] = None,
    rope_theta: float = 10000.0,
) -> Tensor:
    """Image tokens attend to themselves (2D RoPE on ``grid_hw``, gated residual) and the context."""
    return reference.latte_attention(
        q, k, v, grid_hw, k_ctx=k_ctx, v_ctx=v_ctx, ctx_lens=ctx_lens, q_prev=q_prev, k_prev=k_prev,
        gate=gate, scale=scale, rope_theta=rope_theta,
    )
