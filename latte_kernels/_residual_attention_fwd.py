"""Forward Triton kernel of ``residual_attention`` (SPEC 2.5) and its launcher.

One program owns ``BLOCK_M`` query rows of one query head and streams the keys of its kv head in
``BLOCK_N`` tiles, keeping the running max ``m``, sum ``l`` and the float32 output accumulator in
registers (online softmax, base-2: ``log2(e)`` is folded into the logit scales). The logits are one
product over the concatenated head dim, ``q . k^T + r q_prev . k_prev^T`` (two ``tl.dot`` into one
accumulator, the residual half scaled by ``r = tanh(gate) prev_scale / scale`` in float32, as the
backward recomputes it), so no ``Nq x Nk`` tensor ever exists. On Hopper (16-bit inputs) the K, V and
K_prev tiles come through tensor descriptors (``_tma``: TMA loads, pipelined by Triton), elsewhere
through pointer loads. With ``rope_grid`` the queries are rotated here, once per program. A given state
``(out_c, lse_c)`` is the starting point of the online softmax: ``m = lse_c``, ``l = 1`` (an empty
state, ``lse_c = -inf``, starts from ``m = -inf``, ``l = 0`` and its ``out_c`` row is discarded, so it
may hold NaN); ``out_c`` joins the accumulator in the epilogue with the weight ``exp(lse_c - m_final)``
it would have had from the start. Every tensor, the small ones (gate, lse_c) included, is read
through its strides.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from . import _autotune, _backend, _tma

LOG2E = 1.4426950408889634
# kernels may read only constexpr globals
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(0.6931471805599453)


@triton.jit
def rope_tile(x, base, offs_n, offs_d, stride_n, stride_d, mask, INVF, GW, D: tl.constexpr, INVERSE: tl.constexpr = False):
    """Rotates a loaded (rows, DP) tile ``x`` of tokens ``offs_n`` by 2D RoPE (SPEC 2.1).

    The partner column ``(d + D/2) mod D`` is loaded a second time (it is in L1/L2 already):
    ``out[j] = x[j] cos a_j - x[j+P] sin a_j`` and ``out[j+P] = x[j+P] cos a_j + x[j] sin a_j`` with
    ``a_j = (row if j < D/4 else col) * inv_freq[j mod D/4]`` (``-a_j`` if ``INVERSE``). The result is
    rounded to ``x``'s dtype, exactly as rotating the tensor beforehand would leave it.
    """
    P: tl.constexpr = D // 2
    QD: tl.constexpr = D // 4
    lower = offs_d < P
    partner = tl.where(lower, offs_d + P, offs_d - P)
    xp = tl.load(base + offs_n[:, None] * stride_n + partner[None, :] * stride_d, mask=mask, other=0.0)
    j = tl.where(lower, offs_d, offs_d - P)
    freq = tl.load(INVF + (j % QD), mask=offs_d < D, other=0.0)
    row = offs_n // GW
    col = offs_n - row * GW
    pos = tl.where((j < QD)[None, :], row[:, None], col[:, None]).to(tl.float32)
    angle = pos * freq[None, :]
    if INVERSE:
        sign = tl.where(lower, 1.0, -1.0)
    else:
        sign = tl.where(lower, -1.0, 1.0)
    out = x.to(tl.float32) * tl.cos(angle) + sign[None, :] * xp.to(tl.float32) * tl.sin(angle)
    return out.to(x.dtype)


@triton.jit
def rope_rows(base, offs_n, mask_n, stride_n, stride_d, INVF, GW, D: tl.constexpr):
    """Rows ``offs_n`` of one head (``base``: its first element), loaded and rotated by 2D RoPE as
    ``rope_tile`` does, for a power-of-two ``D``: the two halves are loaded as (rows, D/2) tiles and
    rotated against each other, so the angles, cos and sin exist once per pair (half of ``rope_tile``'s
    registers), then joined back into a (rows, D) tile."""
    P: tl.constexpr = D // 2
    QD: tl.constexpr = D // 4
    j = tl.arange(0, P)
    at = base + offs_n[:, None] * stride_n + j[None, :] * stride_d
    lo = tl.load(at, mask=mask_n[:, None], other=0.0)
    hi = tl.load(at + P * stride_d, mask=mask_n[:, None], other=0.0)
    row = offs_n // GW
    col = offs_n - row * GW
    pos = tl.where((j < QD)[None, :], row[:, None], col[:, None]).to(tl.float32)
    angle = pos * tl.load(INVF + (j % QD))[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    lo32 = lo.to(tl.float32)
    hi32 = hi.to(tl.float32)
    out_lo = (lo32 * cos - hi32 * sin).to(lo.dtype)
    out_hi = (hi32 * cos + lo32 * sin).to(lo.dtype)
    return tl.reshape(tl.permute(tl.join(out_lo, out_hi), (0, 2, 1)), [offs_n.shape[0], D])


@triton.jit
def query_rows(base, offs_m, offs_d, mask_m, mask_md, stride_n, stride_d, INVF, GW, D: tl.constexpr,
               DP: tl.constexpr, ROPE: tl.constexpr):
    """Rows ``offs_m`` of one query head (``base``: its first element) as a (rows, DP) tile, rotated by
    2D RoPE with ``ROPE`` (by half tiles when the head dim is a power of two)."""
    if ROPE and D == DP:
        x = rope_rows(base, offs_m, mask_m, stride_n, stride_d, INVF, GW, D)
    else:
        x = tl.load(base + offs_m[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask_md, other=0.0)
        if ROPE:
            x = rope_tile(x, base, offs_m, offs_d, stride_n, stride_d, mask_md, INVF, GW, D)
    return x


@triton.jit
def _rope_kernel(
    X, Y, INVF, sxb, sxn, sxh, sxd, N, H, GW,
    D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, INVERSE: tl.constexpr,
):
    """Y (a fresh contiguous (B, N, H, D) buffer) = X rotated by 2D RoPE, or by its inverse."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, DP)
    mask = (offs_n < N)[:, None] & (offs_d < D)[None, :]
    base = X + b * sxb + h * sxh
    x = tl.load(base + offs_n[:, None] * sxn + offs_d[None, :] * sxd, mask=mask, other=0.0)
    y = rope_tile(x, base, offs_n, offs_d, sxn, sxd, mask, INVF, GW, D, INVERSE)
    tl.store(Y + ((b * N + offs_n[:, None]) * H + h) * D + offs_d[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_kernel(
    Q, K, V, QP, KP, TG, OC, LC, INVF, O, LSE,
    sqb, sqn, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    sqpb, sqpn, sqph, sqpd,
    skpb, skpn, skph, skpd,
    socb, socn, soch, socd,
    slcb, slch, slcn,
    stgb, stgh,
    sob, son, soh, sod,
    Nq, Nk, Hq, GROUP, GW,
    c_qk, ratio,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_STATE: tl.constexpr, ROPE: tl.constexpr, QK_ZERO: tl.constexpr,
    TMA: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // GROUP
    b64 = b.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DP)
    mask_m = offs_m < Nq
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]

    # q (and q_prev) stay resident for the whole key loop
    q = query_rows(Q + b64 * sqb + h * sqh, offs_m, offs_d, mask_m, mask_md, sqn, sqd, INVF, GW, D, DP, ROPE)
    if HAS_RES:
        qp = query_rows(QP + b64 * sqpb + h * sqph, offs_m, offs_d, mask_m, mask_md, sqpn, sqpd, INVF, GW, D, DP,
                        ROPE)
        fold = tl.load(TG + b64 * stgb + h * stgh).to(tl.float32) * ratio  # the gate r, applied to <q_prev, k_prev>

    # The online softmax starts from the given state: its max is lse_c, its sum 1 (an empty state,
    # lse_c = -inf, contributes nothing). Its output joins in the epilogue, scaled like the
    # accumulator was, so no extra (BLOCK_M, D) tile is live during the key loop.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if HAS_STATE:
        lc = tl.load(LC + b64 * slcb + h * slch + offs_m * slcn, mask=mask_m, other=float("-inf")).to(tl.float32)
        m_i = lc * LOG2E_C
        l_i = tl.where(lc == float("-inf"), 0.0, 1.0)
        m_state = m_i
    acc = tl.zeros([BLOCK_M, DP], tl.float32)

    for start_n in range(0, Nk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Nk
        # logits: one product over the concatenated head dim, the residual half scaled by r in float32
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if HAS_RES:
            kp = _tma.rows(KP, b, hk, start_n, skpb, skpn, skph, skpd, Nk, D, DP, BLOCK_N, TMA)
            s = tl.dot(qp, tl.trans(kp), input_precision=DOT_PREC) * fold
        if not QK_ZERO:  # scale == 0: the q . k term vanishes (c_qk then carries log2(e) alone)
            k = _tma.rows(K, b, hk, start_n, skb, skn, skh, skd, Nk, D, DP, BLOCK_N, TMA)
            s = tl.dot(q, tl.trans(k), s, input_precision=DOT_PREC)
        s = tl.where(mask_n[None, :], s * c_qk, float("-inf"))
        # every key tile holds at least one real key, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tma.rows(V, b, hk, start_n, svb, svn, svh, svd, Nk, D, DP, BLOCK_N, TMA)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    if HAS_STATE:
        oc = tl.load(OC + b64 * socb + h * soch + offs_m[:, None] * socn + offs_d[None, :] * socd, mask=mask_md, other=0.0)
        empty = m_state == float("-inf")
        w_state = tl.where(empty, 0.0, tl.exp2(m_state - m_i))
        # an empty state's out_c may hold NaN: select, not multiply by 0 (a select spills less than a
        # state-masked load in offline sm_90 compiles at D=64, 128x128 tiles: 76 vs 896 B)
        acc += tl.where(empty[:, None], 0.0, w_state[:, None] * oc.to(tl.float32))
    out = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * LN2_C
    tl.store(O + b64 * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, out.to(O.dtype.element_ty), mask=mask_md)
    tl.store(LSE + (b64 * Hq + h) * Nq + offs_m, lse.to(LSE.dtype.element_ty), mask=mask_m)


# --------------------------------------------------------------------------------------------------
# Block sizes.
#
# FLOP/byte: per key tile a program does 2*BLOCK_M*BLOCK_N*D FLOPs per head-dim product (3 with the
# residual: the logits over the concatenated 2 x D, then p.v) against (2 + HAS_RES)*BLOCK_N*D*2 bytes
# of K/V/K_prev loads, i.e. ~BLOCK_M FLOPs/byte from L2: BLOCK_M = 128 puts the kernel well above the
# H100's ridge point, so it is tensor-core bound. Compiled as the JIT compiles the SPEC 5 call
# (tests/kernels/sm90_compile.py, NOTES.md), every 16-bit config of the Hopper lists (FWD_TMA_CONFIGS)
# uses wgmma, spills nothing (in-kernel RoPE and state included) and fits 227 KiB of shared memory
# (128 x 64 / 8 / 3 at D=128: 143 registers, 209 KiB; 128 x 128 needs 257 KiB). FWD_CONFIGS serve the
# pointer path (older GPUs, float32). D = 256 and float32 (IEEE dots, 4-byte tiles) take smaller tiles.
# Autotuning picks per (Nq, Nk, D); LATTE_KERNELS_AUTOTUNE_MAX cuts the lists.

def _cfg(bm, bn, w, s):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


FWD_CONFIGS = {
    64: [_cfg(128, 128, 8, 3), _cfg(128, 64, 8, 2), _cfg(64, 64, 4, 4)],
    128: [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 2), _cfg(64, 64, 4, 3)],
    256: [_cfg(64, 32, 8, 2), _cfg(64, 32, 4, 2)],
    "fp32": [_cfg(64, 32, 4, 2), _cfg(32, 32, 4, 1)],
}
INTERPRET_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 32}  # one small config: the interpreter is slow per op


def _tuned(kernel, configs_by_class, key, reset_to_zero=None):
    """One autotuner per class of configs: head_dim <= 64, 128 or 256 (16-bit), or any float32."""
    tuned = {c: triton.autotune(configs=_autotune.limit(cfgs), key=key, reset_to_zero=reset_to_zero)(kernel)
             for c, cfgs in configs_by_class.items()}
    return lambda dp, dtype: tuned["fp32" if dtype == torch.float32 else dim_class(dp)]


def dim_class(dp: int) -> int:
    """The 16-bit config class of a padded head dim: 64 (up to 64), 128 or 256."""
    return max(dp, 64)


# Hopper (TMA): K, V, K_prev come through descriptors whose block is (1, BLOCK_N, 1, DP), made before the
# autotuner runs, so each list keeps one BLOCK_N (FWD_TMA_BLOCK_N).
FWD_TMA_CONFIGS = {
    64: [_cfg(128, 128, 8, 3), _cfg(128, 128, 8, 2)],
    128: [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 2), _cfg(64, 64, 4, 3)],
    256: [_cfg(64, 32, 8, 2), _cfg(64, 32, 4, 2)],
}
FWD_TMA_BLOCK_N = {dp: cfgs[0].kwargs["BLOCK_N"] for dp, cfgs in FWD_TMA_CONFIGS.items()}
_FWD_KEY = ["Nq", "Nk", "D", "HAS_RES", "HAS_STATE", "ROPE"]
_fwd_tuned = _tuned(_fwd_kernel, FWD_CONFIGS, key=_FWD_KEY)
_fwd_tma_tuned = _tuned(_fwd_kernel, FWD_TMA_CONFIGS, key=_FWD_KEY)


def launch(kernel, tuned, grid_fn, dp, args, consts):
    """Runs ``kernel`` with autotuned blocks on CUDA and the single interpreter config on CPU."""
    if _backend.INTERPRET and not args[0].is_cuda:
        blocks = INTERPRET_BLOCKS
        kernel[grid_fn(blocks)](*args, **consts, **blocks)
    else:
        tuned(dp, args[0].dtype)[grid_fn](*args, **consts)


def empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the kernels write comes from here (the tests swap in a NaN-poisoning version)."""
    return torch.empty(shape, dtype=dtype, device=device)


def logit_factors(scale: float, prev_scale: float):
    """``(c_qk, ratio)`` with ``S log2(e) = c_qk (<q, k> + ratio tanh(g) <q_prev, k_prev>)``; for
    ``scale == 0`` (``QK_ZERO``: the kernels drop ``q``) ``c_qk = log2(e)``, ``ratio = prev_scale``."""
    return (scale * LOG2E, prev_scale / scale) if scale != 0 else (LOG2E, prev_scale)


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs must not silently drop to tf32 (SPEC: float32 works at float32 accuracy)
    return "ieee" if dtype == torch.float32 else "tf32"


def head_dim_pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def inv_freq_table(d: int, theta: float, device) -> torch.Tensor:
    from .reference import rope_2d_inv_freq

    return rope_2d_inv_freq(d, theta, device)


ROPE_BLOCK = 32


def rope(x, grid, theta, *, inverse=False, dtype=None):
    """A fresh contiguous copy of ``x`` (B, N, H, D) rotated by 2D RoPE on ``grid`` (or by its inverse,
    for gradients), rounded to ``dtype`` (default: x's). Same rotation code as the attention kernel."""
    b, n, h, d = x.shape
    y = empty(x.shape, dtype or x.dtype, x.device)
    _rope_kernel[(triton.cdiv(n, ROPE_BLOCK), b * h)](  # under the caller's device guard
        x, y, inv_freq_table(d, theta, x.device), *x.stride(), n, h, grid[1],
        D=d, DP=head_dim_pad(d), BLOCK=ROPE_BLOCK, INVERSE=inverse)
    return y


def forward(q, k, v, q_prev, k_prev, tanh_gate, out_c, lse_c, scale, prev_scale, rope_grid, rope_theta, lse_dtype):
    """Launches the forward kernel (under the caller's device guard); returns ``(out, lse)``.
    ``tanh_gate``: float32 (B, Hq), any strides, or None.
    ``rope_grid``: queries rotated in the kernel, keys just before it (see below)."""
    b, nq, hq, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    has_res = q_prev is not None
    has_state = out_c is not None
    has_rope = rope_grid is not None
    out = empty(q.shape, q.dtype, q.device)
    lse = empty((b, hq, nq), lse_dtype, q.device)
    invf = inv_freq_table(d, rope_theta, q.device) if has_rope else q
    if has_rope:
        # Keys are rotated once here (O(Nk Hkv D), Hkv is small) rather than in the key loop, where
        # every query tile of every head of the GQA group would recompute the same cos/sin and the
        # elementwise work would keep the K loads from being pipelined into the dot. Queries are
        # rotated in the kernel, once per program.
        k = rope(k, rope_grid, rope_theta)
        if has_res:
            k_prev = rope(k_prev, rope_grid, rope_theta)
    qp, kp, tg = (q_prev, k_prev, tanh_gate) if has_res else (q, k, q)
    oc, lc = (out_c, lse_c) if has_state else (q, lse)
    dp = head_dim_pad(d)
    args = (q, k, v, qp, kp, tg, oc, lc, invf, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *qp.stride(), *kp.stride(), *oc.stride(), *lc.stride(),
            *tg.stride()[:2], *out.stride(), nq, nk, hq, hq // hkv, rope_grid[1] if has_rope else 1,
            *logit_factors(scale, prev_scale))
    consts = dict(D=d, DP=dp, HAS_RES=has_res, HAS_STATE=has_state, ROPE=has_rope, QK_ZERO=scale == 0,
                  DOT_PREC=dot_precision(q.dtype))
    grid = lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), b * hq)  # noqa: E731
    tma = _tma.enabled(q)
    if tma:  # K, V, K_prev tiles by TMA
        bn = INTERPRET_BLOCKS["BLOCK_N"] if _backend.INTERPRET else FWD_TMA_BLOCK_N[dim_class(dp)]
        args = list(args)
        for i in (1, 2, 4):  # K, V, KP
            args[i] = _tma.descriptor(_tma.addressable(args[i]), bn, dp)
    launch(_fwd_kernel, _fwd_tma_tuned if tma else _fwd_tuned, grid, dp, args, dict(consts, TMA=tma))
    return out, lse
