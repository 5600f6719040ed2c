"""Argument checks shared by the references, the public functions and the registered ops.

Every op validates through here, so a malformed call fails the same way whichever backend would have
run it: a ``TypeError`` for a wrong type or dtype, a ``ValueError`` for a wrong shape, device or value,
each naming the argument and what was expected.

Each registered op (``torch.ops.latte.*``, backward ops included) checks its own arguments with a
``check_<op>_op`` function, in its real and its fake implementation, so a direct call can never reach a
kernel with a malformed tensor. The public functions check only what their op cannot see (defaults,
the ``state`` pair, the grid against the token count, ``ctx_lens`` values) with ``<op>_args`` and
leave the tensors to the op: each tensor is checked once per call. The references (not ops) check
everything through ``check_<op>``, which is the two together.

Checks never read device memory, except ``check_ctx_lens_values`` which the public ops call only
outside CUDA-graph capture and ``torch.compile`` tracing (see its docstring).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)
MAX_HEAD_DIM = 256


def check_tensor(name: str, t, *, ndim: int, dtypes=FLOAT_DTYPES) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {t.dtype}")
    return t


def _is_int(v) -> bool:
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def check_device(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must share a device")


def check_same_dtype(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def check_dim(name: str, what: str, got: int, expected: int, source: str) -> None:
    if got != expected:
        raise ValueError(f"{name} has {what} {got} but {source} has {expected}; they must match")


def check_head_dim(name: str, d: int) -> None:
    if d % 8 != 0 or not 8 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{name} head_dim must be a multiple of 8 in [8, {MAX_HEAD_DIM}], got {d}")


def check_nonempty(name: str, t: Tensor) -> None:
    if t.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")


def check_bshd(name: str, t, *, dtypes=FLOAT_DTYPES) -> Tensor:
    """A (batch, seq, heads, head_dim) tensor with a valid head_dim."""
    check_tensor(name, t, ndim=4, dtypes=dtypes)
    check_nonempty(name, t)
    check_head_dim(name, t.shape[-1])
    return t


def check_positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite positive number, got {value}")
    return float(value)


def check_scale(name: str, value, head_dim: int) -> float:
    if value is None:
        return head_dim ** -0.5
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or None, got {type(value).__name__}")
    value = float(value)
    if value != value or abs(value) == float("inf"):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_grid(name: str, grid_hw, n: Optional[int] = None, n_name: str = "x") -> Tuple[int, int]:
    if not isinstance(grid_hw, (tuple, list)) or len(grid_hw) != 2:
        raise TypeError(f"{name} must be a (gh, gw) pair of ints, got {grid_hw!r}")
    gh, gw = grid_hw
    for v in (gh, gw):
        if not _is_int(v) or v <= 0:
            raise ValueError(f"{name} must hold two positive ints, got {grid_hw!r}")
    if n is not None and n != gh * gw:
        raise ValueError(f"{name}={tuple(grid_hw)} holds {gh * gw} tokens but {n_name} has {n} tokens (N must equal gh * gw)")
    return int(gh), int(gw)


def check_positions(name: str, positions, axes: int, batch: int, n: int, ref: Tensor) -> Tensor:
    check_tensor(name, positions, ndim=3, dtypes=INT_DTYPES)
    if tuple(positions.shape) != (axes, batch, n):
        raise ValueError(f"{name} must have shape ({axes}, B={batch}, N={n}), got {tuple(positions.shape)}")
    check_device(name, positions, "x", ref)
    return positions


def check_like(name: str, t, ref_name: str, ref: Tensor, *, same_dtype: bool = True) -> Tensor:
    """A tensor with ``ref``'s shape and device, and its dtype (or any float dtype)."""
    check_tensor(name, t, ndim=ref.dim())
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    check_device(name, t, ref_name, ref)
    if same_dtype:
        check_same_dtype(name, t, ref_name, ref)
    return t


def check_lse(name: str, lse, out: Tensor, out_name: str) -> Tensor:
    """An LSE (B, H, N) matching a (B, N, H, D) output; float32, or float64 beside float64 outputs."""
    check_tensor(name, lse, ndim=3, dtypes=(torch.float32, torch.float64))
    b, n, h, _ = out.shape
    if tuple(lse.shape) != (b, h, n):
        raise ValueError(f"{name} must have shape (B={b}, H={h}, N={n}) to match {out_name}, got {tuple(lse.shape)}")
    check_device(name, lse, out_name, out)
    return lse


def check_gqa(q_name: str, hq: int, kv_name: str, hkv: int) -> None:
    if hkv <= 0 or hq % hkv != 0:
        raise ValueError(f"{q_name} has {hq} heads, which is not a multiple of the {hkv} heads of {kv_name} (GQA needs Hq % Hkv == 0)")


def check_kv(q_name: str, q: Tensor, k_name: str, k: Tensor, v_name: str, v: Tensor) -> None:
    """Keys/values (B, Nk, Hkv, D) against queries (B, Nq, Hq, D)."""
    check_bshd(k_name, k)
    check_bshd(v_name, v)
    for name, t in ((k_name, k), (v_name, v)):
        check_device(name, t, q_name, q)
        check_same_dtype(name, t, q_name, q)
        check_dim(name, "batch size", t.shape[0], q.shape[0], q_name)
        check_dim(name, "head_dim", t.shape[3], q.shape[3], q_name)
    check_dim(v_name, "sequence length", v.shape[1], k.shape[1], k_name)
    check_dim(v_name, "head count", v.shape[2], k.shape[2], k_name)
    check_gqa(q_name, q.shape[2], k_name, k.shape[2])


# --------------------------------------------------------------------------------------------------
# Per-op checks. Each returns the normalised arguments the kernels and the reference need.


def rope_2d_gw(x, grid_hw, positions) -> int:
    """The public ``grid_hw`` as the registered op's ``gw`` (0 when ``positions`` override the grid)."""
    check_tensor("x", x, ndim=4)
    if positions is None:
        return check_grid("grid_hw", grid_hw, x.shape[1], "x")[1]
    if grid_hw is not None:
        check_grid("grid_hw", grid_hw)
    return 0


def check_rope_2d_op(x, positions, gw, theta) -> float:
    """``latte::rope_2d`` / ``rope_2d_``: token n at row ``n // gw``, column ``n % gw`` unless
    ``positions`` (2, B, N) are given."""
    check_bshd("x", x)
    b, n, _, d = x.shape
    if d % 4 != 0:  # implied by the multiple-of-8 rule; kept for the explicit message
        raise ValueError(f"x head_dim must be divisible by 4 for 2D RoPE, got {d}")
    theta = check_positive_float("theta", theta)
    if positions is None:
        if not _is_int(gw) or gw < 1 or n % gw != 0:
            raise ValueError(f"gw (the grid width) must be a positive int dividing the {n} tokens of x when positions "
                             f"is None, got {gw!r}")
    else:
        check_positions("positions", positions, 2, b, n, x)
    return theta


def check_no_overlap(x: Tensor) -> None:
    """An in-place op's output must not alias itself (a stride of 0)."""
    if any(st == 0 and size > 1 for st, size in zip(x.stride(), x.shape)):
        raise ValueError(f"x has overlapping memory (a stride of 0, strides {tuple(x.stride())}): it cannot be "
                         f"rotated in place")


def check_rope_2d(x, grid_hw, theta, positions) -> Tuple[float, Optional[Tuple[int, int]]]:
    """The public ``rope_2d``'s arguments: ``(theta, grid)``, grid None when positions are given without one."""
    gw = rope_2d_gw(x, grid_hw, positions)
    theta = check_rope_2d_op(x, positions, gw, theta)
    grid = None if grid_hw is None else check_grid("grid_hw", grid_hw)
    return theta, grid


def check_mrope_section(mrope_section) -> Tuple[int, int, int]:
    if not isinstance(mrope_section, (tuple, list)) or len(mrope_section) != 3:
        raise TypeError(f"mrope_section must be three ints (temporal, height, width), got {mrope_section!r}")
    if any(not _is_int(s) or s < 0 for s in mrope_section):
        raise ValueError(f"mrope_section must hold non-negative ints, got {mrope_section!r}")
    return tuple(int(s) for s in mrope_section)


def check_mrope(x, positions, mrope_section, theta) -> Tuple[Tuple[int, int, int], float]:
    """``latte::mrope`` / ``mrope_`` and the public ``mrope``: ``(section, theta)``."""
    check_bshd("x", x)
    b, n, _, d = x.shape
    check_positions("positions", positions, 3, b, n, x)
    section = check_mrope_section(mrope_section)
    if sum(section) != d // 2:
        raise ValueError(f"mrope_section {section} sums to {sum(section)} but must equal head_dim/2 = {d // 2}")
    return section, check_positive_float("theta", theta)


def check_merge(out_a, lse_a, out_b, lse_b) -> None:
    """``latte::merge_attention_states`` and the public function: one check for both."""
    check_bshd("out_a", out_a)
    check_tensor("out_b", out_b, ndim=4)
    if out_a.shape != out_b.shape:
        raise ValueError(f"out_b has shape {tuple(out_b.shape)} but out_a has {tuple(out_a.shape)}; they must match")
    check_device("out_b", out_b, "out_a", out_a)
    check_same_dtype("out_b", out_b, "out_a", out_a)
    check_lse("lse_a", lse_a, out_a, "out_a")
    check_lse("lse_b", lse_b, out_a, "out_a")
    check_same_dtype("lse_b", lse_b, "lse_a", lse_a)


def check_merge_backward(grad_out, grad_lse, out_a, lse_a, out_b, lse_b) -> None:
    check_merge(out_a, lse_a, out_b, lse_b)
    check_like("grad_out", grad_out, "out_a", out_a, same_dtype=False)
    check_lse("grad_lse", grad_lse, out_a, "out_a")


def check_ctx_lens(ctx_lens, batch: int, q: Tensor) -> None:
    """Shape, dtype and device of ``ctx_lens``; its values are checked by check_ctx_lens_values."""
    check_tensor("ctx_lens", ctx_lens, ndim=1, dtypes=INT_DTYPES)
    if ctx_lens.shape[0] != batch:
        raise ValueError(f"ctx_lens must have shape (B={batch},), got {tuple(ctx_lens.shape)}")
    check_device("ctx_lens", ctx_lens, "q", q)


def values_checkable(t: Tensor) -> bool:
    """Whether reading ``t``'s values on the host is allowed here.

    Never during CUDA-graph capture or torch.compile tracing (a host read would break both); on a
    CUDA tensor outside those it costs one synchronisation, the price of a ValueError instead of a
    silently clamped length. The kernels clamp ``ctx_lens`` to ``[0, Nc]`` so an unchecked bad value
    can never read out of bounds.
    """
    if torch.compiler.is_compiling():
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    # is_fake also sees fake tensors wrapped by functionalization (AOT autograd tracing a composite op)
    return not torch._subclasses.fake_tensor.is_fake(t) and t.device.type != "meta"


def check_ctx_lens_values(ctx_lens: Tensor, nc: int) -> None:
    if not values_checkable(ctx_lens):
        return
    lo, hi = int(ctx_lens.min()), int(ctx_lens.max())
    if lo < 0 or hi > nc:
        raise ValueError(f"ctx_lens values must lie in [0, Nc={nc}], got min {lo} and max {hi}")


def check_context_attention_op(q, k_ctx, v_ctx, ctx_lens, scale) -> float:
    """Shapes, dtypes and devices (``ctx_lens`` values are for the host, see check_ctx_lens_values)."""
    check_bshd("q", q)
    check_kv("q", q, "k_ctx", k_ctx, "v_ctx", v_ctx)
    if ctx_lens is not None:
        check_ctx_lens(ctx_lens, q.shape[0], q)
    return check_scale("scale", scale, q.shape[-1])


def check_context_attention_backward(grad_out, grad_lse, q, k_ctx, v_ctx, ctx_lens, out, lse, scale) -> None:
    check_context_attention_op(q, k_ctx, v_ctx, ctx_lens, scale)
    check_like("grad_out", grad_out, "q", q, same_dtype=False)
    check_lse("grad_lse", grad_lse, q, "q")
    check_like("out", out, "q", q, same_dtype=False)
    check_lse("lse", lse, q, "q")


def check_context_attention(q, k_ctx, v_ctx, ctx_lens, scale) -> float:
    scale = check_context_attention_op(q, k_ctx, v_ctx, ctx_lens, scale)
    if ctx_lens is not None:
        check_ctx_lens_values(ctx_lens, k_ctx.shape[1])
    return scale


def unpack_state(state) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The public ``state=(out_c, lse_c)`` pair (or None) as the op's two arguments."""
    if state is None:
        return None, None
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(f"state must be a pair (out_c, lse_c) or None, got {type(state).__name__}")
    return state[0], state[1]


def check_state(out_c, lse_c, q: Tensor) -> None:
    if (out_c is None) != (lse_c is None):
        given, missing = ("out_c", "lse_c") if lse_c is None else ("lse_c", "out_c")
        raise ValueError(f"out_c and lse_c (the state) are given together or not at all: got {given} without {missing}")
    if out_c is None:
        return
    check_tensor("state[0] (out_c)", out_c, ndim=4)
    if out_c.shape != q.shape:
        raise ValueError(f"state[0] (out_c) must have the shape of q {tuple(q.shape)}, got {tuple(out_c.shape)}")
    check_device("state[0] (out_c)", out_c, "q", q)
    check_same_dtype("state[0] (out_c)", out_c, "q", q)
    check_lse("state[1] (lse_c)", lse_c, q, "q")


def check_residual_inputs(q, k, q_prev, k_prev, gate) -> bool:
    """Checks the previous-layer triple; returns whether the residual is present."""
    given = {"q_prev": q_prev is not None, "k_prev": k_prev is not None, "gate": gate is not None}
    if not any(given.values()):
        return False
    if not all(given.values()):
        have = [n for n, g in given.items() if g]
        missing = [n for n, g in given.items() if not g]
        raise ValueError(f"q_prev, k_prev and gate are given together or not at all: got {', '.join(have)} without {', '.join(missing)}")
    check_bshd("q_prev", q_prev)
    if q_prev.shape != q.shape:
        raise ValueError(f"q_prev must have the shape of q {tuple(q.shape)}, got {tuple(q_prev.shape)}")
    check_bshd("k_prev", k_prev)
    if k_prev.shape != k.shape:
        raise ValueError(f"k_prev must have the shape of k {tuple(k.shape)}, got {tuple(k_prev.shape)}")
    for name, t in (("q_prev", q_prev), ("k_prev", k_prev)):
        check_device(name, t, "q", q)
        check_same_dtype(name, t, "q", q)
    check_tensor("gate", gate, ndim=2)
    if tuple(gate.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(f"gate must have shape (B={q.shape[0]}, Hq={q.shape[2]}), got {tuple(gate.shape)}")
    check_device("gate", gate, "q", q)
    return True


def check_residual_attention_op(q, k, v, q_prev, k_prev, gate, out_c, lse_c, scale, prev_scale, rope_grid,
                                rope_theta) -> None:
    """``latte::residual_attention``'s arguments (scales already resolved to floats)."""
    check_bshd("q", q)
    check_kv("q", q, "k", k, "v", v)
    check_residual_inputs(q, k, q_prev, k_prev, gate)
    check_state(out_c, lse_c, q)
    check_scale("scale", scale, q.shape[-1])
    check_scale("prev_scale", prev_scale, q.shape[-1])
    if rope_grid is not None:
        check_grid("rope_grid", rope_grid, q.shape[1], "q")
        check_dim("k", "sequence length", k.shape[1], q.shape[1], "q (rope_grid rotates both on one grid)")
    check_positive_float("rope_theta", rope_theta)


def check_residual_attention_backward(dout, dlse, q, k, v, q_prev, k_prev, gate, out_c, lse_c, out, lse, scale,
                                      prev_scale, rope_grid, rope_theta) -> None:
    """``latte::residual_attention_backward``: the forward's arguments, its outputs and their cotangents
    (in the query's dtype: the kernels multiply them with q, k, v)."""
    check_residual_attention_op(q, k, v, q_prev, k_prev, gate, out_c, lse_c, scale, prev_scale, rope_grid, rope_theta)
    check_like("dout", dout, "q", q)
    check_lse("dlse", dlse, q, "q")
    check_like("out", out, "q", q)
    check_lse("lse", lse, q, "q")


def residual_attention_args(q, scale, prev_scale, state, rope_grid, rope_theta):
    """What the public ``residual_attention`` resolves before its op checks the tensors:
    ``(scale, prev_scale, out_c, lse_c, rope_grid, rope_theta)``."""
    check_bshd("q", q)  # the default scale needs a valid head_dim
    scale = check_scale("scale", scale, q.shape[-1])
    prev_scale = scale if prev_scale is None else check_scale("prev_scale", prev_scale, q.shape[-1])
    out_c, lse_c = unpack_state(state)
    rope_grid = None if rope_grid is None else check_grid("rope_grid", rope_grid)
    return scale, prev_scale, out_c, lse_c, rope_grid, check_positive_float("rope_theta", rope_theta)


def check_residual_attention(q, k, v, q_prev, k_prev, gate, scale, prev_scale, state, rope_grid, rope_theta):
    """The public signature, everything checked: ``(scale, prev_scale, state, rope_grid, rope_theta)``."""
    scale, prev_scale, out_c, lse_c, rope_grid, rope_theta = residual_attention_args(
        q, scale, prev_scale, state, rope_grid, rope_theta)
    check_residual_attention_op(q, k, v, q_prev, k_prev, gate, out_c, lse_c, scale, prev_scale, rope_grid, rope_theta)
    return scale, prev_scale, (None if out_c is None else (out_c, lse_c)), rope_grid, rope_theta


def check_latte_attention_op(q, grid_hw, scale) -> Tuple[float, Tuple[int, int]]:
    """What ``latte::latte_attention`` checks before its parts (whose ops check the rest): ``(scale, grid)``."""
    check_bshd("q", q)
    return check_scale("scale", scale, q.shape[-1]), check_grid("grid_hw", grid_hw, q.shape[1], "q")


def latte_attention_args(q, grid_hw, k_ctx, ctx_lens, scale, rope_theta) -> Tuple[float, Tuple[int, int], float]:
    """What the public ``latte_attention`` checks before its op: the ``ctx_lens`` values (read on the
    host, once per call) and the scalars; returns ``(scale, grid, rope_theta)``."""
    scale, grid = check_latte_attention_op(q, grid_hw, scale)
    if ctx_lens is not None:
        check_tensor("k_ctx", k_ctx, ndim=4)
        check_ctx_lens(ctx_lens, q.shape[0], q)
        check_ctx_lens_values(ctx_lens, k_ctx.shape[1])
    return scale, grid, check_positive_float("rope_theta", rope_theta)


def check_latte_attention(q, k, v, grid_hw, k_ctx, v_ctx, ctx_lens, q_prev, k_prev, gate, scale, rope_theta):
    """The public signature, everything checked: ``(scale, grid, rope_theta)``."""
    scale, grid, rope_theta = latte_attention_args(q, grid_hw, k_ctx, ctx_lens, scale, rope_theta)
    check_kv("q", q, "k", k, "v", v)
    check_dim("k", "sequence length", k.shape[1], q.shape[1], "q (image tokens attend to themselves)")
    check_context_attention_op(q, k_ctx, v_ctx, ctx_lens, scale)
    check_residual_inputs(q, k, q_prev, k_prev, gate)
    return scale, grid, rope_theta


def as_pair(value: Optional[Sequence[int]]) -> Optional[Tuple[int, int]]:
    return None if value is None else (int(value[0]), int(value[1]))
