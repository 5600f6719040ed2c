"""Image queries attending to a cached, padded context (SPEC 2.4).

The kernels are the C++/CUDA extension in ``csrc/`` (``torch.ops.latte_ext``; ``_ext.py`` loads or
builds it). This module adds what the op needs from Python once the library is loaded: the fake
(meta) implementations for ``torch.compile``, which check their arguments as the C++ ops do (so a
malformed call fails the same way traced or on meta tensors), and autograd through both outputs, the
LSE included.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _backend, _ext, reference
from . import _validate as V

_REGISTERED = False


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fake_forward(q, k_ctx, v_ctx, ctx_lens, scale):
    V.check_context_attention_op(q, k_ctx, v_ctx, ctx_lens, scale)
    b, n, h, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((b, h, n), dtype=_lse_dtype(q))


def _fake_backward(grad_out, grad_lse, q, k_ctx, v_ctx, ctx_lens, out, lse, scale):
    V.check_context_attention_backward(grad_out, grad_lse, q, k_ctx, v_ctx, ctx_lens, out, lse, scale)
    c = torch.contiguous_format
    return (torch.empty_like(q, memory_format=c), torch.empty_like(k_ctx, memory_format=c),
            torch.empty_like(v_ctx, memory_format=c))


def _setup_context(ctx, inputs, output):
    q, k_ctx, v_ctx, ctx_lens, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k_ctx, v_ctx, ctx_lens, out, lse)
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse):
    q, k_ctx, v_ctx, ctx_lens, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    dq, dk, dv = torch.ops.latte_ext.context_attention_backward(
        grad_out, grad_lse, q, k_ctx, v_ctx, ctx_lens, out, lse, ctx.scale
    )
    return dq, dk, dv, None, None


@torch.compiler.assume_constant_result
def ensure_registered() -> bool:
    """Loads the extension and registers its fakes and autograd, once. Under ``torch.compile`` this
    runs at trace time and folds to a constant, so a first call inside a compiled region works."""
    global _REGISTERED
    if not _REGISTERED:
        _ext.load()
        torch.library.register_fake("latte_ext::context_attention", _fake_forward)
        torch.library.register_fake("latte_ext::context_attention_backward", _fake_backward)
        torch.library.register_autograd("latte_ext::context_attention", _backward, setup_context=_setup_context)
        _REGISTERED = True
    return True


def check_ctx_lens(ctx_lens: Tensor, num_keys: int) -> Tensor:
    """Checks the valid-key counts ``ctx_lens`` that ``context_attention`` and ``latte_attention`` take:
    an int32/int64 ``(B,)`` tensor with every value in ``[0, num_keys]`` (``num_keys``: the padded
    context length Nc). TypeError for a wrong type or dtype, ValueError for a wrong shape or value;
    returns ``ctx_lens``.

    The values are read on the host (one synchronisation for a CUDA tensor), except during CUDA-graph
    capture and ``torch.compile`` tracing, where reading them is not allowed and only the shape and
    dtype are checked (the kernels clamp the lengths to ``[0, Nc]``, so nothing reads out of bounds).
    Check once per call of a model, then run the ops inside it without per-layer host reads.
    """
    V.check_tensor("ctx_lens", ctx_lens, ndim=1, dtypes=V.INT_DTYPES)
    if isinstance(num_keys, bool) or not isinstance(num_keys, int):
        raise TypeError(f"num_keys must be an int, got {type(num_keys).__name__}")
    if num_keys < 0:
        raise ValueError(f"num_keys must be non-negative, got {num_keys}")
    V.check_ctx_lens_values(ctx_lens, num_keys)
    return ctx_lens


def context_attention(
    q: Tensor, k_ctx: Tensor, v_ctx: Tensor, ctx_lens: Optional[Tensor] = None, *, scale: Optional[float] = None
) -> Tuple[Tensor, Tensor]:
    """``softmax(scale q k_ctx^T) v_ctx`` over the first ``ctx_lens[b]`` keys; returns (out, lse).

    q (B, Nq, Hq, D); k_ctx, v_ctx (B, Nc, Hkv, D) padded to Nc; ctx_lens int (B,) in [0, Nc] or None
    (all Nc). lse (B, Hq, Nq) float32 natural log; a row with no key gives out 0 and lse -inf.
    """
    return run(q, k_ctx, v_ctx, ctx_lens, V.check_context_attention(q, k_ctx, v_ctx, ctx_lens, scale))


def run(q: Tensor, k_ctx: Tensor, v_ctx: Tensor, ctx_lens: Optional[Tensor], scale: float) -> Tuple[Tensor, Tensor]:
    """The op without the host-side ``ctx_lens`` value check (the composite ``latte_attention`` calls
    this, so a layer reads ``ctx_lens`` on the host at most once). Shapes, dtypes and devices are still
    checked: by the extension's op, or here where the reference runs instead."""
    if not _backend.extension_runs(q):
        V.check_context_attention_op(q, k_ctx, v_ctx, ctx_lens, scale)
        return reference._context_attention(q, k_ctx, v_ctx, ctx_lens, scale)
    ensure_registered()
    return torch.ops.latte_ext.context_attention(q, k_ctx, v_ctx, ctx_lens, scale)
