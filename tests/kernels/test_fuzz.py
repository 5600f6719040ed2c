"""Seeded differential fuzz of every public op against an independent float64 formulation of SPEC 2
(written from the formulas here, sharing no code with ``latte_kernels.reference``): random sizes, GQA
ratios, features, argument layouts (contiguous, transposed, sliced, expanded), empty state rows whose
output holds NaN, forward and gradients; and malformed calls of the public functions and the
registered ops, which must raise ValueError/TypeError and nothing else.

CI runs a few seeded cases of each; the long run is ``python tests/kernels/test_fuzz.py --cases 3000``
(with and without ``TRITON_INTERPRET=1``).
"""
import math
import random
import sys

import pytest
import torch

import latte_kernels as lk
from latte_kernels.context_attention import ensure_registered

f64 = torch.float64
NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------------
# The float64 oracle, from SPEC 2


def o_rotate(x, angle):
    """x (B, N, H, D) float64, angle (B, N, D/2): pairs (j, j + D/2)."""
    p = x.shape[-1] // 2
    c, s = angle.cos()[:, :, None, :], angle.sin()[:, :, None, :]
    x1, x2 = x[..., :p], x[..., p:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def o_rope_2d(x, grid, theta=10000.0, positions=None):
    b, n, _, d = x.shape
    if positions is None:
        idx = torch.arange(n)
        positions = torch.stack([idx // grid[1], idx % grid[1]])[:, None, :].expand(2, b, n)
    q = d // 4
    inv = theta ** (-4.0 * torch.arange(q, dtype=f64) / d)
    j = torch.arange(d // 2)
    pos = torch.where(j < q, positions[0][..., None], positions[1][..., None]).to(f64)
    return o_rotate(x, pos * inv[j % q])


def o_mrope(x, positions, mrope_section, theta):
    section = mrope_section
    d = x.shape[-1]
    inv = theta ** (-2.0 * torch.arange(d // 2, dtype=f64) / d)
    axis = torch.tensor(sum(([i] * s for i, s in enumerate(section)), []))
    pos = positions.to(f64)[axis].permute(1, 2, 0)  # (B, N, D/2)
    return o_rotate(x, pos * inv)


def o_merge(out_a, lse_a, out_b, lse_b):
    """SPEC 2.3, with a -inf side exactly absent (its output never touched)."""
    ea, eb = torch.isneginf(lse_a), torch.isneginf(lse_b)
    la, lb = lse_a.masked_fill(ea, 0.0), lse_b.masked_fill(eb, 0.0)
    m = torch.maximum(la, lb)
    wa = torch.exp(la - m).masked_fill(ea, 0.0)
    wb = torch.exp(lb - m).masked_fill(eb, 0.0)
    tot = wa + wb
    both = ea & eb
    tot_safe = tot.masked_fill(both, 1.0)
    lse = (m + torch.log(tot_safe)).masked_fill(both, NEG_INF)
    t = lambda w: (w / tot_safe).transpose(1, 2)[..., None]  # noqa: E731
    oa = out_a.masked_fill(ea.transpose(1, 2)[..., None], 0.0)
    ob = out_b.masked_fill(eb.transpose(1, 2)[..., None], 0.0)
    return t(wa) * oa + t(wb) * ob, lse


def o_attend(logits, valid, v, hq):
    """logits (B, Hq, Nq, Nk) with valid (B, 1, 1, Nk) keys; v (B, Nk, Hkv, D)."""
    any_key = valid.any(-1)  # (B, 1, 1)
    z = logits.masked_fill(~valid, NEG_INF)
    m = z.amax(-1, keepdim=True).masked_fill(~any_key[..., None], 0.0)
    e = torch.exp(z - m).masked_fill(~valid, 0.0)
    s = e.sum(-1, keepdim=True)
    s_safe = s.masked_fill(s == 0, 1.0)
    vh = v.transpose(1, 2).repeat_interleave(hq // v.shape[2], 1).masked_fill(~valid[:, :, 0, :, None], 0.0)
    out = (e / s_safe) @ vh
    lse = (m + torch.log(s_safe)).squeeze(-1).masked_fill(s.squeeze(-1) == 0, NEG_INF)
    return out.transpose(1, 2), lse


def o_dot(q, k):
    hq = q.shape[2]
    return q.transpose(1, 2) @ k.transpose(1, 2).repeat_interleave(hq // k.shape[2], 1).transpose(-1, -2)


def o_context(q, k, v, ctx_lens, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    nc = k.shape[1]
    lens = torch.full((q.shape[0],), nc) if ctx_lens is None else ctx_lens.long()
    valid = (torch.arange(nc)[None, :] < lens[:, None])[:, None, None, :]
    k = k.masked_fill(~valid[:, 0, 0, :, None, None], 0.0)
    return o_attend(scale * o_dot(q, k), valid, v, q.shape[2])


def o_residual(q, k, v, q_prev=None, k_prev=None, gate=None, scale=None, prev_scale=None, state=None, rope_grid=None,
               rope_theta=10000.0):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    prev_scale = scale if prev_scale is None else prev_scale
    if rope_grid is not None:
        q, k = o_rope_2d(q, rope_grid, rope_theta), o_rope_2d(k, rope_grid, rope_theta)
        if q_prev is not None:
            q_prev, k_prev = o_rope_2d(q_prev, rope_grid, rope_theta), o_rope_2d(k_prev, rope_grid, rope_theta)
    logits = scale * o_dot(q, k)
    if q_prev is not None:
        logits = logits + torch.tanh(gate)[:, :, None, None] * prev_scale * o_dot(q_prev, k_prev)
    valid = torch.ones(q.shape[0], 1, 1, k.shape[1], dtype=torch.bool)
    out, lse = o_attend(logits, valid, v, q.shape[2])
    return (out, lse) if state is None else o_merge(state[0], state[1], out, lse)


def o_latte(q, k, v, grid_hw, *, k_ctx, v_ctx, ctx_lens=None, q_prev=None, k_prev=None, gate=None, scale=None,
            rope_theta=10000.0):
    state = o_context(o_rope_2d(q, grid_hw, rope_theta), k_ctx, v_ctx, ctx_lens, scale)
    return o_residual(q, k, v, q_prev, k_prev, gate, scale, scale, state, grid_hw, rope_theta)[0]


# --------------------------------------------------------------------------------------------------
# Random well-formed calls


def layout(t, kind, batch_dim=0):
    """A view of ``t``'s values in a random memory layout (``expanded`` repeats batch entry 0)."""
    if kind == "transposed" and t.dim() >= 2:
        perm = list(range(t.dim()))[::-1]
        return t.permute(perm).contiguous().permute(perm)
    if kind == "sliced":
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., 1::2] = t
        return big[..., 1::2]
    if kind == "expanded" and t.shape[batch_dim] > 1:
        return t.narrow(batch_dim, 0, 1).expand(t.shape)
    return t


KINDS = ("contiguous", "transposed", "sliced", "expanded")


def random_call(rng: random.Random):
    """(name, lk function, oracle, args, kwargs) of one random well-formed call."""
    op = rng.choice(["rope_2d", "mrope", "merge", "context", "residual", "latte", "residual", "latte"])
    b = rng.randint(1, 3)
    hkv = rng.choice([1, 2])
    hq = hkv * rng.choice([1, 2, 3])
    d = rng.choice([8, 16, 24, 32, 40, 64])
    gh, gw = rng.randint(1, 6), rng.randint(1, 7)
    n = gh * gw
    lay = lambda t, bd=0: layout(t, rng.choice(KINDS), bd)  # noqa: E731
    r = lambda *s: torch.randn(*s)  # noqa: E731
    if op == "rope_2d":
        x = lay(r(b, n, hq, d))
        if rng.random() < 0.5:
            return op, lk.rope_2d, o_rope_2d, (x, (gh, gw)), {}
        pos = lay(torch.randint(0, 64, (2, b, n)), 1)
        return op, lk.rope_2d, o_rope_2d, (x, None), dict(positions=pos)
    if op == "mrope":
        cut = sorted(rng.randint(0, d // 2) for _ in range(2))
        section = (cut[0], cut[1] - cut[0], d // 2 - cut[1])
        pos = lay(torch.randint(0, 64, (3, b, n)), 1)
        return op, lk.mrope, o_mrope, (lay(r(b, n, hq, d)), pos), dict(mrope_section=section, theta=1e4)
    if op == "merge":
        lse_a, lse_b = 3 * r(b, hq, n), 3 * r(b, hq, n)
        out_a, out_b = r(b, n, hq, d), r(b, n, hq, d)
        for lse, out in ((lse_a, out_a), (lse_b, out_b)):
            # the same rows in every batch entry, so an expanded view of either keeps them paired
            empty = (torch.rand(1, hq, n) < 0.25).expand(b, hq, n)
            lse[empty] = NEG_INF
            out.masked_fill_(empty.transpose(1, 2)[..., None], float("nan"))  # an empty side's output: garbage
        return op, lk.merge_attention_states, o_merge, (lay(out_a), lay(lse_a), lay(out_b), lay(lse_b)), {}
    nc = rng.randint(1, 9)
    lens = None if rng.random() < 0.2 else torch.tensor([rng.randint(0, nc) for _ in range(b)])
    if lens is not None:
        lens = lay(lens)
    kv_kind = rng.choice(KINDS)
    kc, vc = r(b, nc, hkv, d), r(b, nc, hkv, d)
    if lens is not None:  # padded slots hold NaN: they do not exist (an expanded cache repeats batch
        # entry 0, so there only the slots no batch entry uses)
        used = lens.max() if kv_kind == "expanded" else lens[:, None]
        pad = (torch.arange(nc)[None, :] >= used)[..., None, None].expand(kc.shape)
        kc, vc = kc.masked_fill(pad, float("nan")), vc.masked_fill(pad, float("nan"))
    kc, vc = layout(kc, kv_kind), layout(vc, kv_kind)
    if op == "context":
        return op, lk.context_attention, o_context, (lay(r(b, n, hq, d)), kc, vc, lens), {}
    nk = n if (op == "latte" or rng.random() < 0.5) else rng.randint(1, 40)
    q, k, v = lay(r(b, n, hq, d)), lay(r(b, nk, hkv, d)), lay(r(b, nk, hkv, d))
    kw = {}
    if rng.random() < 0.7:
        kw.update(q_prev=lay(r(b, n, hq, d)), k_prev=lay(r(b, nk, hkv, d)), gate=lay(2 * r(b, hq)))
    if op == "latte":
        kw.update(k_ctx=kc, v_ctx=vc, ctx_lens=lens)
        return op, lk.latte_attention, o_latte, (q, k, v, (gh, gw)), kw
    if rng.random() < 0.6:
        lse_c = r(b, hq, n) + 1.0
        out_c = r(b, n, hq, d)
        empty = (torch.rand(1, hq, n) < 0.25).expand(b, hq, n)
        lse_c[empty] = NEG_INF
        out_c.masked_fill_(empty.transpose(1, 2)[..., None], float("nan"))
        kw["state"] = (lay(out_c), lay(lse_c))
    if nk == n and rng.random() < 0.5:
        kw["rope_grid"] = (gh, gw)
    kw.update(scale=rng.uniform(0.05, 0.5), prev_scale=rng.uniform(0.05, 0.5))
    return op, lk.residual_attention, o_residual, (q, k, v), kw


def _leaves(args, kw):
    """Floating tensors of a call, as (path, tensor) pairs."""
    found = [((i,), t) for i, t in enumerate(args) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    for key, val in kw.items():
        if isinstance(val, torch.Tensor) and val.is_floating_point():
            found.append(((key,), val))
        elif isinstance(val, tuple):
            found += [((key, j), t) for j, t in enumerate(val) if isinstance(t, torch.Tensor)]
    return found


def _substitute(args, kw, new):
    args, kw = list(args), dict(kw)
    for path, t in new.items():
        if len(path) == 1 and isinstance(path[0], int):
            args[path[0]] = t
        elif len(path) == 1:
            kw[path[0]] = t
        else:
            pair = list(kw[path[0]])
            pair[path[1]] = t
            kw[path[0]] = tuple(pair)
    return args, kw


def _run(fn, args, kw, dtype, cots):
    leaves = {p: t.detach().to(dtype).requires_grad_() for p, t in _leaves(args, kw)}
    a, k = _substitute(args, kw, leaves)
    outs = fn(*a, **k)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.masked_fill(torch.isneginf(o), 0.0) * c.to(o.dtype)).sum() for o, c in zip(outs, cots))
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return [o.detach() for o in outs], dict(zip(leaves, grads))


def check_case(seed: int):
    """Runs one random well-formed call; returns a list of problems (empty when it agrees)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    name, fn, oracle, args, kw = random_call(rng)
    with torch.no_grad():
        a64, kw64 = _substitute(args, kw, {p: t.to(f64) for p, t in _leaves(args, kw)})
        shapes = oracle(*a64, **kw64)
    shapes = shapes if isinstance(shapes, tuple) else (shapes,)
    cots = [torch.randn(s.shape, dtype=f64) for s in shapes]
    got_outs, got_grads = _run(fn, args, kw, torch.float32, cots)
    want_outs, want_grads = _run(oracle, args, kw, f64, cots)
    problems = []

    def compare(what, g, w, tol):
        if g is None or w is None:
            if not (g is None and (w is None or not w.abs().max() > 0)):
                problems.append(f"{what}: one side has no gradient")
            return
        if not torch.equal(torch.isneginf(g), torch.isneginf(w)) or not torch.isfinite(g.masked_fill(torch.isneginf(w), 0)).all():
            problems.append(f"{what}: -inf/NaN pattern differs")
            return
        g, w = g.double().masked_fill(torch.isneginf(w), 0), w.masked_fill(torch.isneginf(w), 0)
        err = (g - w).abs().max().item() if g.numel() else 0.0
        bound = tol * (1 + w.abs().max().item()) if w.numel() else 0.0
        if err > bound:
            problems.append(f"{what}: max error {err:.2e} > {bound:.2e}")

    for i, (g, w) in enumerate(zip(got_outs, want_outs)):
        compare(f"output {i}", g, w, 2e-5)
    for path in want_grads:
        compare(f"grad {path}", got_grads[path], want_grads[path], 1e-4)
    return name, problems


# --------------------------------------------------------------------------------------------------
# Malformed calls: one argument of a valid call broken at a time


def _valid_direct_calls():
    """(name, callable(args), args) of each public function and registered op at one valid shape."""
    ensure_registered()
    b, n, hq, hkv, d, nc = 2, 12, 4, 2, 16, 5
    r = torch.randn
    q, k, v, qp, kp = r(b, n, hq, d), r(b, n, hkv, d), r(b, n, hkv, d), r(b, n, hq, d), r(b, n, hkv, d)
    gate, oc, lc, lse = r(b, hq), r(b, n, hq, d), r(b, hq, n), r(b, hq, n)
    kc, vc, lens = r(b, nc, hkv, d), r(b, nc, hkv, d), torch.tensor([5, 2])
    pos2, pos3 = torch.zeros(2, b, n, dtype=torch.long), torch.zeros(3, b, n, dtype=torch.long)
    L, X = torch.ops.latte, torch.ops.latte_ext
    return [
        ("lk.rope_2d", lambda a: lk.rope_2d(a[0], (3, 4)), [q]),
        ("lk.rope_2d positions", lambda a: lk.rope_2d(a[0], None, positions=a[1]), [q, pos2]),
        ("lk.mrope", lambda a: lk.mrope(a[0], a[1], mrope_section=(2, 3, 3)), [q, pos3]),
        ("lk.merge", lambda a: lk.merge_attention_states(*a), [q, lse, oc, lc]),
        ("lk.context", lambda a: lk.context_attention(*a), [q, kc, vc, lens]),
        ("lk.residual", lambda a: lk.residual_attention(a[0], a[1], a[2], q_prev=a[3], k_prev=a[4], gate=a[5],
                                                        state=(a[6], a[7]), rope_grid=(3, 4)), [q, k, v, qp, kp, gate, oc, lc]),
        ("lk.latte", lambda a: lk.latte_attention(a[0], a[1], a[2], (3, 4), k_ctx=a[3], v_ctx=a[4], ctx_lens=a[5],
                                                  q_prev=a[6], k_prev=a[7], gate=a[8]), [q, k, v, kc, vc, lens, qp, kp, gate]),
        ("latte::rope_2d", lambda a: L.rope_2d(a[0], a[1], 0, 1e4, False), [q, pos2]),
        ("latte::mrope", lambda a: L.mrope(a[0], a[1], [2, 3, 3], 1e6, False), [q, pos3]),
        ("latte::merge_attention_states", lambda a: L.merge_attention_states(*a), [q, lse, oc, lc]),
        ("latte::merge_attention_states_backward", lambda a: L.merge_attention_states_backward(*a),
         [q, lse, q, lse, oc, lc]),
        ("latte::residual_attention", lambda a: L.residual_attention(*a, 0.3, 0.2, [3, 4], 1e4),
         [q, k, v, qp, kp, gate, oc, lc]),
        ("latte::residual_attention_backward", lambda a: L.residual_attention_backward(*a, 0.3, 0.2, [3, 4], 1e4),
         [q, lse, q, k, v, qp, kp, gate, oc, lc, q, lse]),
        ("latte::latte_attention", lambda a: L.latte_attention(a[0], a[1], a[2], [3, 4], *a[3:], None, 1e4),
         [q, k, v, kc, vc, lens, qp, kp, gate]),
        ("latte_ext::context_attention", lambda a: X.context_attention(*a, 0.25), [q, kc, vc, lens]),
        ("latte_ext::context_attention_backward", lambda a: X.context_attention_backward(*a, 0.25),
         [q, lse, q, kc, vc, lens, q, lse]),
    ]


def _break(t: torch.Tensor, rng: random.Random):
    """One malformation of a tensor argument: (what, the tensor)."""
    how = rng.choice(["shrink", "grow", "rank-", "rank+", "dtype", "lse111", "empty", "head_dim", "meta"])
    if how == "shrink" and t.dim() and max(t.shape) > 1:
        dim = rng.choice([i for i, s in enumerate(t.shape) if s > 1])
        return f"shrink{dim}", t.narrow(dim, 0, t.shape[dim] - 1)
    if how == "grow" and t.dim():
        dim = rng.randrange(t.dim())
        return f"grow{dim}", torch.cat([t, t.narrow(dim, 0, 1)], dim)
    if how == "rank-" and t.dim() > 1:
        return how, t[0]
    if how == "rank+":
        return how, t[None]
    if how == "dtype":
        return how, t.to(torch.int32 if t.is_floating_point() else torch.float32)
    if how == "lse111":
        return how, torch.zeros((1,) * t.dim(), dtype=t.dtype)
    if how == "empty" and t.dim():
        return how, t.narrow(0, 0, 0)
    if how == "head_dim" and t.dim() == 4:
        return how, t[..., :rng.choice([0, 3, 12])]
    if how == "meta":
        return how, t.to("meta")
    return "rank+", t[None]


def check_malformed(seed: int):
    """Breaks one argument of one valid call; returns a problem string or None."""
    rng = random.Random(seed)
    calls = _valid_direct_calls()
    name, call, args = calls[rng.randrange(len(calls))]
    i = rng.randrange(len(args))
    how, bad = _break(args[i], rng)
    args = list(args)
    args[i] = bad
    try:
        call(args)
    except (ValueError, TypeError):
        return None
    except Exception as e:  # noqa: BLE001  (anything else is the finding)
        return f"{name} arg {i} {how}: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    # breaks that leave a valid call: another head count (or, alone, batch or device) of the one tensor
    # RoPE rotates, another query count of context attention
    rope = name in ("lk.rope_2d", "lk.rope_2d positions", "lk.mrope", "latte::rope_2d", "latte::mrope")
    if rope and i == 0 and how in ("shrink2", "grow2"):
        return None
    if name == "lk.rope_2d" and how in ("shrink0", "grow0", "meta"):
        return None
    if name in ("lk.context", "latte_ext::context_attention") and i == 0 and how in ("shrink1", "grow1"):
        return None
    return f"{name} arg {i} {how} {tuple(bad.shape)} {bad.dtype}: no error"


# --------------------------------------------------------------------------------------------------
# CI: a compact seeded run


@pytest.mark.parametrize("seed", range(24))
def test_random_calls_match_the_float64_formulation(seed):
    name, problems = check_case(seed)
    assert not problems, f"seed {seed} ({name}): {problems}"


def test_malformed_calls_raise_value_or_type_errors():
    problems = [p for p in (check_malformed(s) for s in range(150)) if p]
    assert not problems, "\n".join(problems)


if __name__ == "__main__":
    import argparse
    import contextlib

    import helpers

    from tqdm import tqdm

    parser = argparse.ArgumentParser(description="the long differential fuzz")
    parser.add_argument("--cases", type=int, default=3000)
    parser.add_argument("--malformed", type=int, default=1000)
    parser.add_argument("--start", type=int, default=1000)
    parser.add_argument("--descriptors", action="store_true",
                        help="the residual-attention kernels' Hopper (TMA) path, on CPU under TRITON_INTERPRET=1")
    ns = parser.parse_args()
    fails = []
    with helpers.descriptor_path() if ns.descriptors else contextlib.nullcontext():
        for s in tqdm(range(ns.start, ns.start + ns.cases), desc="random calls"):
            name, problems = check_case(s)
            if problems:
                fails.append((s, name, problems))
    bad = [p for p in (check_malformed(s) for s in tqdm(range(ns.start, ns.start + ns.malformed), desc="malformed")) if p]
    print(f"random calls: {ns.cases - len(fails)}/{ns.cases} agree; malformed: {ns.malformed - len(bad)}/{ns.malformed} "
          f"raise ValueError/TypeError")
    for f in fails[:20]:
        print("MISMATCH", f)
    for p in bad[:40]:
        print("MALFORMED", p)
    sys.exit(1 if fails or bad else 0)
