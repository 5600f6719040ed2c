"""The registered ops are public (SPEC 1): ``torch.ops.latte.*`` and ``torch.ops.latte_ext.*``, the backward
ops included, called directly with malformed tensors raise ValueError/TypeError naming the argument,
never read out of bounds, never fail deep inside (IndexError, ZeroDivisionError, RuntimeError). The
same calls on meta tensors (the fake implementations torch.compile traces with) raise the same."""
import pytest
import torch

from latte_kernels import merge as _merge  # noqa: F401  (registers the latte ops)
from latte_kernels import latte_attention as _latte  # noqa: F401
from latte_kernels.context_attention import ensure_registered

ensure_registered()
ops, ext = torch.ops.latte, torch.ops.latte_ext
B, N, HQ, HKV, D, NC = 2, 12, 4, 2, 16, 5


def _args(device):
    t = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    a = dict(q=t(B, N, HQ, D), k=t(B, N, HKV, D), v=t(B, N, HKV, D), q_prev=t(B, N, HQ, D), k_prev=t(B, N, HKV, D),
             gate=t(B, HQ), out_c=t(B, N, HQ, D), lse_c=t(B, HQ, N), k_ctx=t(B, NC, HKV, D), v_ctx=t(B, NC, HKV, D),
             ctx_lens=torch.tensor([5, 2], device=device), lse=t(B, HQ, N), pos2=torch.zeros(2, B, N, dtype=torch.long,
                                                                                             device=device),
             pos3=torch.zeros(3, B, N, dtype=torch.long, device=device))
    a["lse1"] = t(1, 1, 1)
    return a


def _res(a, **over):
    """latte::residual_attention's arguments with some replaced."""
    names = ("q", "k", "v", "q_prev", "k_prev", "gate", "out_c", "lse_c")
    vals = {n: a[n] for n in names}
    vals.update(scale=0.25, prev_scale=0.25, rope_grid=[3, 4], rope_theta=10000.0)
    vals.update(over)
    return [vals[n] for n in (*names, "scale", "prev_scale", "rope_grid", "rope_theta")]


def _res_bwd(a, **over):
    grads = dict(dout=a["q"], dlse=a["lse"])
    saved = dict(out=a["q"], lse=a["lse"])
    for n in list(over):
        if n in grads:
            grads[n] = over.pop(n)
        elif n in saved:
            saved[n] = over.pop(n)
    full = _res(a, **over)
    return [grads["dout"], grads["dlse"], *full[:8], saved["out"], saved["lse"], *full[8:]]


def _latte_args(a, **over):
    vals = dict(q=a["q"], k=a["k"], v=a["v"], grid_hw=[3, 4], k_ctx=a["k_ctx"], v_ctx=a["v_ctx"], ctx_lens=a["ctx_lens"],
                q_prev=a["q_prev"], k_prev=a["k_prev"], gate=a["gate"], scale=None, rope_theta=10000.0)
    vals.update(over)
    return list(vals.values())


def _ctx_bwd(a, **over):
    vals = dict(grad_out=a["q"], grad_lse=a["lse"], q=a["q"], k_ctx=a["k_ctx"], v_ctx=a["v_ctx"], ctx_lens=a["ctx_lens"],
                out=a["q"], lse=a["lse"], scale=0.25)
    vals.update(over)
    return list(vals.values())


def cases(device):
    a = _args(device)
    x, q, lse = a["q"], a["q"], a["lse"]
    merge_bwd = lambda **o: [o.get("grad_out", q), o.get("grad_lse", lse), q, o.get("lse_a", lse), q, lse]  # noqa: E731
    return [
        # rope_2d / rope_2d_ / mrope / mrope_
        ("rope gw 0", ops.rope_2d, (x, None, 0, 1e4, False), ValueError, "gw"),
        ("rope gw not dividing N", ops.rope_2d, (x, None, 5, 1e4, False), ValueError, "gw"),
        ("rope positions batch", ops.rope_2d, (x, a["pos2"][:, :1], 0, 1e4, False), ValueError, "positions"),
        ("rope positions axes", ops.rope_2d, (x, a["pos3"], 0, 1e4, False), ValueError, "positions"),
        ("rope positions float", ops.rope_2d, (x, a["pos2"].float(), 0, 1e4, False), TypeError, "positions"),
        ("rope x rank", ops.rope_2d, (x[0], None, 4, 1e4, False), ValueError, "x must have 4 dimensions"),
        ("rope head_dim", ops.rope_2d, (x[..., :12], None, 4, 1e4, False), ValueError, "x head_dim"),
        ("rope theta", ops.rope_2d, (x, None, 4, -1.0, False), ValueError, "theta"),
        ("rope_ gw", ops.rope_2d_, (x.clone(), None, 0, 1e4), ValueError, "gw"),
        ("rope_ overlapping", ops.rope_2d_, (x[:1].expand(B, N, HQ, D), None, 4, 1e4), ValueError, "overlapping"),
        ("mrope positions axes", ops.mrope, (x, a["pos2"], [2, 3, 3], 1e6, False), ValueError, "positions"),
        ("mrope section sum", ops.mrope, (x, a["pos3"], [2, 3, 4], 1e6, False), ValueError, "mrope_section"),
        ("mrope section arity", ops.mrope, (x, a["pos3"], [4, 4], 1e6, False), TypeError, "mrope_section"),
        ("mrope_ positions", ops.mrope_, (x.clone(), a["pos3"][:, :, :5], [2, 3, 3], 1e6), ValueError, "positions"),
        # merge and its backward
        ("merge lse (1,1,1)", ops.merge_attention_states, (q, a["lse1"], q, lse), ValueError, "lse_a"),
        ("merge lse_b (1,1,1)", ops.merge_attention_states, (q, lse, q, a["lse1"]), ValueError, "lse_b"),
        ("merge out_b shape", ops.merge_attention_states, (q, lse, q[:, :5], lse), ValueError, "out_b"),
        ("merge head_dim", ops.merge_attention_states, (q[..., :12], lse, q[..., :12], lse), ValueError, "head_dim"),
        ("merge empty", ops.merge_attention_states, (q[:, :0], lse[..., :0], q[:, :0], lse[..., :0]), ValueError,
         "non-empty"),
        ("merge lse dtype", ops.merge_attention_states, (q, lse.half(), q, lse), TypeError, "lse_a"),
        ("merge_bwd grad_out", ops.merge_attention_states_backward, merge_bwd(grad_out=q[:, :5]), ValueError, "grad_out"),
        ("merge_bwd grad_lse", ops.merge_attention_states_backward, merge_bwd(grad_lse=a["lse1"]), ValueError,
         "grad_lse"),
        ("merge_bwd lse_a", ops.merge_attention_states_backward, merge_bwd(lse_a=a["lse1"]), ValueError, "lse_a"),
        # residual_attention
        ("res gate (1,1)", ops.residual_attention, _res(a, gate=a["gate"][:1, :1]), ValueError, "gate"),
        ("res gate rank", ops.residual_attention, _res(a, gate=a["gate"][0]), ValueError, "gate"),
        ("res lse_c (1,1,1)", ops.residual_attention, _res(a, lse_c=a["lse1"]), ValueError, "lse_c"),
        ("res out_c alone", ops.residual_attention, _res(a, lse_c=None), ValueError, "out_c"),
        ("res lse_c alone", ops.residual_attention, _res(a, out_c=None), ValueError, "lse_c"),
        ("res out_c shape", ops.residual_attention, _res(a, out_c=q[:, :5]), ValueError, "out_c"),
        ("res grid", ops.residual_attention, _res(a, rope_grid=[5, 5]), ValueError, "rope_grid"),
        ("res grid zero", ops.residual_attention, _res(a, rope_grid=[0, 12]), ValueError, "rope_grid"),
        ("res grid arity", ops.residual_attention, _res(a, rope_grid=[12]), TypeError, "rope_grid"),
        ("res k_prev shape", ops.residual_attention, _res(a, k_prev=a["k_prev"][:, :5]), ValueError, "k_prev"),
        ("res q_prev without gate", ops.residual_attention, _res(a, gate=None), ValueError, "gate"),
        ("res scale", ops.residual_attention, _res(a, scale=float("nan")), ValueError, "scale"),
        ("res prev_scale", ops.residual_attention, _res(a, prev_scale=float("inf")), ValueError, "prev_scale"),
        ("res theta", ops.residual_attention, _res(a, rope_theta=0.0), ValueError, "rope_theta"),
        ("res gqa", ops.residual_attention, _res(a, q=q[:, :, :3], q_prev=q[:, :, :3], out_c=q[:, :, :3],
                                                 lse_c=lse[:, :3], gate=a["gate"][:, :3]), ValueError, "Hq % Hkv"),
        ("res v dtype", ops.residual_attention, _res(a, v=a["v"].half()), TypeError, "v"),
        ("res head_dim 0", ops.residual_attention, _res(a, q=q[..., :0]), ValueError, "q must be non-empty"),
        # residual_attention_backward
        ("res_bwd dout", ops.residual_attention_backward, _res_bwd(a, dout=q[:, :5]), ValueError, "dout"),
        ("res_bwd dlse", ops.residual_attention_backward, _res_bwd(a, dlse=a["lse1"]), ValueError, "dlse"),
        ("res_bwd lse", ops.residual_attention_backward, _res_bwd(a, lse=a["lse1"]), ValueError, "lse"),
        ("res_bwd out", ops.residual_attention_backward, _res_bwd(a, out=q[:, :, :2]), ValueError, "out"),
        ("res_bwd out dtype", ops.residual_attention_backward, _res_bwd(a, out=q.half()), TypeError, "out"),
        ("res_bwd dout dtype", ops.residual_attention_backward, _res_bwd(a, dout=q.double()), TypeError, "dout"),
        ("res_bwd gate", ops.residual_attention_backward, _res_bwd(a, gate=a["gate"][:1]), ValueError, "gate"),
        ("res_bwd lse_c", ops.residual_attention_backward, _res_bwd(a, lse_c=a["lse1"]), ValueError, "lse_c"),
        # latte_attention (the registered composite)
        ("latte grid arity", ops.latte_attention, _latte_args(a, grid_hw=[12]), TypeError, "grid_hw"),
        ("latte grid zero", ops.latte_attention, _latte_args(a, grid_hw=[0, 12]), ValueError, "grid_hw"),
        ("latte grid N", ops.latte_attention, _latte_args(a, grid_hw=[5, 5]), ValueError, "grid_hw"),
        ("latte ctx_lens shape", ops.latte_attention, _latte_args(a, ctx_lens=a["ctx_lens"][:1]), ValueError, "ctx_lens"),
        ("latte ctx_lens dtype", ops.latte_attention, _latte_args(a, ctx_lens=a["ctx_lens"].float()), TypeError,
         "ctx_lens"),
        ("latte gate", ops.latte_attention, _latte_args(a, gate=a["gate"][:1, :1]), ValueError, "gate"),
        ("latte q rank", ops.latte_attention, _latte_args(a, q=q[0]), ValueError, "q must have 4 dimensions"),
        ("latte k_ctx heads", ops.latte_attention, _latte_args(a, k_ctx=q[:, :NC, :3], v_ctx=q[:, :NC, :3]), ValueError,
         "k_ctx"),
        ("latte scale", ops.latte_attention, _latte_args(a, scale=float("nan")), ValueError, "scale"),
        # latte_ext (C++ checks on CPU/CUDA, the Python fakes on meta)
        ("ext ctx_lens shape", ext.context_attention, (q, a["k_ctx"], a["v_ctx"], a["ctx_lens"][:1], 0.25), ValueError,
         "ctx_lens"),
        ("ext ctx_lens dtype", ext.context_attention, (q, a["k_ctx"], a["v_ctx"], a["ctx_lens"].float(), 0.25),
         TypeError, "ctx_lens"),
        ("ext k_ctx head_dim", ext.context_attention, (q, a["k_ctx"][..., :8], a["v_ctx"][..., :8], None, 0.25),
         ValueError, "k_ctx"),
        ("ext q rank", ext.context_attention, (q[0], a["k_ctx"], a["v_ctx"], None, 0.25), ValueError, "q"),
        ("ext scale", ext.context_attention, (q, a["k_ctx"], a["v_ctx"], None, float("inf")), ValueError, "scale"),
        ("ext_bwd grad_lse", ext.context_attention_backward, _ctx_bwd(a, grad_lse=a["lse1"]), ValueError, "grad_lse"),
        ("ext_bwd lse", ext.context_attention_backward, _ctx_bwd(a, lse=a["lse1"]), ValueError, "lse"),
        ("ext_bwd out", ext.context_attention_backward, _ctx_bwd(a, out=q[:, :3]), ValueError, "out"),
        ("ext_bwd grad_out dtype", ext.context_attention_backward, _ctx_bwd(a, grad_out=q.long()), TypeError,
         "grad_out"),
        ("ext_bwd lse dtype", ext.context_attention_backward, _ctx_bwd(a, lse=lse.long()), TypeError, "lse"),
    ]


CPU_CASES = cases("cpu")


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("index", range(len(CPU_CASES)), ids=[c[0] for c in CPU_CASES])
def test_malformed_direct_call_raises_naming_the_argument(index, device):
    name, op, args, exc, match = cases(device)[index]
    with pytest.raises(exc, match=match):
        op(*args)


def test_well_formed_direct_calls_still_run():
    """The checks refuse nothing the ops are given by the public functions and autograd."""
    a = _args("cpu")
    out, lse = ops.residual_attention(*_res(a))
    ops.residual_attention_backward(*_res_bwd(a, out=out, lse=lse))
    ops.latte_attention(*_latte_args(a))
    ops.merge_attention_states(a["q"], a["lse"], a["out_c"], a["lse_c"])
    ops.rope_2d(a["q"], None, 4, 1e4, True)
    ops.mrope(a["q"], a["pos3"], [2, 3, 3], 1e6, False)
    out, lse = ext.context_attention(a["q"], a["k_ctx"], a["v_ctx"], a["ctx_lens"], 0.25)
    ext.context_attention_backward(*_ctx_bwd(a, out=out, lse=lse))
