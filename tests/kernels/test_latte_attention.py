"""lk.latte_attention (the registered composite of rope_2d + context_attention + residual_attention)
against the reference's definition (SPEC 2.6): values, gradients of every input, opcheck, compile."""
import pytest
import torch

import latte_kernels as lk
from latte_kernels import reference as ref

from helpers import TOL, assert_lowp_close

f64 = torch.float64


def make(b, grid, nc, hq, hkv, d, dtype, lens, residual, device="cpu"):
    n = grid[0] * grid[1]
    t = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    args = dict(q=t(b, n, hq, d), k=t(b, n, hkv, d), v=t(b, n, hkv, d))
    kw = dict(k_ctx=t(b, nc, hkv, d), v_ctx=t(b, nc, hkv, d),
              ctx_lens=None if lens is None else torch.tensor(lens, device=device))
    if lens is not None:  # padded context slots hold NaN
        pad = torch.arange(nc, device=device)[None, :] >= kw["ctx_lens"][:, None]
        kw["k_ctx"][pad] = float("nan")
        kw["v_ctx"][pad] = float("nan")
    if residual:
        kw.update(q_prev=t(b, n, hq, d), k_prev=t(b, n, hkv, d), gate=t(b, hq))
    return args, kw


CASES = [  # (B, grid, Nc, Hq, Hkv, D, lens, residual)
    (2, (7, 9), 130, 6, 1, 64, [0, 130], True),
    (2, (7, 11), 5, 4, 2, 32, [5, 2], False),
    (1, (3, 5), 1, 2, 2, 128, None, True),
]
IDS = ["gqa6-len0-residual", "gqa2-noresidual", "mha-d128"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_matches_reference(case, dtype):
    b, grid, nc, hq, hkv, d, lens, residual = case
    args, kw = make(b, grid, nc, hq, hkv, d, dtype, lens, residual)
    out = lk.latte_attention(args["q"], args["k"], args["v"], grid, **kw)
    want = ref.latte_attention(*(t.double() for t in args.values()), grid,
                               **{k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in kw.items()})
    assert out.dtype == dtype and out.shape == args["q"].shape
    torch.testing.assert_close(out.double(), want, **TOL[dtype])


def test_float16_lowp_rule():
    b, grid, nc, hq, hkv, d, lens, residual = CASES[0]
    args, kw = make(b, grid, nc, hq, hkv, d, torch.float16, lens, residual)
    out = lk.latte_attention(args["q"], args["k"], args["v"], grid, **kw)
    lowp = ref.latte_attention(args["q"], args["k"], args["v"], grid, **kw)
    exact = ref.latte_attention(*(t.double() for t in args.values()), grid,
                                **{k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in kw.items()})
    assert_lowp_close(out, lowp, exact)


@pytest.mark.parametrize("case", CASES[:2], ids=IDS[:2])
def test_gradients_of_every_input(case):
    b, grid, nc, hq, hkv, d, lens, residual = case
    args, kw = make(b, grid, nc, hq, hkv, d, f64, lens, residual)
    leaves = {**args, **{k: v for k, v in kw.items() if v is not None and v.is_floating_point()}}
    for t in leaves.values():
        t.requires_grad_()
    out = lk.latte_attention(args["q"], args["k"], args["v"], grid, **kw)
    want = ref.latte_attention(args["q"], args["k"], args["v"], grid, **kw)
    cot = torch.randn_like(out)
    grads = torch.autograd.grad((out * cot).sum(), tuple(leaves.values()))
    ref_grads = torch.autograd.grad((want * cot).sum(), tuple(leaves.values()))
    for name, g, r in zip(leaves, grads, ref_grads):
        assert not g.isnan().any(), f"d{name} has NaN"
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-9, msg=lambda m: f"d{name}: {m}")


def test_opcheck_registered_op():
    b, grid, nc, hq, hkv, d, lens, residual = CASES[0]
    args, kw = make(b, grid, nc, hq, hkv, d, torch.float32, lens, residual)
    for t in (*args.values(), kw["k_ctx"], kw["v_ctx"], kw["q_prev"], kw["k_prev"], kw["gate"]):
        t.nan_to_num_(0.0).requires_grad_()
    op_args = (args["q"], args["k"], args["v"], list(grid), kw["k_ctx"], kw["v_ctx"], kw["ctx_lens"],
               kw["q_prev"], kw["k_prev"], kw["gate"], None, 10000.0)
    torch.library.opcheck(torch.ops.latte.latte_attention.default, op_args)


def test_torch_compile_fullgraph():
    b, grid, nc, hq, hkv, d, lens, residual = CASES[1]
    args, kw = make(b, grid, nc, hq, hkv, d, torch.float32, lens, residual)
    for t in args.values():
        t.requires_grad_()
    f = lambda q, k, v: lk.latte_attention(q, k, v, grid, **kw)  # noqa: E731
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(*args.values())
    want = f(*args.values())
    torch.testing.assert_close(got, want)
    for g, r in zip(torch.autograd.grad(got.sum(), tuple(args.values())),
                    torch.autograd.grad(want.sum(), tuple(args.values()))):
        torch.testing.assert_close(g, r)


def test_bad_inputs_name_the_argument():
    args, kw = make(2, (3, 4), 6, 2, 1, 16, torch.float32, [6, 1], False)
    with pytest.raises(ValueError, match="grid_hw"):
        lk.latte_attention(args["q"], args["k"], args["v"], (3, 5), **kw)
    with pytest.raises(ValueError, match="ctx_lens values"):
        lk.latte_attention(args["q"], args["k"], args["v"], (3, 4), **{**kw, "ctx_lens": torch.tensor([7, 1])})
    with pytest.raises(ValueError, match="q_prev, k_prev and gate"):
        lk.latte_attention(args["q"], args["k"], args["v"], (3, 4), **kw, q_prev=args["q"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    b, grid, nc, hq, hkv, d, lens, residual = CASES[0]
    args, kw = make(b, grid, nc, hq, hkv, d, dtype, lens, residual, device="cuda")
    out = lk.latte_attention(args["q"], args["k"], args["v"], grid, **kw)
    lowp = ref.latte_attention(args["q"], args["k"], args["v"], grid, **kw)
    exact = ref.latte_attention(*(t.double() for t in args.values()), grid,
                                **{k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in kw.items()})
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, atol=1e-4, rtol=1e-4)
    else:
        assert_lowp_close(out, lowp, exact)


def test_ctx_lens_values_are_checked_once_per_call(monkeypatch):
    """On CUDA each value check is a host sync: the composite must not re-validate through the parts."""
    from latte_kernels import _validate

    calls = []
    original = _validate.check_ctx_lens_values
    monkeypatch.setattr(_validate, "check_ctx_lens_values", lambda *a: calls.append(1) or original(*a))
    q, k, v = torch.randn(2, 6, 2, 16), torch.randn(2, 6, 1, 16), torch.randn(2, 6, 1, 16)
    kc, vc = torch.randn(2, 3, 1, 16), torch.randn(2, 3, 1, 16)
    lk.latte_attention(q, k, v, (2, 3), k_ctx=kc, v_ctx=vc, ctx_lens=torch.tensor([0, 3]))
    assert len(calls) == 1
