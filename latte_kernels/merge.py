"""Merging two partial attentions over disjoint key sets (SPEC 2.3): Triton forward and backward.

With ``m = max(lse_a, lse_b)`` (0 where both are -inf), ``w_a = exp(lse_a - m) / (w_a + w_b)`` and the
same for ``b``: ``lse = m + log(exp(lse_a - m) + exp(lse_b - m))``, ``out = w_a * out_a + w_b * out_b``.
-inf on one side gives weights exactly 0 and 1 (the other side unchanged) and that side's output is
never read (it may hold NaN); on both, weights 0, 0 and ``lse = -inf``, never NaN. Accumulation is
float32; ``out`` keeps ``out_a``'s dtype, ``lse`` is float32.

Backward (``w_a + w_b = 1``, ``g``/``g_lse`` the cotangents of ``out``/``lse``):
``d out_a = w_a g``, ``d out_b = w_b g``, ``d lse_a = w_a (<g, out_a - out> + g_lse)``, and the same for
``b``. It is finite for every input the forward accepts, rows with both sides empty included.

Registered ops (namespace ``latte``): ``merge_attention_states(out_a, lse_a, out_b, lse_b) -> (out, lse)``
with autograd, and its backward ``merge_attention_states_backward``. Both check their arguments
(``_validate``), read any strides, write contiguous outputs, run Triton when ``_backend.triton_runs``
allows (float32 LSEs) and the same formulas in PyTorch otherwise (float64 for ``gradcheck``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _backend, reference
from . import _validate as V
from ._backend import HAS_TRITON, triton_runs

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _row_weights(LA, LB, b, h, n, row_ok, sla_b, sla_h, sla_n, slb_b, slb_h, slb_n):
        """Per-row normalised weights (w_a, w_b), the merged lse (float32) and whether each side is
        non-empty (lse > -inf: an empty side's output is not read)."""
        la = tl.load(LA + b * sla_b + h * sla_h + n * sla_n, mask=row_ok, other=float("-inf")).to(tl.float32)
        lb = tl.load(LB + b * slb_b + h * slb_h + n * slb_n, mask=row_ok, other=float("-inf")).to(tl.float32)
        m = tl.maximum(la, lb)
        m = tl.where(m == float("-inf"), 0.0, m)
        wa = tl.exp(la - m)
        wb = tl.exp(lb - m)
        total = wa + wb
        denom = tl.where(total == 0.0, 1.0, total)
        lse = tl.where(total == 0.0, float("-inf"), m + tl.log(denom))  # both sides empty: -inf
        return wa / denom, wb / denom, lse, la != float("-inf"), lb != float("-inf")

    @triton.jit
    def _merge_fwd_kernel(
        OA, LA, OB, LB, OUT, LSE,
        R, N, H, D,
        soa_b, soa_n, soa_h, soa_d,
        sob_b, sob_n, sob_h, sob_d,
        sla_b, sla_h, sla_n,
        slb_b, slb_h, slb_n,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # rows r = (b * N + n) * H + h of the (B, N, H) grid, BLOCK_R rows of head_dim each
        r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        row_ok = r < R
        h = r % H
        n = (r // H) % N
        b = r // (H * N)
        wa, wb, lse, has_a, has_b = _row_weights(LA, LB, b, h, n, row_ok, sla_b, sla_h, sla_n, slb_b, slb_h, slb_n)
        mask = row_ok[:, None] & (d < D)[None, :]
        oa = tl.load(OA + (b * soa_b + n * soa_n + h * soa_h)[:, None] + d[None, :] * soa_d,
                     mask=mask & has_a[:, None], other=0.0)
        ob = tl.load(OB + (b * sob_b + n * sob_n + h * sob_h)[:, None] + d[None, :] * sob_d,
                     mask=mask & has_b[:, None], other=0.0)
        out = wa[:, None] * oa.to(tl.float32) + wb[:, None] * ob.to(tl.float32)
        tl.store(OUT + r[:, None] * D + d[None, :], out.to(OUT.dtype.element_ty), mask=mask)
        tl.store(LSE + (b * H + h) * N + n, lse, mask=row_ok)

    @triton.jit
    def _merge_bwd_kernel(
        G, GL, OA, LA, OB, LB, DOA, DLA, DOB, DLB,
        R, N, H, D,
        sg_b, sg_n, sg_h, sg_d,
        sgl_b, sgl_h, sgl_n,
        soa_b, soa_n, soa_h, soa_d,
        sob_b, sob_n, sob_h, sob_d,
        sla_b, sla_h, sla_n,
        slb_b, slb_h, slb_n,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        row_ok = r < R
        h = r % H
        n = (r // H) % N
        b = r // (H * N)
        wa, wb, _, has_a, has_b = _row_weights(LA, LB, b, h, n, row_ok, sla_b, sla_h, sla_n, slb_b, slb_h, slb_n)
        mask = row_ok[:, None] & (d < D)[None, :]
        g = tl.load(G + (b * sg_b + n * sg_n + h * sg_h)[:, None] + d[None, :] * sg_d, mask=mask, other=0.0).to(tl.float32)
        gl = tl.load(GL + b * sgl_b + h * sgl_h + n * sgl_n, mask=row_ok, other=0.0).to(tl.float32)
        oa = tl.load(OA + (b * soa_b + n * soa_n + h * soa_h)[:, None] + d[None, :] * soa_d,
                     mask=mask & has_a[:, None], other=0.0).to(tl.float32)
        ob = tl.load(OB + (b * sob_b + n * sob_n + h * sob_h)[:, None] + d[None, :] * sob_d,
                     mask=mask & has_b[:, None], other=0.0).to(tl.float32)
        out = wa[:, None] * oa + wb[:, None] * ob
        dla = wa * (tl.sum(g * (oa - out), axis=1) + gl)
        dlb = wb * (tl.sum(g * (ob - out), axis=1) + gl)
        dst = r[:, None] * D + d[None, :]
        tl.store(DOA + dst, (wa[:, None] * g).to(DOA.dtype.element_ty), mask=mask)
        tl.store(DOB + dst, (wb[:, None] * g).to(DOB.dtype.element_ty), mask=mask)
        lse_dst = (b * H + h) * N + n
        tl.store(DLA + lse_dst, dla, mask=row_ok)
        tl.store(DLB + lse_dst, dlb, mask=row_ok)


def _blocks(d: int) -> Tuple[int, int]:
    """(rows, padded head_dim) per program: 1024 elements, 8 per thread at 4 warps. A memory-bound op
    wants no spill: offline sm_90 compiles of 4096-element tiles spill ~1 KB per thread (int64 strided
    addresses for four tensors), 1024-element tiles use 128 registers and none (benchmarks/NOTES.md)."""
    block_d = triton.next_power_of_2(d)
    return max(1, 1024 // block_d), block_d


def _use_triton(out_a: Tensor, lse_a: Tensor) -> bool:
    return triton_runs(out_a) and lse_a.dtype == torch.float32


def _lse_dtype(out_a: Tensor, lse_a: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (out_a.dtype, lse_a.dtype) else torch.float32


def _launch_fwd(out: Tensor, lse: Tensor, out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> None:
    """Writes the merge into ``out`` (contiguous (B, N, H, D)) and ``lse`` (contiguous (B, H, N) float32)."""
    b, n, h, d = out_a.shape
    block_r, block_d = _blocks(d)
    rows = b * n * h
    with _backend.device_guard(out_a):
        _merge_fwd_kernel[(triton.cdiv(rows, block_r),)](
            out_a, lse_a, out_b, lse_b, out, lse,
            rows, n, h, d,
            *out_a.stride(), *out_b.stride(), *lse_a.stride(), *lse_b.stride(),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
        )


def _launch_bwd(d_oa: Tensor, d_la: Tensor, d_ob: Tensor, d_lb: Tensor, grad_out: Tensor, grad_lse: Tensor,
                out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> None:
    """Writes the four gradients into contiguous buffers shaped like the inputs."""
    b, n, h, d = out_a.shape
    block_r, block_d = _blocks(d)
    rows = b * n * h
    with _backend.device_guard(out_a):
        _merge_bwd_kernel[(triton.cdiv(rows, block_r),)](
            grad_out, grad_lse, out_a, lse_a, out_b, lse_b, d_oa, d_la, d_ob, d_lb,
            rows, n, h, d,
            *grad_out.stride(), *grad_lse.stride(), *out_a.stride(), *out_b.stride(), *lse_a.stride(), *lse_b.stride(),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
        )


# --------------------------------------------------------------------------------------------------
# Registered ops


@torch.library.custom_op("latte::merge_attention_states", mutates_args=())
def _merge_op(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    V.check_merge(out_a, lse_a, out_b, lse_b)
    if not _use_triton(out_a, lse_a):
        out, lse = reference._merge(out_a, lse_a, out_b, lse_b)
        return out.contiguous(), lse.contiguous()
    b, n, h, _ = out_a.shape
    out = torch.empty(out_a.shape, dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty((b, h, n), dtype=torch.float32, device=out_a.device)
    _launch_fwd(out, lse, out_a, lse_a, out_b, lse_b)
    return out, lse


@_merge_op.register_fake
def _(out_a, lse_a, out_b, lse_b):
    V.check_merge(out_a, lse_a, out_b, lse_b)
    return out_a.new_empty(out_a.shape), lse_a.new_empty(lse_a.shape, dtype=_lse_dtype(out_a, lse_a))


def _merge_backward_torch(g, g_lse, out_a, lse_a, out_b, lse_b) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward formulas of the module docstring in PyTorch (the path where Triton does not run)."""
    acc = _lse_dtype(out_a, lse_a)
    la, lb = lse_a.to(acc), lse_b.to(acc)
    m = torch.maximum(la, lb)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    total = wa + wb
    denom = torch.where(total == 0, torch.ones_like(total), total)
    wa, wb = wa / denom, wb / denom  # (B, H, N)
    wa_, wb_ = wa.transpose(1, 2).unsqueeze(-1), wb.transpose(1, 2).unsqueeze(-1)  # (B, N, H, 1)
    oa, ob, g = reference.zero_empty_rows(out_a, la, acc), reference.zero_empty_rows(out_b, lb, acc), g.to(acc)
    out = wa_ * oa + wb_ * ob
    d_la = wa * ((g * (oa - out)).sum(-1).transpose(1, 2) + g_lse.to(acc))
    d_lb = wb * ((g * (ob - out)).sum(-1).transpose(1, 2) + g_lse.to(acc))
    return ((wa_ * g).to(out_a.dtype).contiguous(), d_la.to(lse_a.dtype).contiguous(),
            (wb_ * g).to(out_b.dtype).contiguous(), d_lb.to(lse_b.dtype).contiguous())


@torch.library.custom_op("latte::merge_attention_states_backward", mutates_args=())
def _merge_backward_op(grad_out: Tensor, grad_lse: Tensor, out_a: Tensor, lse_a: Tensor, out_b: Tensor,
                       lse_b: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    V.check_merge_backward(grad_out, grad_lse, out_a, lse_a, out_b, lse_b)
    if not _use_triton(out_a, lse_a):
        return _merge_backward_torch(grad_out, grad_lse, out_a, lse_a, out_b, lse_b)
    b, n, h, _ = out_a.shape
    d_oa = torch.empty(out_a.shape, dtype=out_a.dtype, device=out_a.device)
    d_ob = torch.empty(out_b.shape, dtype=out_b.dtype, device=out_b.device)
    d_la = torch.empty((b, h, n), dtype=lse_a.dtype, device=out_a.device)
    d_lb = torch.empty((b, h, n), dtype=lse_b.dtype, device=out_a.device)
    _launch_bwd(d_oa, d_la, d_ob, d_lb, grad_out, grad_lse, out_a, lse_a, out_b, lse_b)
    return d_oa, d_la, d_ob, d_lb


@_merge_backward_op.register_fake
def _(grad_out, grad_lse, out_a, lse_a, out_b, lse_b):
    V.check_merge_backward(grad_out, grad_lse, out_a, lse_a, out_b, lse_b)
    return (out_a.new_empty(out_a.shape), lse_a.new_empty(lse_a.shape), out_b.new_empty(out_b.shape),
            lse_b.new_empty(lse_b.shape))


def _merge_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.lse_dtype = _lse_dtype(inputs[0], inputs[1])


def _merge_backward(ctx, grad_out: Optional[Tensor], grad_lse: Optional[Tensor]):
    out_a, lse_a, out_b, lse_b = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out_a)
    if grad_lse is None:
        grad_lse = torch.zeros(lse_a.shape, dtype=ctx.lse_dtype, device=lse_a.device)
    return torch.ops.latte.merge_attention_states_backward(grad_out, grad_lse, out_a, lse_a, out_b, lse_b)


_merge_op.register_autograd(_merge_backward, setup_context=_merge_setup_context)


def merge_attention_states(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """``(out, lse)`` of one softmax over the union of the key sets behind ``a`` and ``b``.

    ``out_*``: (B, N, H, D); ``lse_*``: (B, H, N) float32 natural-log. Returns ``out`` contiguous in
    ``out_a``'s dtype and ``lse`` float32; differentiable in all four inputs. The op checks the arguments.
    """
    return torch.ops.latte.merge_attention_states(out_a, lse_a, out_b, lse_b)
