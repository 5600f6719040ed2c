"""Plain-PyTorch references of every op (SPEC section 2): the ground truth for tests and the
``backend="reference"`` path of the model.

They run on any device, accumulate in float32 (float64 for float64 inputs, so ``gradcheck`` works),
return outputs in the query's dtype and LSEs in float32 (float64 for float64 inputs), and validate
their arguments exactly as the kernels do. Attention here materialises the (Nq x Nk) logits: it is
meant to be obviously right, not fast.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _validate as V

__all__ = [
    "rope_2d",
    "mrope",
    "merge_attention_states",
    "context_attention",
    "residual_attention",
    "latte_attention",
    "rope_2d_inv_freq",
    "mrope_inv_freq",
    "grid_positions",
]


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# RoPE


def rope_2d_inv_freq(head_dim: int, theta: float, device=None) -> Tensor:
    """``theta ** (-4 i / D)`` for ``i < D/4``, float32, computed as transformers' vision tower does."""
    half = head_dim // 2
    return 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=device) / half))


def mrope_inv_freq(head_dim: int, theta: float, device=None) -> Tensor:
    """``theta ** (-2 j / D)`` for ``j < D/2``, float32, computed as transformers' text rotary does."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def grid_positions(grid_hw: Tuple[int, int], batch: int, device=None) -> Tensor:
    """(2, B, gh*gw) int64 rows and columns of a row-major ``gh x gw`` grid."""
    gh, gw = grid_hw
    n = torch.arange(gh * gw, device=device)
    return torch.stack([n // gw, n % gw]).unsqueeze(1).expand(2, batch, gh * gw)


def _rotate(x: Tensor, angle: Tensor) -> Tensor:
    """Rotates pairs ``(j, j + D/2)`` of ``x`` (B, N, H, D) by ``angle`` (B, N, D/2), float32 angles."""
    acc = _acc_dtype(x)
    cos = angle.cos().to(acc).unsqueeze(2)
    sin = angle.sin().to(acc).unsqueeze(2)
    x1, x2 = x.to(acc).chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


def _rope_2d(x: Tensor, grid: Optional[Tuple[int, int]], theta: float, positions: Optional[Tensor]) -> Tensor:
    b, n, _, d = x.shape
    if positions is None:
        positions = grid_positions(grid, b, x.device)
    inv_freq = rope_2d_inv_freq(d, theta, x.device)  # (D/4,)
    pos = positions.to(torch.float32)
    angle = torch.cat([pos[0, ..., None] * inv_freq, pos[1, ..., None] * inv_freq], dim=-1)  # (B, N, D/2)
    return _rotate(x, angle)


def rope_2d(x: Tensor, grid_hw: Sequence[int], *, theta: float = 10000.0, positions: Optional[Tensor] = None) -> Tensor:
    """2D axial RoPE of image tokens on a ``gh x gw`` grid (SPEC 2.1)."""
    theta, grid = V.check_rope_2d(x, grid_hw, theta, positions)
    return _rope_2d(x, grid, theta, positions)


def mrope(x: Tensor, positions: Tensor, *, mrope_section: Sequence[int] = (16, 24, 24), theta: float = 1000000.0) -> Tensor:
    """Qwen2-VL multimodal 3D RoPE of context tokens (SPEC 2.2)."""
    section, theta = V.check_mrope(x, positions, mrope_section, theta)
    return _mrope(x, positions, section, theta)


def _mrope(x: Tensor, positions: Tensor, section: Sequence[int], theta: float) -> Tensor:
    d = x.shape[-1]
    inv_freq = mrope_inv_freq(d, theta, x.device)  # (D/2,)
    axis = torch.repeat_interleave(torch.arange(3, device=x.device), torch.tensor(section, device=x.device))
    pos = positions.to(torch.float32)  # (3, B, N)
    angle = pos[axis].permute(1, 2, 0) * inv_freq  # (B, N, D/2)
    return _rotate(x, angle)


# --------------------------------------------------------------------------------------------------
# Attention


def zero_empty_rows(out: Tensor, lse: Tensor, acc: torch.dtype) -> Tensor:
    """``out`` (B, N, H, D) in ``acc`` with the rows of an empty side (``lse = -inf``) zeroed: such a
    side contributes nothing, whatever its output holds (NaN included), and gets zero gradient."""
    return out.to(acc).masked_fill(torch.isneginf(lse).transpose(1, 2).unsqueeze(-1), 0)


def _merge(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor, out_dtype=None) -> Tuple[Tensor, Tensor]:
    acc = torch.float64 if torch.float64 in (out_a.dtype, out_b.dtype, lse_a.dtype) else torch.float32
    out_dtype = out_dtype or out_a.dtype
    out_a, out_b = zero_empty_rows(out_a, lse_a, acc), zero_empty_rows(out_b, lse_b, acc)
    lse_a, lse_b = lse_a.to(acc), lse_b.to(acc)
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # both sides empty: weights 0, not NaN
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = w_a + w_b
    empty = total == 0
    denom = torch.where(empty, torch.ones_like(total), total)
    # both sides empty: lse -inf without a log(0) on the autograd path (its gradient would be NaN)
    lse = torch.where(empty, torch.full_like(m, float("-inf")), m + torch.log(denom))
    w_a = (w_a / denom).transpose(1, 2).unsqueeze(-1)  # (B, N, H, 1)
    w_b = (w_b / denom).transpose(1, 2).unsqueeze(-1)
    out = w_a * out_a + w_b * out_b
    lse_dtype = torch.float64 if acc == torch.float64 else torch.float32
    return out.to(out_dtype), lse.to(lse_dtype)


def merge_attention_states(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """One softmax over the union of two disjoint key sets (SPEC 2.3)."""
    V.check_merge(out_a, lse_a, out_b, lse_b)
    return _merge(out_a, lse_a, out_b, lse_b)


def _expand_kv(t: Tensor, hq: int) -> Tensor:
    """(B, N, Hkv, D) -> (B, Hq, N, D): query head h reads kv head h // (Hq // Hkv)."""
    return t.transpose(1, 2).repeat_interleave(hq // t.shape[2], dim=1)


def _logits(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """scale * q k^T as (B, Hq, Nq, Nk) in the accumulation dtype."""
    acc = _acc_dtype(q)
    return scale * torch.matmul(q.transpose(1, 2).to(acc), _expand_kv(k, q.shape[2]).to(acc).transpose(-1, -2))


def _softmax_attend(logits: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """Softmax over the last axis (masked keys hold -inf) and the weighted sum of ``v``, both left in
    the accumulation dtype: out (B, Nq, H, D), lse (B, H, Nq)."""
    lse = torch.logsumexp(logits, dim=-1)  # (B, H, Nq); -inf for a row with no key
    finite = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(logits - finite.unsqueeze(-1))
    out = torch.matmul(p, _expand_kv(v, logits.shape[1]).to(p.dtype))  # (B, H, Nq, D)
    return out.transpose(1, 2), lse


def _context_attention(q, k_ctx, v_ctx, ctx_lens, scale) -> Tuple[Tensor, Tensor]:
    valid = None
    if ctx_lens is not None:
        valid = torch.arange(k_ctx.shape[1], device=q.device) < ctx_lens.to(q.device)[:, None]  # (B, Nc)
        # padded slots do not exist: garbage there (even NaN) must reach neither the output nor the
        # gradients (dq = dlogits @ k_ctx would turn 0 * NaN from a padded key into NaN)
        k_ctx = k_ctx.masked_fill(~valid[:, :, None, None], 0)
        v_ctx = v_ctx.masked_fill(~valid[:, :, None, None], 0)
    logits = _logits(q, k_ctx, scale)
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    out, lse = _softmax_attend(logits, v_ctx)
    return out.to(q.dtype), lse


def context_attention(
    q: Tensor, k_ctx: Tensor, v_ctx: Tensor, ctx_lens: Optional[Tensor] = None, *, scale: Optional[float] = None
) -> Tuple[Tensor, Tensor]:
    """Image queries attending to a padded cached context (SPEC 2.4)."""
    scale = V.check_context_attention(q, k_ctx, v_ctx, ctx_lens, scale)
    return _context_attention(q, k_ctx, v_ctx, ctx_lens, scale)


def _residual_attention(q, k, v, q_prev, k_prev, gate, scale, prev_scale, state, rope_grid, rope_theta):
    if rope_grid is not None:
        q, k = _rope_2d(q, rope_grid, rope_theta, None), _rope_2d(k, rope_grid, rope_theta, None)
        if q_prev is not None:
            q_prev = _rope_2d(q_prev, rope_grid, rope_theta, None)
            k_prev = _rope_2d(k_prev, rope_grid, rope_theta, None)
    logits = _logits(q, k, scale)
    if q_prev is not None:
        g = torch.tanh(gate.to(logits.dtype))[:, :, None, None]
        logits = logits + g * _logits(q_prev, k_prev, prev_scale)
    out, lse = _softmax_attend(logits, v)
    if state is not None:
        return _merge(state[0], state[1], out, lse, out_dtype=q.dtype)
    return out.to(q.dtype), lse


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
    """Bidirectional attention with the tanh-gated previous-layer logits (SPEC 2.5)."""
    scale, prev_scale, state, rope_grid, rope_theta = V.check_residual_attention(
        q, k, v, q_prev, k_prev, gate, scale, prev_scale, state, rope_grid, rope_theta
    )
    return _residual_attention(q, k, v, q_prev, k_prev, gate, scale, prev_scale, state, rope_grid, rope_theta)


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
    """The whole attention of one generation layer (SPEC 2.6), by its definition."""
    scale, grid, rope_theta = V.check_latte_attention(
        q, k, v, grid_hw, k_ctx, v_ctx, ctx_lens, q_prev, k_prev, gate, scale, rope_theta
    )
    state = _context_attention(_rope_2d(q, grid, rope_theta, None), k_ctx, v_ctx, ctx_lens, scale)
    out, _ = _residual_attention(q, k, v, q_prev, k_prev, gate, scale, scale, state, grid, rope_theta)
    return out
