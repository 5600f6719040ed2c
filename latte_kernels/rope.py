"""2D axial RoPE (SPEC 2.1) and Qwen2-VL M-RoPE (SPEC 2.2): one Triton kernel behind four ops.

Both RoPEs rotate the pairs ``(j, j + D/2)`` of every head by ``angle_j = pos[axis(j)] * inv_freq[j mod F]``:

- ``rope_2d``: ``axis(j)`` is 0 (row) for ``j < D/4`` and 1 (column) after; ``F = D/4``. Positions come
  from a ``(2, B, N)`` int tensor, or from the grid inside the kernel: row ``n // gw``, column ``n % gw``.
- ``mrope``: ``axis(j)`` is the index of the ``mrope_section`` part holding ``j``; ``F = D/2``; positions
  come from a ``(3, B, N)`` int tensor.

The ``inv_freq`` table is computed by the reference helpers (the same float32 ``pow`` transformers
uses) on the input's device and passed to the kernel; angles, cos and sin are float32, so the output
equals the reference to float32 rounding. The inverse rotation (rotation by ``-angle``, which is also
the backward) is the same kernel with the sine negated.

Registered ops (namespace ``latte``):

- ``rope_2d(x, positions?, gw, theta, inverse) -> Tensor`` and ``mrope(x, positions, mrope_section,
  theta, inverse) -> Tensor``: functional, differentiable (the backward is the same op with
  ``inverse`` flipped), output contiguous ``(B, N, H, D)`` in ``x``'s dtype.
- ``rope_2d_(x!, positions?, gw, theta)`` and ``mrope_(x!, ...)``: rotate ``x`` in place (the public
  functions' ``inplace=True``); not differentiable.

Every op checks its own arguments (``_validate``: shapes, dtypes, devices; ``gw`` must divide N when
positions come from the grid; an in-place ``x`` must not overlap itself). Inputs may have any strides
(the kernel reads through them; nothing is copied). Every op runs the Triton kernel when
``_backend.triton_runs(x)`` (on x's device, under its device guard) and the reference math otherwise
(float64, CPU without the interpreter, CPU bfloat16). No op reads device values on the host, so all
are CUDA-graph safe.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import _backend, reference
from . import _validate as V
from ._backend import HAS_TRITON, triton_runs

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_kernel(
        X, OUT, POS, INV_FREQ,
        N, H, GW, BOUND1, BOUND2, FREQ_MOD,
        sxb, sxn, sxh, sxd,
        sob, son, soh, sod,
        spa, spb, spn,
        SIN_SIGN: tl.constexpr,  # 1.0 rotates by +angle, -1.0 by -angle (the inverse)
        FROM_GRID: tl.constexpr,  # positions from (n // GW, n % GW) instead of POS
        NUM_AXES: tl.constexpr,  # 2 (rope_2d) or 3 (mrope) rows in POS
        HALF: tl.constexpr,
        HALF_P: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEADS_PER_PROG: tl.constexpr,
    ):
        # One program: BLOCK_N tokens of one batch row, HEADS_PER_PROG heads; cos/sin computed once
        # per token and frequency and reused for every head.
        b = tl.program_id(1).to(tl.int64)
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        j = tl.arange(0, HALF_P)
        n_ok = n < N
        j_ok = j < HALF

        if FROM_GRID:
            p0 = (n // GW).to(tl.float32)
            p1 = (n % GW).to(tl.float32)
            p2 = p1
        else:
            pos = POS + b * spb + n.to(tl.int64) * spn
            p0 = tl.load(pos, mask=n_ok, other=0).to(tl.float32)
            p1 = tl.load(pos + spa, mask=n_ok, other=0).to(tl.float32)
            if NUM_AXES == 3:
                p2 = tl.load(pos + 2 * spa, mask=n_ok, other=0).to(tl.float32)
            else:
                p2 = p1
        axis = (j >= BOUND1).to(tl.int32) + (j >= BOUND2).to(tl.int32)
        p = tl.where(axis[None, :] == 0, p0[:, None], tl.where(axis[None, :] == 1, p1[:, None], p2[:, None]))
        inv_freq = tl.load(INV_FREQ + j % FREQ_MOD, mask=j_ok, other=0.0)
        angle = p * inv_freq[None, :]
        cos = tl.cos(angle)
        sin = tl.sin(angle) * SIN_SIGN

        mask_nj = n_ok[:, None] & j_ok[None, :]
        x_tok = X + b * sxb + n.to(tl.int64)[:, None] * sxn + j[None, :] * sxd
        o_tok = OUT + b * sob + n.to(tl.int64)[:, None] * son + j[None, :] * sod
        h0 = tl.program_id(2) * HEADS_PER_PROG
        for hh in range(HEADS_PER_PROG):
            h = (h0 + hh).to(tl.int64)
            mask = mask_nj & (tl.zeros_like(j)[None, :] + h < H)
            # both halves are loaded before either is stored, so OUT may alias X (in place)
            x1 = tl.load(x_tok + h * sxh, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_tok + h * sxh + HALF * sxd, mask=mask, other=0.0).to(tl.float32)
            y1 = x1 * cos - x2 * sin
            y2 = x2 * cos + x1 * sin
            tl.store(o_tok + h * soh, y1.to(OUT.dtype.element_ty), mask=mask)
            tl.store(o_tok + h * soh + HALF * sod, y2.to(OUT.dtype.element_ty), mask=mask)


def _launch(out: Tensor, x: Tensor, positions: Optional[Tensor], inv_freq: Tensor, *, gw: int, bound1: int,
            bound2: int, freq_mod: int, num_axes: int, inverse: bool) -> None:
    """Writes the rotation of ``x`` into ``out`` (same shape; may be ``x`` itself)."""
    b, n, h, d = x.shape
    half = d // 2
    half_p = triton.next_power_of_2(half)
    block_n = max(1, min(triton.next_power_of_2(n), 2048 // half_p))  # ~2K elements per head tile
    heads_per_prog = min(h, 4)
    grid = (triton.cdiv(n, block_n), b, triton.cdiv(h, heads_per_prog))
    from_grid = positions is None
    pos = inv_freq if from_grid else positions  # never read when from_grid
    ps = (0, 0, 0) if from_grid else positions.stride()
    with _backend.device_guard(x):
        _rope_kernel[grid](
            x, out, pos, inv_freq,
            n, h, max(gw, 1), bound1, bound2, freq_mod,
            *x.stride(), *out.stride(), *ps,
            SIN_SIGN=-1.0 if inverse else 1.0,
            FROM_GRID=from_grid,
            NUM_AXES=num_axes,
            HALF=half,
            HALF_P=half_p,
            BLOCK_N=block_n,
            HEADS_PER_PROG=heads_per_prog,
            num_warps=4,
        )


# --------------------------------------------------------------------------------------------------
# The rotation into a given buffer: the Triton kernel, or the reference at (possibly negated) positions


def _rope_2d_into(out: Tensor, x: Tensor, positions: Optional[Tensor], gw: int, theta: float, inverse: bool) -> None:
    b, n, _, d = x.shape
    if triton_runs(x):
        inv_freq = reference.rope_2d_inv_freq(d, theta, x.device)
        q = d // 4
        _launch(out, x, positions, inv_freq, gw=gw, bound1=q, bound2=d // 2, freq_mod=q, num_axes=2, inverse=inverse)
        return
    if positions is None:
        positions = reference.grid_positions((n // gw, gw), b, x.device)
    # rotating by -angle is rotating at -positions: (-p) * f == -(p * f) exactly in floating point
    out.copy_(reference._rope_2d(x, None, theta, -positions if inverse else positions))


def _mrope_into(out: Tensor, x: Tensor, positions: Tensor, section: Sequence[int], theta: float, inverse: bool) -> None:
    d = x.shape[-1]
    if triton_runs(x):
        inv_freq = reference.mrope_inv_freq(d, theta, x.device)
        s0, s1 = section[0], section[0] + section[1]
        _launch(out, x, positions, inv_freq, gw=0, bound1=s0, bound2=s1, freq_mod=d // 2, num_axes=3, inverse=inverse)
        return
    out.copy_(reference._mrope(x, -positions if inverse else positions, tuple(section), theta))


# --------------------------------------------------------------------------------------------------
# Registered ops


@torch.library.custom_op("latte::rope_2d", mutates_args=())
def _rope_2d_op(x: Tensor, positions: Optional[Tensor], gw: int, theta: float, inverse: bool) -> Tensor:
    V.check_rope_2d_op(x, positions, gw, theta)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _rope_2d_into(out, x, positions, gw, theta, inverse)
    return out


@_rope_2d_op.register_fake
def _(x, positions, gw, theta, inverse):
    V.check_rope_2d_op(x, positions, gw, theta)
    return x.new_empty(x.shape)


def _rope_2d_setup_context(ctx, inputs, output):
    _, positions, gw, theta, inverse = inputs
    ctx.save_for_backward(positions)
    ctx.gw, ctx.theta, ctx.inverse = gw, theta, inverse


def _rope_2d_backward(ctx, grad):
    (positions,) = ctx.saved_tensors
    return torch.ops.latte.rope_2d(grad, positions, ctx.gw, ctx.theta, not ctx.inverse), None, None, None, None


_rope_2d_op.register_autograd(_rope_2d_backward, setup_context=_rope_2d_setup_context)


@torch.library.custom_op("latte::rope_2d_", mutates_args=("x",))
def _rope_2d_inplace_op(x: Tensor, positions: Optional[Tensor], gw: int, theta: float) -> None:
    V.check_rope_2d_op(x, positions, gw, theta)
    V.check_no_overlap(x)
    _rope_2d_into(x, x, positions, gw, theta, False)


@_rope_2d_inplace_op.register_fake
def _(x, positions, gw, theta):
    V.check_rope_2d_op(x, positions, gw, theta)
    V.check_no_overlap(x)
    return None


@torch.library.custom_op("latte::mrope", mutates_args=())
def _mrope_op(x: Tensor, positions: Tensor, mrope_section: List[int], theta: float, inverse: bool) -> Tensor:
    V.check_mrope(x, positions, mrope_section, theta)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _mrope_into(out, x, positions, mrope_section, theta, inverse)
    return out


@_mrope_op.register_fake
def _(x, positions, mrope_section, theta, inverse):
    V.check_mrope(x, positions, mrope_section, theta)
    return x.new_empty(x.shape)


def _mrope_setup_context(ctx, inputs, output):
    _, positions, section, theta, inverse = inputs
    ctx.save_for_backward(positions)
    ctx.section, ctx.theta, ctx.inverse = list(section), theta, inverse


def _mrope_backward(ctx, grad):
    (positions,) = ctx.saved_tensors
    return torch.ops.latte.mrope(grad, positions, ctx.section, ctx.theta, not ctx.inverse), None, None, None, None


_mrope_op.register_autograd(_mrope_backward, setup_context=_mrope_setup_context)


@torch.library.custom_op("latte::mrope_", mutates_args=("x",))
def _mrope_inplace_op(x: Tensor, positions: Tensor, mrope_section: List[int], theta: float) -> None:
    V.check_mrope(x, positions, mrope_section, theta)
    V.check_no_overlap(x)
    _mrope_into(x, x, positions, mrope_section, theta, False)


@_mrope_inplace_op.register_fake
def _(x, positions, mrope_section, theta):
    V.check_mrope(x, positions, mrope_section, theta)
    V.check_no_overlap(x)
    return None


# --------------------------------------------------------------------------------------------------
# Public functions


def _check_inplace(x: Tensor) -> None:
    if x.requires_grad:
        raise ValueError("x requires grad: inplace=True cannot be used in an autograd-tracked call (use the default inplace=False)")


def rope_2d(x: Tensor, grid_hw: Sequence[int], *, theta: float = 10000.0, positions: Optional[Tensor] = None,
            inplace: bool = False) -> Tensor:
    """Rotates ``x`` (B, N, H, D) by 2D axial RoPE: token n sits at (n // gw, n % gw) of ``grid_hw``.

    ``positions`` (int, (2, B, N): rows, columns) overrides the grid. Returns a new contiguous tensor,
    or with ``inplace=True`` rotates ``x`` itself and returns it (not allowed when ``x`` requires grad).
    The op checks the tensors.
    """
    gw = V.rope_2d_gw(x, grid_hw, positions)
    theta = V.check_positive_float("theta", theta)
    if inplace:
        _check_inplace(x)
        torch.ops.latte.rope_2d_(x, positions, gw, theta)
        return x
    return torch.ops.latte.rope_2d(x, positions, gw, theta, False)


def mrope(x: Tensor, positions: Tensor, *, mrope_section: Sequence[int] = (16, 24, 24), theta: float = 1000000.0,
          inplace: bool = False) -> Tensor:
    """Rotates ``x`` (B, N, H, D) by Qwen2-VL's 3D M-RoPE at ``positions`` (3, B, N).

    Returns a new contiguous tensor, or with ``inplace=True`` rotates ``x`` itself and returns it (not
    allowed when ``x`` requires grad). The op checks the tensors.
    """
    section, theta = V.check_mrope_section(mrope_section), V.check_positive_float("theta", theta)
    if inplace:
        V.check_tensor("x", x, ndim=4)
        _check_inplace(x)
        torch.ops.latte.mrope_(x, positions, list(section), theta)
        return x
    return torch.ops.latte.mrope(x, positions, list(section), theta, False)
