"""Bidirectional attention with the timestep-gated previous-layer logits (SPEC 2.5).

``lk.residual_attention`` validates and calls the registered op ``latte::residual_attention``; its
gradient is the registered op ``latte::residual_attention_backward`` (so both trace through
``torch.compile``). Each op runs the Triton kernels (``_residual_attention_fwd`` / ``_bwd``) where
``_backend.triton_runs`` says so, and elsewhere (float64, CPU without the interpreter, other devices)
the plain-PyTorch reference with the dense gradient of ``_residual_attention_dense``.

Both ops check their own arguments (``_validate``; shapes, dtypes and devices only) in their real and
fake implementations, and are CUDA-graph safe: no host reads of device values, allocation sizes
depend on shapes only, launches go to the current stream of the inputs' device. (Autotuning runs on
the first call of a new shape: warm up before capturing, as with any autotuned Triton kernel.)
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _backend, _validate, reference
from ._residual_attention_dense import dense_backward

_EMPTY = (0,)


def _lse_dtype(q: Tensor, lse_c: Optional[Tensor]) -> torch.dtype:
    """The reference's LSE dtype: float64 when the query or the state's LSE is float64."""
    if q.dtype == torch.float64 or (lse_c is not None and lse_c.dtype == torch.float64):
        return torch.float64
    return torch.float32


def _grid(rope_grid: Optional[List[int]]):
    return None if rope_grid is None else (int(rope_grid[0]), int(rope_grid[1]))


def _use_triton(q: Tensor) -> bool:
    return _backend.triton_runs(q)


def _reference_core(q, k, v, q_prev, k_prev, gate, out_c, lse_c, scale, prev_scale, rope_grid, rope_theta):
    state = None if out_c is None else (out_c, lse_c)
    return reference._residual_attention(q, k, v, q_prev, k_prev, gate, scale, prev_scale, state, rope_grid, rope_theta)


@torch.library.custom_op("latte::residual_attention", mutates_args=())
def _residual_attention_op(
    q: Tensor, k: Tensor, v: Tensor,
    q_prev: Optional[Tensor], k_prev: Optional[Tensor], gate: Optional[Tensor],
    out_c: Optional[Tensor], lse_c: Optional[Tensor],
    scale: float, prev_scale: float, rope_grid: Optional[List[int]], rope_theta: float,
) -> Tuple[Tensor, Tensor]:
    _validate.check_residual_attention_op(q, k, v, q_prev, k_prev, gate, out_c, lse_c, scale, prev_scale, rope_grid,
                                          rope_theta)
    grid = _grid(rope_grid)
    if not _use_triton(q):
        out, lse = _reference_core(q, k, v, q_prev, k_prev, gate, out_c, lse_c, scale, prev_scale, grid, rope_theta)
        return out.contiguous(), lse.contiguous()
    from . import _residual_attention_fwd as fwd

    tanh_gate = None if gate is None else torch.tanh(gate.float())  # keeps gate's strides: passed on
    with _backend.device_guard(q):
        return fwd.forward(q, k, v, q_prev, k_prev, tanh_gate, out_c, lse_c, scale, prev_scale, grid, rope_theta,
                           _lse_dtype(q, lse_c))


@_residual_attention_op.register_fake
def _(q, k, v, q_prev, k_prev, gate, out_c, lse_c, scale, prev_scale, rope_grid, rope_theta):
    _validate.check_residual_attention_op(q, k, v, q_prev, k_prev, gate, out_c, lse_c, scale, prev_scale, rope_grid,
                                          rope_theta)
    b, nq, hq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((b, hq, nq), dtype=_lse_dtype(q, lse_c))


@torch.library.custom_op("latte::residual_attention_backward", mutates_args=())
def _residual_attention_backward_op(
    dout: Tensor, dlse: Tensor,
    q: Tensor, k: Tensor, v: Tensor,
    q_prev: Optional[Tensor], k_prev: Optional[Tensor], gate: Optional[Tensor],
    out_c: Optional[Tensor], lse_c: Optional[Tensor],
    out: Tensor, lse: Tensor,
    scale: float, prev_scale: float, rope_grid: Optional[List[int]], rope_theta: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dq_prev, dk_prev, dgate, dout_c, dlse_c); an absent input's is empty."""
    _validate.check_residual_attention_backward(dout, dlse, q, k, v, q_prev, k_prev, gate, out_c, lse_c, out, lse,
                                                scale, prev_scale, rope_grid, rope_theta)
    grid = _grid(rope_grid)
    if _use_triton(q):
        from . import _residual_attention_bwd as bwd

        tanh_gate = None if gate is None else torch.tanh(gate.float())
        with _backend.device_guard(q):
            grads = bwd.backward(dout, dlse, q, k, v, q_prev, k_prev, gate, tanh_gate, out_c, lse_c, out, lse,
                                 scale, prev_scale, grid, rope_theta)
    else:
        grads = dense_backward(dout, dlse, q, k, v, q_prev, k_prev, gate, out_c, lse_c, out, lse, scale, prev_scale, grid, rope_theta)
    return tuple(q.new_empty(_EMPTY) if g is None else g for g in grads)


@_residual_attention_backward_op.register_fake
def _(dout, dlse, q, k, v, q_prev, k_prev, gate, out_c, lse_c, out, lse, scale, prev_scale, rope_grid, rope_theta):
    _validate.check_residual_attention_backward(dout, dlse, q, k, v, q_prev, k_prev, gate, out_c, lse_c, out, lse,
                                                scale, prev_scale, rope_grid, rope_theta)

    def like(t):
        return q.new_empty(_EMPTY) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)

    return tuple(like(t) for t in (q, k, v, q_prev, k_prev, gate, out_c, lse_c))


def _setup_context(ctx, inputs, output):
    q, k, v, q_prev, k_prev, gate, out_c, lse_c, scale, prev_scale, rope_grid, rope_theta = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, q_prev, k_prev, gate, out_c, lse_c, out, lse)
    ctx.args = (scale, prev_scale, rope_grid, rope_theta)


def _backward(ctx, dout, dlse):
    q, k, v, q_prev, k_prev, gate, out_c, lse_c, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is None:
        dlse = torch.zeros_like(lse)
    grads = torch.ops.latte.residual_attention_backward(dout, dlse, q, k, v, q_prev, k_prev, gate, out_c, lse_c,
                                                        out, lse, *ctx.args)
    given = (q, k, v, q_prev, k_prev, gate, out_c, lse_c)
    return tuple(None if t is None else g for t, g in zip(given, grads)) + (None,) * 4


_residual_attention_op.register_autograd(_backward, setup_context=_setup_context)


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
    """``softmax(scale q k^T + tanh(gate) prev_scale q_prev k_prev^T) v``, merged with ``state``.

    ``q``, ``q_prev``: (B, Nq, Hq, D); ``k``, ``v``, ``k_prev``: (B, Nk, Hkv, D); ``gate``: (B, Hq)
    pre-activation; ``state``: ``(out_c, lse_c)`` of attention over other keys; ``rope_grid``:
    rotate q, k, q_prev, k_prev by 2D RoPE on a ``(gh, gw)`` grid inside the kernel.
    Returns ``out`` (B, Nq, Hq, D) in q's dtype and ``lse`` (B, Hq, Nq) float32 (natural log) over
    the union of this call's keys and the state's. (The op checks the tensors.)
    """
    scale, prev_scale, out_c, lse_c, rope_grid, rope_theta = _validate.residual_attention_args(
        q, scale, prev_scale, state, rope_grid, rope_theta
    )
    return torch.ops.latte.residual_attention(
        q, k, v, q_prev, k_prev, gate, out_c, lse_c, scale, prev_scale,
        None if rope_grid is None else list(rope_grid), rope_theta,
    )
