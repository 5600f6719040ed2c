"""Backward Triton kernels of ``residual_attention`` and their launcher.

With ``P = exp(S - lse)`` (``lse`` the returned, state-merged LSE, so ``P`` is the share of the union
softmax) and ``O`` the returned output, the logits' gradient is ``dS = P * (dO v^T - D_i)`` with the
row term ``D_i = rowsum(dO * O) - dLSE_i``; the state's are ``w_c = exp(lse_c - lse)``,
``d out_c = w_c dO`` and ``d lse_c = w_c (rowsum(dO * out_c) - D_i)``. Then
``dq = scale dS k``, ``dq_prev = tanh(g) prev_scale dS k_prev``, ``dk = scale dS^T q``,
``dk_prev = prev_scale sum_h tanh(g_h) dS_h^T q_prev`` and
``dgate = (1 - tanh(g)^2) prev_scale sum_ij dS_ij <q_prev_i, k_prev_j>``. An empty state row
(``lse_c = -inf``, ``w_c = 0``) discards its ``out_c`` (it may hold NaN) and gets zero gradients.

The logits are one product over the concatenated head dim, ``S = k_mult (q . k^T + r q_prev . k_prev^T)``
with ``r = tanh(g) prev_scale / scale`` applied to the float32 residual half, as the forward does, so
``P`` recomputed here is the forward's (``k_mult = scale``; for ``scale == 0`` the kernels skip the
``q . k`` products and ``k_mult = 1``, ``r = tanh(g) prev_scale``). So ``dk = k_mult dS^T q``,
``dk_prev = k_mult sum_h (r_h dS_h)^T q_prev``; dq, dq_prev are accumulated as ``dS k`` and
``dS k_prev`` in float32 and scaled afterwards, and
``sum_ij dS_ij <q_prev_i, k_prev_j> = sum_i <q_prev_i, (dS k_prev)_i>`` gives dgate.

Default: two kernels. A row pass (``D_i`` and the state's gradients) and a key-major pass (one program
per key tile of one kv head, looping over the query heads of its GQA group and all query tiles: dk, dv,
dk_prev in registers, dq and dq_prev added into zeroed float32 buffers with atomics, as FlashAttention
2/3 do). That is 8 head_dim-sized products per (query tile, key tile) pair (SPEC 5), marked
``# product 1..8`` in ``_dkdv_kernel``. The atomics make dq's summation order vary between runs. On
Hopper (16-bit inputs) the key-major pass takes its query-side tiles and makes its dq additions through
tensor descriptors (``_tma``: TMA loads, bulk reductions), which is what keeps it spill-free at D=128.
Deterministic mode (``torch.use_deterministic_algorithms(True)``, see ``deterministic()``): the key-major
pass skips the atomics and a query-major pass (``_dq_kernel``) recomputes P and writes dq, dq_prev by
plain stores: bitwise reproducible, 11 products per tile pair. Both recompute ``P`` from ``lse``;
nothing of size ``Nq x Nk`` is stored. With ``rope_grid`` the inputs are rotated once (O(N), the
forward's rotation kernel) before these kernels and the float32 gradients rotated back after them.
Every input is read through its strides (``lse`` and ``tanh(gate)`` included: the op is public, its
caller may pass views).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _residual_attention_fwd as _fwd
from . import _backend, _tma
from ._residual_attention_fwd import LOG2E, LOG2E_C, _cfg, _tuned, dot_precision, head_dim_pad, launch


@triton.jit
def _rows_kernel(
    DO, O, LSE, DLSE, OC, LC, DELTA, DOC, DLC,
    sdob, sdon, sdoh, sdod,
    sob, son, soh, sod,
    socb, socn, soch, socd,
    slcb, slch, slcn,
    sdlb, sdlh, sdln,
    slb, slh, sln,
    Nq, Hq,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, HAS_STATE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DP)
    mask_m = offs_m < Nq
    mask_md = mask_m[:, None] & (offs_d < D)[None, :]
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_d[None, :] * sdod, mask=mask_md, other=0.0).to(tl.float32)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, mask=mask_md, other=0.0).to(tl.float32)
    dlse = tl.load(DLSE + b * sdlb + h * sdlh + offs_m * sdln, mask=mask_m, other=0.0).to(tl.float32)
    delta = tl.sum(do * o, 1) - dlse
    row = (b * Hq + h) * Nq + offs_m
    tl.store(DELTA + row, delta, mask=mask_m)
    if HAS_STATE:
        lse = tl.load(LSE + b * slb + h * slh + offs_m * sln, mask=mask_m, other=0.0).to(tl.float32)
        lc = tl.load(LC + b * slcb + h * slch + offs_m * slcn, mask=mask_m, other=float("-inf")).to(tl.float32)
        state_ok = lc != float("-inf")
        w = tl.where(state_ok, tl.exp(lc - lse), 0.0)
        oc = tl.load(OC + b * socb + h * soch + offs_m[:, None] * socn + offs_d[None, :] * socd,
                     mask=mask_md, other=0.0).to(tl.float32)
        doc = w[:, None] * do
        dlc = tl.where(state_ok, w * (tl.sum(do * oc, 1) - delta), 0.0)
        # DOC is a fresh contiguous (B, Nq, Hq, D) buffer
        tl.store(DOC + ((b * Nq + offs_m[:, None]) * Hq + h) * D + offs_d[None, :], doc.to(DOC.dtype.element_ty), mask=mask_md)
        tl.store(DLC + row, dlc.to(DLC.dtype.element_ty), mask=mask_m)


@triton.jit
def _dkdv_kernel(
    Q, K, V, QP, KP, TG, DO, LSE, DELTA, DK, DV, DKP, DQ, DQP,
    sqb, sqn, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    sqpb, sqpn, sqph, sqpd,
    skpb, skpn, skph, skpd,
    sdob, sdon, sdoh, sdod,
    slb, slh, sln,
    stgb, stgh,
    Nq, Nk, Hq, Hkv, GROUP,
    c_qk, k_mult, ratio,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_RES: tl.constexpr, QK_ZERO: tl.constexpr, ATOMIC_DQ: tl.constexpr, TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Key-major pass; with ``ATOMIC_DQ`` also dq and dq_prev (float32 atomics). With ``TMA`` (Hopper,
    16-bit) Q, QP, DO, DQ and DQP are tensor descriptors: the per-query-tile loads and the dq reductions
    are bulk copies, which keeps the three float32 accumulators and the dq tiles within the register
    file (sm90_compile.py). The logits have the queries on the M side (``S = q k^T``, BLOCK_M x BLOCK_N),
    so 8 warps split BLOCK_M = 128 rows without computing any tile twice. The products per (query tile,
    key tile) pair, marked ``# product i`` below: the logits over the concatenated head dim (1-2: the
    residual half ``q_prev . k_prev^T`` scaled by the gate ``r`` in float32, then ``q . k^T`` into the
    same accumulator), dv (3), dP (4), dk (5), dk_prev (6), dq (7), dq_prev (8). The gate reaches dk_prev
    through dS (``dk_prev += (r dS)^T q_prev``), so q_prev is used as loaded. Every product has BLOCK_N
    or BLOCK_M rows."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    b64 = b.to(tl.int64)
    hk = pid_bh % Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DP)
    mask_n = offs_n < Nk
    mask_nd = mask_n[:, None] & (offs_d < D)[None, :]

    k = tl.load(K + b64 * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=mask_nd, other=0.0)
    v = tl.load(V + b64 * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=mask_nd, other=0.0)
    dk = tl.zeros([BLOCK_N, DP], tl.float32)
    dv = tl.zeros([BLOCK_N, DP], tl.float32)
    if HAS_RES:
        kp = tl.load(KP + b64 * skpb + hk * skph + offs_n[:, None] * skpn + offs_d[None, :] * skpd, mask=mask_nd,
                     other=0.0)
        dkp = tl.zeros([BLOCK_N, DP], tl.float32)

    for g in range(0, GROUP):
        h = hk * GROUP + g
        if HAS_RES:
            fold = tl.load(TG + b64 * stgb + h * stgh).to(tl.float32) * ratio  # the gate r
        for start_m in range(0, Nq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < Nq
            # rows past Nq: lse = +inf gives them P = 0 (their q and dO tiles read as 0)
            lse2 = tl.load(LSE + b64 * slb + h * slh + offs_m * sln, mask=mask_m, other=float("inf")).to(tl.float32) \
                * LOG2E_C
            delta = tl.load(DELTA + (b64 * Hq + h) * Nq + offs_m, mask=mask_m, other=0.0)
            # logits (BLOCK_M, BLOCK_N): one product over the concatenated head dim
            s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            if HAS_RES:
                qp = _tma.rows(QP, b, h, start_m, sqpb, sqpn, sqph, sqpd, Nq, D, DP, BLOCK_M, TMA)
                s = tl.dot(qp, tl.trans(kp), input_precision=DOT_PREC) * fold  # product 2
            q = _tma.rows(Q, b, h, start_m, sqb, sqn, sqh, sqd, Nq, D, DP, BLOCK_M, TMA)
            if not QK_ZERO:  # scale == 0: the q . k term vanishes, k_mult = 1 carries the residual alone
                s = tl.dot(q, tl.trans(k), s, input_precision=DOT_PREC)  # product 1
            p = tl.where(mask_n[None, :], tl.exp2(s * c_qk - lse2[:, None]), 0.0)
            do = _tma.rows(DO, b, h, start_m, sdob, sdon, sdoh, sdod, Nq, D, DP, BLOCK_M, TMA)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)  # product 3
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # product 4
            ds = p * (dp - delta[:, None])
            ds16 = ds.to(do.dtype)
            if not QK_ZERO:
                dk += tl.dot(tl.trans(ds16), q, input_precision=DOT_PREC)  # product 5
            if HAS_RES:
                dkp += tl.dot(tl.trans((ds * fold).to(do.dtype)), qp, input_precision=DOT_PREC)  # product 6
            if ATOMIC_DQ:  # DQ, DQP: zeroed contiguous float32 (B, Nq, Hq, D) buffers of dS k and dS k_prev
                dq = tl.dot(ds16, k, input_precision=DOT_PREC)  # product 7
                _tma.add_rows(DQ, dq, b, h, start_m, Nq, Hq, D, DP, BLOCK_M, TMA)
                if HAS_RES:
                    dqp = tl.dot(ds16, kp, input_precision=DOT_PREC)  # product 8
                    _tma.add_rows(DQP, dqp, b, h, start_m, Nq, Hq, D, DP, BLOCK_M, TMA)

    # DK, DV, DKP are fresh contiguous (B, Nk, Hkv, D) buffers
    out = ((b64 * Nk + offs_n[:, None]) * Hkv + hk) * D + offs_d[None, :]
    tl.store(DK + out, (dk * k_mult).to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask_nd)
    if HAS_RES:
        tl.store(DKP + out, (dkp * k_mult).to(DKP.dtype.element_ty), mask=mask_nd)


@triton.jit
def _dq_kernel(
    Q, K, V, QP, KP, TG, DO, LSE, DELTA, DQ, DQP,
    sqb, sqn, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    sqpb, sqpn, sqph, sqpd,
    skpb, skpn, skph, skpd,
    sdob, sdon, sdoh, sdod,
    slb, slh, sln,
    stgb, stgh,
    Nq, Nk, Hq, GROUP,
    c_qk, ratio,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_RES: tl.constexpr, QK_ZERO: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Deterministic mode's query-major pass: dS k and dS k_prev (float32, unscaled) by plain stores.
    Products per tile pair: logits (1-2), dP (3), dq (4), dq_prev (5)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DP)
    mask_m = offs_m < Nq
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=mask_md, other=0.0)
    if QK_ZERO:
        q = q * 0
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_d[None, :] * sdod, mask=mask_md, other=0.0)
    row = (b * Hq + h) * Nq + offs_m
    lse2 = tl.load(LSE + b * slb + h * slh + offs_m * sln, mask=mask_m, other=0.0).to(tl.float32) * LOG2E_C
    delta = tl.load(DELTA + row, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, DP], tl.float32)
    if HAS_RES:
        qp = tl.load(QP + b * sqpb + h * sqph + offs_m[:, None] * sqpn + offs_d[None, :] * sqpd, mask=mask_md, other=0.0)
        qp = (qp * (tl.load(TG + b * stgb + h * stgh).to(tl.float32) * ratio)).to(q.dtype)  # once per program
        dqp = tl.zeros([BLOCK_M, DP], tl.float32)

    for start_n in range(0, Nk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Nk
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=mask_nd, other=0.0)
        v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=mask_nd, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if HAS_RES:
            kp = tl.load(KP + b * skpb + hk * skph + offs_n[:, None] * skpn + offs_d[None, :] * skpd, mask=mask_nd, other=0.0)
            s = tl.dot(qp, tl.trans(kp), s, input_precision=DOT_PREC)
        p = tl.where(mask_m[:, None] & mask_n[None, :], tl.exp2(s * c_qk - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq += tl.dot(ds, k, input_precision=DOT_PREC)
        if HAS_RES:
            dqp += tl.dot(ds, kp, input_precision=DOT_PREC)

    out = ((b * Nq + offs_m[:, None]) * Hq + h) * D + offs_d[None, :]
    tl.store(DQ + out, dq, mask=mask_md)
    if HAS_RES:
        tl.store(DQP + out, dqp, mask=mask_md)


# Tiles: every product has BLOCK_M or BLOCK_N rows on its M side, so both are >= 64 for 16-bit inputs
# (wgmma needs 64; a 32-row side compiles to mma.sync). Hopper takes the descriptor path with one
# config per head-dim class (DKDV_TMA_CONFIGS: spill-free at D=64 and 128 in the JIT-faithful sm_90
# compile of Triton 3.6 and 3.9, tests/kernels/sm90_compile.py, NOTES.md; D=256 only fits shared
# memory); the autotuned pointer path (DKDV_CONFIGS) serves older GPUs and float32. Kept short: every
# user pays the autotuning on the first call of a shape.
DKDV_CONFIGS = {
    64: [_cfg(64, 64, 8, 1)],
    128: [_cfg(64, 64, 8, 2), _cfg(64, 64, 8, 1)],
    256: [_cfg(64, 64, 8, 1), _cfg(32, 32, 4, 1)],  # the second for GPUs with <= 163 KiB (A100)
    "fp32": [_cfg(32, 32, 4, 1), _cfg(16, 32, 4, 1)],
}
DKDV_TMA_CONFIGS = {64: _cfg(128, 64, 8, 2), 128: _cfg(128, 64, 8, 1), 256: _cfg(64, 64, 8, 1)}
DQ_CONFIGS = {  # deterministic mode only
    64: [_cfg(64, 64, 4, 2), _cfg(128, 64, 8, 2)],
    128: [_cfg(64, 64, 8, 2), _cfg(128, 64, 8, 2)],
    256: [_cfg(64, 32, 8, 1)],
    "fp32": [_cfg(32, 32, 4, 1)],
}
ROWS_BLOCK_M = 64

# the atomic pass accumulates into DQ / DQP: every autotune trial must start from zeros
_dkdv_tuned = _tuned(_dkdv_kernel, DKDV_CONFIGS, key=["Nq", "Nk", "D", "HAS_RES", "ATOMIC_DQ"],
                     reset_to_zero=["DQ", "DQP"])
_dq_tuned = _tuned(_dq_kernel, DQ_CONFIGS, key=["Nq", "Nk", "D", "HAS_RES"])


def deterministic() -> bool:
    """Deterministic mode: dq and dq_prev from a separate query-major pass (plain stores, bitwise
    reproducible, 11 products per tile pair instead of 8). On when
    ``torch.are_deterministic_algorithms_enabled()``; off by default (float32 atomics in the key-major
    pass, whose summation order varies from run to run)."""
    return torch.are_deterministic_algorithms_enabled()


def backward(dout, dlse, q, k, v, q_prev, k_prev, gate, tanh_gate, out_c, lse_c, out, lse,
             scale, prev_scale, rope_grid, rope_theta):
    """Launches the backward kernels (under the caller's device guard); returns (dq, dk, dv,
    dq_prev, dk_prev, dgate, dout_c, dlse_c), with ``None`` for the inputs that were not given."""
    b, nq, hq, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    has_res = q_prev is not None
    has_state = out_c is not None
    dp = head_dim_pad(d)
    dev = q.device
    dot_prec = dot_precision(q.dtype)

    delta = _fwd.empty((b, hq, nq), torch.float32, dev)
    dout_c = _fwd.empty(out_c.shape, out_c.dtype, dev) if has_state else None
    dlse_c = _fwd.empty((b, hq, nq), lse_c.dtype, dev) if has_state else None
    oc, lc = (out_c, lse_c) if has_state else (q, lse)
    rows_args = (dout, out, lse, dlse, oc, lc, delta, dout_c if has_state else delta, dlse_c if has_state else delta,
                 *dout.stride(), *out.stride(), *oc.stride(), *lc.stride(), *dlse.stride(), *lse.stride(), nq, hq)
    _rows_kernel[(triton.cdiv(nq, ROWS_BLOCK_M), b * hq)](
        *rows_args, D=d, DP=dp, BLOCK_M=ROWS_BLOCK_M, HAS_STATE=has_state)

    rope = rope_grid is not None
    if rope:  # rotate once here (O(N)), run the plain kernels, rotate the gradients back below
        q, k = _fwd.rope(q, rope_grid, rope_theta), _fwd.rope(k, rope_grid, rope_theta)
        if has_res:
            q_prev, k_prev = _fwd.rope(q_prev, rope_grid, rope_theta), _fwd.rope(k_prev, rope_grid, rope_theta)
    grad_dtype = torch.float32 if rope else q.dtype  # rotate back from float32, round once
    dk = _fwd.empty((b, nk, hkv, d), grad_dtype, dev)
    dv = _fwd.empty((b, nk, hkv, d), v.dtype, dev)
    dkp = _fwd.empty(dk.shape, dk.dtype, dev) if has_res else None
    # dS k and dS k_prev in float32, scaled below: zeroed for the atomics, written once otherwise
    atomic = not deterministic()
    alloc = (lambda shape: torch.zeros(shape, dtype=torch.float32, device=dev)) if atomic else \
        (lambda shape: _fwd.empty(shape, torch.float32, dev))
    dq_raw = alloc((b, nq, hq, d))
    dqp_raw = alloc((b, nq, hq, d)) if has_res else None
    qp, kp, tg = (q_prev, k_prev, tanh_gate) if has_res else (q, k, q)
    strides = (*q.stride(), *k.stride(), *v.stride(), *qp.stride(), *kp.stride(), *dout.stride(), *lse.stride(),
               *tg.stride()[:2])
    # S = k_mult (<q, k> + ratio tanh(g) <q_prev, k_prev>): the gate folded into the q_prev operand
    c_qk, ratio = _fwd.logit_factors(scale, prev_scale)
    k_mult = scale if scale != 0 else 1.0
    consts = dict(D=d, DP=dp, HAS_RES=has_res, QK_ZERO=scale == 0, DOT_PREC=dot_prec)
    dkdv_args = [q, k, v, qp, kp, tg, dout, lse, delta, dk, dv, dkp if has_res else dk, dq_raw,
                 dqp_raw if has_res else dq_raw, *strides, nq, nk, hq, hkv, hq // hkv, c_qk, k_mult, ratio]
    dkdv_grid = lambda meta: (triton.cdiv(nk, meta["BLOCK_N"]), b * hkv)  # noqa: E731
    if _tma.enabled(q):  # one config (no autotuning: nothing to re-zero between trials)
        config = DKDV_TMA_CONFIGS[_fwd.dim_class(dp)]
        blocks = dict(_fwd.INTERPRET_BLOCKS) if _backend.INTERPRET else \
            dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        for i in (0, 3, 6, 12, 13):  # Q, QP, DO, DQ, DQP
            dkdv_args[i] = _tma.descriptor(_tma.addressable(dkdv_args[i]), blocks["BLOCK_M"], dp)
        _dkdv_kernel[dkdv_grid(blocks)](*dkdv_args, **consts, ATOMIC_DQ=atomic, TMA=True, **blocks)
    else:
        launch(_dkdv_kernel, _dkdv_tuned, dkdv_grid, dp, dkdv_args, dict(consts, ATOMIC_DQ=atomic, TMA=False))
    if not atomic:
        launch(_dq_kernel, _dq_tuned, lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), b * hq), dp,
               (q, k, v, qp, kp, tg, dout, lse, delta, dq_raw, dqp_raw if has_res else dq_raw, *strides,
                nq, nk, hq, hq // hkv, c_qk, ratio), consts)

    dq = (dq_raw * scale).to(grad_dtype)
    dqp = dgate = None
    if has_res:
        # sum_ij dS_ij <q_prev_i, k_prev_j> = sum_i <q_prev_i, (dS k_prev)_i> (rotation-invariant)
        grow = torch.einsum("bnhd,bnhd->bh", q_prev.float(), dqp_raw)
        dgate = ((1 - tanh_gate * tanh_gate) * prev_scale * grow).to(gate.dtype).contiguous()
        dqp = (dqp_raw * (tanh_gate * prev_scale)[:, None, :, None]).to(grad_dtype)
    if rope:
        unrotate = lambda g: _fwd.rope(g, rope_grid, rope_theta, inverse=True, dtype=out.dtype)  # noqa: E731
        dq, dk = unrotate(dq), unrotate(dk)
        if has_res:
            dqp, dkp = unrotate(dqp), unrotate(dkp)
    return dq, dk, dv, dqp, dkp, dgate, dout_c, dlse_c
