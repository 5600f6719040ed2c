"""The whole attention of one LaTtE-Flow generation layer (SPEC 2.6).

``latte::latte_attention`` is a registered op with a ``CompositeImplicitAutograd`` implementation:
it is, by definition, ``context_attention(rope_2d(q), k_ctx, v_ctx, ctx_lens)`` merged inside
``residual_attention(q, k, v, ..., state=that, rope_grid=grid_hw)``, composed from the parts'
registered ops so that whichever kernels they run (Triton, CUDA extension, reference) plug in here.
Autograd, fakes and ``torch.compile`` come from the parts, and so do the argument checks: each part's
op checks its tensors, the composite checks ``q`` and ``grid_hw`` (which it reads itself) first. The
public function adds only the ``ctx_lens`` value check, once per call (on CUDA it is a host sync;
the composite never does it, so a layer calling the op directly stays graph-safe).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import _validate as V
from . import residual_attention as _residual_attention  # noqa: F401  (registers latte::residual_attention)
from . import rope as _rope  # noqa: F401  (registers latte::rope_2d)
from .context_attention import run as _context_attention

_lib = torch.library.Library("latte", "FRAGMENT")
_lib.define(
    "latte_attention(Tensor q, Tensor k, Tensor v, int[] grid_hw, Tensor k_ctx, Tensor v_ctx, Tensor? ctx_lens, "
    "Tensor? q_prev, Tensor? k_prev, Tensor? gate, float? scale, float rope_theta) -> Tensor"
)


def _composite(q: Tensor, k: Tensor, v: Tensor, grid_hw: List[int], k_ctx: Tensor, v_ctx: Tensor,
               ctx_lens: Optional[Tensor], q_prev: Optional[Tensor], k_prev: Optional[Tensor],
               gate: Optional[Tensor], scale: Optional[float], rope_theta: float) -> Tensor:
    # The parts' registered ops (and context attention's entry without the ctx_lens value check), not
    # their public functions: each op checks its own tensors.
    scale, (gh, gw) = V.check_latte_attention_op(q, grid_hw, scale)  # check_scale: the default scale
    state = _context_attention(torch.ops.latte.rope_2d(q, None, gw, rope_theta, False), k_ctx, v_ctx, ctx_lens, scale)
    out, _ = torch.ops.latte.residual_attention(q, k, v, q_prev, k_prev, gate, state[0], state[1], scale, scale,
                                                [gh, gw], rope_theta)
    return out


_lib.impl("latte_attention", _composite, "CompositeImplicitAutograd")


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
    """Image tokens attend to themselves (2D RoPE on ``grid_hw``, gated residual) and the context.

    ``q, k, v, q_prev, k_prev`` are un-rotated projections; ``k_ctx`` is already rotated (M-RoPE).
    """
    scale, grid, rope_theta = V.latte_attention_args(q, grid_hw, k_ctx, ctx_lens, scale, rope_theta)
    return torch.ops.latte.latte_attention(q, k, v, list(grid), k_ctx, v_ctx, ctx_lens, q_prev, k_prev, gate,
                                           scale, rope_theta)
