"""Image queries attending to a cached, padded context (SPEC 2.4)."""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from . import reference


def context_attention(
    q: Tensor, k_ctx: Tensor, v_ctx: Tensor, ctx_lens: Optional[Tensor] = None, *, scale: Optional[float] = None
) -> Tuple[Tensor, Tensor]:
    """``softmax(scale q k_ctx^T) v_ctx`` over the first ``ctx_lens[b]`` keys; returns (out, lse)."""
    return reference.context_attention(q, k_ctx, v_ctx, ctx_lens, scale=scale)
