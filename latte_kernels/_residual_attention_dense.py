"""Plain-PyTorch pieces of ``residual_attention``'s backward (no Triton needed).

``dense_backward`` is the gradient where the kernels do not run (float64, CPU without the
interpreter, other devices). It spells out the same formulas as the kernels (see
``_residual_attention_bwd``) on the materialised ``Nq x Nk`` logits, like the reference forward;
an op's body runs below autograd, so it cannot simply differentiate the reference. The tests check
it against the reference's autograd and ``gradcheck``.
"""
from __future__ import annotations

import torch

from .reference import rope_2d_inv_freq, zero_empty_rows


def rope_cos_sin(n: int, grid, d: int, theta: float, device):
    """float32 (N, 1, D/2) cos and sin of the 2D RoPE angles (SPEC 2.1), computed as the reference does."""
    gw = grid[1]
    pos = torch.arange(n, device=device)
    rows, cols = (pos // gw).to(torch.float32), (pos % gw).to(torch.float32)
    invf = rope_2d_inv_freq(d, theta, device)
    angle = torch.cat([rows[:, None] * invf, cols[:, None] * invf], dim=-1)
    return angle.cos()[:, None, :], angle.sin()[:, None, :]


def rotate(x, cos, sin, inverse: bool, dtype=None):
    """Rotates pairs (j, j + D/2) of a (B, N, H, D) tensor by +angle (or -angle), in float32 (float64
    for float64 tensors), rounding once to ``dtype`` (default: x's)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = cos.to(acc), sin.to(acc)
    x1, x2 = x.to(acc).chunk(2, dim=-1)
    if inverse:
        out = torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)
    else:
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(dtype or x.dtype)


def _heads(t, acc, hq=None):
    """(B, N, H, D) -> (B, Hq, N, D) in ``acc``, kv heads repeated for their GQA group."""
    t = t.transpose(1, 2).to(acc)
    return t if hq is None else t.repeat_interleave(hq // t.shape[1], dim=1)


def _fold(t, hkv):
    """(B, Hq, N, D) gradient of repeated kv heads -> (B, N, Hkv, D), summed over each group."""
    b, hq, n, d = t.shape
    return t.view(b, hkv, hq // hkv, n, d).sum(2).transpose(1, 2)


def dense_backward(dout, dlse, q, k, v, q_prev, k_prev, gate, out_c, lse_c, out, lse,
                   scale, prev_scale, rope_grid, rope_theta):
    """(dq, dk, dv, dq_prev, dk_prev, dgate, dout_c, dlse_c), ``None`` for inputs not given."""
    acc = torch.float64 if torch.float64 in (q.dtype, lse.dtype) else torch.float32
    b, nq, hq, d = q.shape
    hkv = k.shape[2]
    has_res = q_prev is not None
    if rope_grid is not None:
        cos, sin = rope_cos_sin(nq, rope_grid, d, rope_theta, q.device)
        q, k = rotate(q, cos, sin, False), rotate(k, cos, sin, False)
        if has_res:
            q_prev, k_prev = rotate(q_prev, cos, sin, False), rotate(k_prev, cos, sin, False)
    qh, kh, vh = _heads(q, acc), _heads(k, acc, hq), _heads(v, acc, hq)
    logits = scale * qh @ kh.transpose(-1, -2)
    if has_res:
        tg = torch.tanh(gate.to(acc))[:, :, None, None]
        qph, kph = _heads(q_prev, acc), _heads(k_prev, acc, hq)
        prev = qph @ kph.transpose(-1, -2)
        logits = logits + tg * prev_scale * prev
    lse_a = lse.to(acc)
    p = torch.exp(logits - lse_a[..., None])  # share of the union softmax (state included)
    do = _heads(dout, acc)
    delta = (do * _heads(out, acc)).sum(-1) - dlse.to(acc)
    ds = p * (do @ vh.transpose(-1, -2) - delta[..., None])
    dsT = ds.transpose(-1, -2)
    dq = scale * ds @ kh
    dk = _fold(scale * dsT @ qh, hkv)
    dv = _fold(p.transpose(-1, -2) @ do, hkv)
    dqp = dkp = dgate = dout_c = dlse_c = None
    if has_res:
        dqp = tg * prev_scale * ds @ kph
        dkp = _fold(tg * prev_scale * dsT @ qph, hkv)
        dgate = ((1 - tg[:, :, 0, 0] ** 2) * prev_scale * (ds * prev).sum((-1, -2))).to(gate.dtype).contiguous()
    if out_c is not None:
        lc = lse_c.to(acc)
        w = torch.where(torch.isneginf(lc), torch.zeros_like(lc), torch.exp(lc - lse_a))
        dout_c = (w[..., None] * do).transpose(1, 2).to(out_c.dtype)
        oc = zero_empty_rows(out_c, lse_c, acc)  # an empty state's out_c may hold NaN: never read
        dlse_c = (w * ((do * _heads(oc, acc)).sum(-1) - delta)).to(lse_c.dtype).contiguous()
    dq = dq.transpose(1, 2)
    dqp = None if dqp is None else dqp.transpose(1, 2)
    if rope_grid is not None:
        dq, dk = rotate(dq, cos, sin, True), rotate(dk, cos, sin, True)
        if has_res:
            dqp, dkp = rotate(dqp, cos, sin, True), rotate(dkp, cos, sin, True)
    cast = lambda t, like: None if t is None else t.to(like.dtype).contiguous()  # noqa: E731
    return (cast(dq, q), cast(dk, k), cast(dv, v), cast(dqp, q), cast(dkp, k), dgate,
            None if dout_c is None else dout_c.contiguous(), dlse_c)
