"""lk.context_attention (the csrc extension: C++ CPU kernel here, CUDA kernels under ``-m gpu``)
against the float64 reference: odd shapes, GQA, every head-dim class, ctx_lens with 0 and Nc, NaN in
padded slots, strided inputs, gradients through out and lse, opcheck, torch.compile, CUDA graphs."""
import pytest
import torch

import latte_kernels as lk
from latte_kernels import _ext, reference as ref
from latte_kernels.context_attention import ensure_registered

from helpers import TOL, assert_lowp_close

f64 = torch.float64
CUDA = torch.cuda.is_available()


def make(b, nq, nc, hq, hkv, d, dtype, device="cpu", lens=None, requires_grad=False):
    q = torch.randn(b, nq, hq, d, dtype=dtype, device=device)
    k = torch.randn(b, nc, hkv, d, dtype=dtype, device=device)
    v = torch.randn(b, nc, hkv, d, dtype=dtype, device=device)
    ctx_lens = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=device)
    if ctx_lens is not None:  # padded slots hold NaN: they must never reach any result
        pad = torch.arange(nc, device=device)[None, :] >= ctx_lens[:, None].long()
        k[pad] = float("nan")
        v[pad] = float("nan")
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, ctx_lens


def fp64_ref(q, k, v, ctx_lens, scale=None):
    return ref.context_attention(q.detach().double(), k.detach().double(), v.detach().double(), ctx_lens, scale=scale)


def assert_lse_close(lse, ref_lse, **tol):
    assert lse.dtype == (f64 if ref_lse.dtype == f64 and lse.dtype == f64 else torch.float32)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(lse.double(), ref_lse.double(), **tol)


# (B, Nq, Nc, Hq, Hkv, D, lens)
SHAPES = [
    (2, 63, 130, 6, 1, 64, [0, 130]),
    (3, 77, 5, 2, 1, 40, [5, 1, 3]),
    (1, 63, 1, 6, 6, 8, [1]),
    (2, 77, 130, 4, 2, 128, [129, 64]),
    (1, 63, 130, 2, 1, 256, [77]),
    (2, 9, 130, 6, 3, 32, None),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])))
@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_cpu_matches_reference(shape, dtype):
    b, nq, nc, hq, hkv, d, lens = shape
    q, k, v, ctx_lens = make(b, nq, nc, hq, hkv, d, dtype, lens=lens)
    out, lse = lk.context_attention(q, k, v, ctx_lens)
    ref_out, ref_lse = fp64_ref(q, k, v, ctx_lens)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (b, hq, nq)
    torch.testing.assert_close(out.double(), ref_out, **TOL[dtype])
    assert_lse_close(lse, ref_lse, **TOL[dtype])
    if lens is not None and 0 in lens:
        empty = lens.index(0)
        assert (out[empty] == 0).all() and torch.isneginf(lse[empty]).all()


@pytest.mark.parametrize("d", [8, 40, 64])
def test_cpu_float16_lowp_rule(d):
    q, k, v, ctx_lens = make(2, 63, 130, 4, 2, d, torch.float16, lens=[100, 130])
    out, lse = lk.context_attention(q, k, v, ctx_lens)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    ref_out, ref_lse = fp64_ref(q, k, v, ctx_lens)
    lowp_out, _ = ref.context_attention(q, k, v, ctx_lens)  # float32 math rounded to float16
    assert_lowp_close(out, lowp_out, ref_out)
    torch.testing.assert_close(lse.double(), ref_lse, **TOL[torch.float32])


def test_cpu_bfloat16_runs_in_float32():
    q, k, v, ctx_lens = make(2, 17, 33, 2, 1, 16, torch.bfloat16, lens=[3, 33])
    out, lse = lk.context_attention(q, k, v, ctx_lens)
    ref_out, ref_lse = fp64_ref(q, k, v, ctx_lens)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref_out, **TOL[torch.bfloat16])
    torch.testing.assert_close(lse.double(), ref_lse, **TOL[torch.float32])


def test_non_contiguous_inputs_and_scale():
    base_q = torch.randn(2, 8, 40, 3, 24, dtype=f64)
    q = base_q[:, ::2, :, 1, :][:, :, :6]  # (2, 4, 6, 24), strided in every dim
    kv = torch.randn(2, 11, 4, 2, 24, dtype=f64)
    k, v = kv[..., 0, :][:, :, ::2], kv[..., 1, :][:, :, 1::2]  # (2, 11, 2, 24) interleaved views
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    lens = torch.tensor([7, 11])
    out, lse = lk.context_attention(q, k, v, lens, scale=0.3)
    ref_out, ref_lse = ref.context_attention(q.contiguous(), k.contiguous(), v.contiguous(), lens, scale=0.3)
    torch.testing.assert_close(out, ref_out, **TOL[f64])
    torch.testing.assert_close(lse, ref_lse, **TOL[f64])


def test_int64_lens_and_none_equal_full_length():
    q, k, v, _ = make(2, 9, 12, 2, 2, 16, f64)
    full = lk.context_attention(q, k, v)
    for lens in (torch.tensor([12, 12]), torch.tensor([12, 12], dtype=torch.int32)):
        got = lk.context_attention(q, k, v, lens)
        torch.testing.assert_close(got[0], full[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], full[1], rtol=0, atol=0)


def test_raw_op_clamps_out_of_range_lengths():
    # The public op rejects these (below); the kernel itself clamps into [0, Nc] so a value that was
    # not checked (CUDA-graph capture, compile) can never read out of bounds.
    q, k, v, _ = make(3, 5, 6, 2, 1, 8, f64)
    ensure_registered()
    out, lse = torch.ops.latte_ext.context_attention(q, k, v, torch.tensor([-4, 99, 2]), 0.5)
    ref_out, ref_lse = ref.context_attention(q, k, v, torch.tensor([0, 6, 2]), scale=0.5)
    torch.testing.assert_close(out, ref_out, **TOL[f64])
    torch.testing.assert_close(lse, ref_lse, **TOL[f64])


@pytest.mark.parametrize("shape", SHAPES[:5], ids=lambda s: "x".join(map(str, s[:6])))
def test_gradients_through_out_and_lse(shape):
    b, nq, nc, hq, hkv, d, lens = shape
    q, k, v, ctx_lens = make(b, nq, nc, hq, hkv, d, f64, lens=lens, requires_grad=True)
    out, lse = lk.context_attention(q, k, v, ctx_lens)
    ref_out, ref_lse = ref.context_attention(q, k, v, ctx_lens)
    g_out = torch.randn_like(out)
    g_lse = torch.randn_like(lse)

    def loss(o, l):  # lse of an empty row is the constant -inf: no cotangent there
        return (o * g_out).sum() + (l.masked_fill(torch.isneginf(l), 0) * g_lse).sum()

    grads = torch.autograd.grad(loss(out, lse), (q, k, v))
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse), (q, k, v))
    for name, g, r in zip(("dq", "dk_ctx", "dv_ctx"), grads, ref_grads):
        assert not g.isnan().any(), f"{name} has NaN"
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-9, msg=lambda m: f"{name}: {m}")
    if ctx_lens is not None:  # keys that do not exist get exactly zero gradient
        pad = torch.arange(nc)[None, :] >= ctx_lens[:, None]
        assert (grads[1][pad] == 0).all() and (grads[2][pad] == 0).all()


def test_float32_gradients():
    q, k, v, ctx_lens = make(2, 33, 20, 4, 2, 32, torch.float32, lens=[20, 7], requires_grad=True)
    out, lse = lk.context_attention(q, k, v, ctx_lens)
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    r_out, r_lse = ref.context_attention(q64, k64, v64, ctx_lens)
    ref_grads = torch.autograd.grad((r_out * g_out.double()).sum() + (r_lse * g_lse.double()).sum(), (q64, k64, v64))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)


def test_gradcheck_float64():
    q, k, v, ctx_lens = make(2, 3, 5, 2, 1, 8, f64, lens=[2, 5])
    k = k.nan_to_num(0.0)
    v = v.nan_to_num(0.0)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda *a: lk.context_attention(*a, ctx_lens), (q, k, v))


def test_opcheck_registered_op():
    ensure_registered()
    for lens in (torch.tensor([3, 0], dtype=torch.int32), None):
        q, k, v, _ = make(2, 5, 4, 4, 2, 16, torch.float32, requires_grad=True)
        torch.library.opcheck(torch.ops.latte_ext.context_attention.default, (q, k, v, lens, 0.25))
    q, k, v, lens = make(2, 5, 4, 4, 2, 16, torch.float32, lens=[3, 4])
    out, lse = torch.ops.latte_ext.context_attention(q, k, v, lens, 0.25)
    args = (torch.randn_like(out), torch.randn_like(lse), q, k, v, lens, out, lse, 0.25)
    torch.library.opcheck(torch.ops.latte_ext.context_attention_backward.default, args)


def test_torch_compile_fullgraph_forward_and_backward():
    q, k, v, lens = make(2, 9, 7, 4, 2, 16, torch.float32, lens=[7, 2], requires_grad=True)

    def f(q, k, v, lens):
        out, lse = lk.context_attention(q, k, v, lens)
        return out.sum() + lse.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(q, k, v, lens)
    grads = torch.autograd.grad(got, (q, k, v))
    want = f(q, k, v, lens)
    torch.testing.assert_close(got, want)
    for g, r in zip(grads, torch.autograd.grad(want, (q, k, v))):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(ctx_lens=torch.tensor([1, 9])), ValueError, "ctx_lens values"),
        (dict(ctx_lens=torch.tensor([1])), ValueError, "ctx_lens must have shape"),
        (dict(ctx_lens=torch.tensor([1.0, 2.0])), TypeError, "ctx_lens"),
        (dict(v_ctx=torch.randn(2, 8, 2, 16, dtype=torch.float16)), TypeError, "v_ctx"),
        (dict(k_ctx=torch.randn(2, 8, 3, 16)), ValueError, "k_ctx"),
        (dict(q=torch.randn(2, 5, 4, 12)), ValueError, "head_dim"),
        (dict(scale=float("nan")), ValueError, "scale"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, exc, match):
    args = dict(q=torch.randn(2, 5, 4, 16), k_ctx=torch.randn(2, 8, 2, 16), v_ctx=torch.randn(2, 8, 2, 16))
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k_ctx"), args.pop("v_ctx")
    with pytest.raises(exc, match=match):
        lk.context_attention(q, k, v, **args)


def test_clear_error_when_the_extension_cannot_load(monkeypatch):
    import importlib
    import sys

    ca = sys.modules["latte_kernels.context_attention"]  # the package attribute is the function

    real_import = importlib.import_module

    def no_prebuilt(name, *a, **kw):
        if name == "latte_kernels._C":
            raise ImportError("No module named 'latte_kernels._C'")
        return real_import(name, *a, **kw)

    def failing_build():
        raise RuntimeError("Error building extension 'latte_ext_jit'\nfatal error: Python.h: No such file")

    monkeypatch.setattr(_ext, "_LOADED", False)
    monkeypatch.setattr(ca, "_REGISTERED", False)
    monkeypatch.setattr(_ext.importlib, "import_module", no_prebuilt)
    monkeypatch.setattr(_ext, "_jit_build", failing_build)
    try:
        q, k, v, _ = make(1, 3, 4, 2, 1, 8, torch.float32)
        for _ in range(2):  # the failure is cached: same message, no second build attempt
            with pytest.raises(RuntimeError, match=r"pip install --no-build-isolation -e \.") as info:
                lk.context_attention(q, k, v)
            assert "setup.py build_ext --inplace" in str(info.value)
            assert "Python.h: No such file" in str(info.value)
    finally:
        _ext._reset_for_tests()


# --------------------------------------------------------------------------------------------------
# CUDA kernels (need a GPU)


def _lowp_attention(q, k, v, ctx_lens, scale):
    """The same math done by PyTorch in q's low precision (flash-attention's baseline)."""
    hq = q.shape[2]
    kk = k.transpose(1, 2).repeat_interleave(hq // k.shape[2], dim=1)
    vv = v.transpose(1, 2).repeat_interleave(hq // v.shape[2], dim=1)
    s = torch.matmul(q.transpose(1, 2), kk.transpose(-1, -2)) * scale
    valid = torch.arange(k.shape[1], device=q.device)[None, :] < ctx_lens[:, None]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    has = valid.any(-1)[:, None, None]  # rows with no key: out 0, lse -inf, no NaN in the gradients
    s = torch.where(has[..., None], s, torch.zeros_like(s))
    p = torch.softmax(s, dim=-1) * has[..., None]
    out = torch.matmul(p, vv.masked_fill(~valid[:, None, :, None], 0)).transpose(1, 2)
    return out, torch.logsumexp(s, dim=-1).masked_fill(~has, float("-inf"))


def _fill_cache_with_nan():
    """Poisons the caching allocator's free blocks, so an output element the kernel forgets to write
    reads NaN (the op allocates its outputs itself)."""
    x = torch.empty(64 * 2**20, dtype=torch.float32, device="cuda").fill_(float("nan"))
    del x


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])))
def test_cuda_forward_and_backward(shape, dtype):
    b, nq, nc, hq, hkv, d, lens = shape
    lens = lens if lens is not None else [nc] * b
    q, k, v, ctx_lens = make(b, nq, nc, hq, hkv, d, dtype, device="cuda", lens=lens, requires_grad=True)
    _fill_cache_with_nan()
    out, lse = lk.context_attention(q, k, v, ctx_lens)
    g_out = torch.randn_like(out)
    g_lse = torch.randn_like(lse)
    finite = ~torch.isneginf(lse)
    grads = torch.autograd.grad((out * g_out).sum() + (lse.masked_fill(~finite, 0) * g_lse).sum(), (q, k, v))

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    r_out, r_lse = ref.context_attention(q64, k64, v64, ctx_lens)
    r_grads = torch.autograd.grad(
        (r_out * g_out.double()).sum() + (r_lse.masked_fill(~finite, 0) * g_lse.double()).sum(), (q64, k64, v64)
    )
    # the LSE is float32 math on the given (low-precision) values: float32 accuracy in every dtype
    assert torch.equal(torch.isneginf(lse), torch.isneginf(r_lse))
    torch.testing.assert_close(lse[finite].double(), r_lse[finite], atol=1e-4, rtol=1e-4)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), r_out, atol=1e-5, rtol=1e-5)
        for g, r in zip(grads, r_grads):
            torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)
        return
    ql, kl, vl = (t.detach().nan_to_num(0.0).requires_grad_() for t in (q, k, v))
    l_out, l_lse = _lowp_attention(ql, kl, vl, ctx_lens, d ** -0.5)
    l_grads = torch.autograd.grad((l_out * g_out).sum() + (l_lse.masked_fill(~finite, 0) * g_lse).sum(), (ql, kl, vl))
    assert_lowp_close(out, l_out, r_out)
    for g, lg, r in zip(grads, l_grads, r_grads):
        assert_lowp_close(g, lg, r)


@pytest.mark.gpu
def test_cuda_non_contiguous_and_int64_lens():
    base = torch.randn(2, 70, 6, 2, 64, device="cuda", dtype=torch.bfloat16)
    q = base[:, 1:, :, 0]  # strided heads
    kv = torch.randn(2, 40, 2, 2, 64, device="cuda", dtype=torch.bfloat16)
    k, v = kv[:, :, :, 0], kv[:, :, :, 1]
    lens = torch.tensor([40, 13], device="cuda")
    out, lse = lk.context_attention(q, k, v, lens)
    r_out, r_lse = ref.context_attention(q.double(), k.double(), v.double(), lens)
    l_out, _ = _lowp_attention(q, k, v, lens, 64 ** -0.5)
    assert_lowp_close(out, l_out, r_out)
    torch.testing.assert_close(lse.double(), r_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    q, k, v, lens = make(2, 77, 130, 4, 2, 128, torch.bfloat16, device="cuda", lens=[130, 40])
    static = [t.clone() for t in (q, k, v, lens)]
    lk.context_attention(*static[:3], static[3])  # load and warm up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = lk.context_attention(*static[:3], static[3])
    for new_lens in ([7, 130], [0, 99]):
        fresh = make(2, 77, 130, 4, 2, 128, torch.bfloat16, device="cuda", lens=new_lens)
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        eager_out, eager_lse = lk.context_attention(*fresh[:3], fresh[3])
        torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
        torch.testing.assert_close(lse, eager_lse, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_paper_shape_gqa6_and_deterministic_dkdv(dtype):
    # Qwen2-VL-2B: Hq=12, Hkv=2 (one CTA packs the 6 query heads of a group), D=128; lens cross tiles
    q, k, v, lens = make(2, 130, 1024, 12, 2, 128, dtype, device="cuda", lens=[1024, 333], requires_grad=True)
    out, lse = lk.context_attention(q, k, v, lens)
    r_out, r_lse = ref.context_attention(q.detach().double(), k.detach().double(), v.detach().double(), lens)
    l_out, _ = _lowp_attention(q.detach(), k.detach().nan_to_num(0.0), v.detach().nan_to_num(0.0), lens, 128 ** -0.5)
    assert_lowp_close(out, l_out, r_out)
    torch.testing.assert_close(lse.double(), r_lse, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), g)
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2]), "dK/dV must be bitwise reproducible"
    torch.testing.assert_close(first[0], second[0], atol=1e-2, rtol=1e-2)  # dQ: float32 atomics, order may differ


@pytest.mark.gpu
def test_cuda_misaligned_inputs_are_copied_not_misread():
    # a storage offset of one element breaks 16-byte alignment: the binding copies, the result is exact
    flat = torch.randn(2 * 33 * 4 * 64 + 1, device="cuda", dtype=torch.float16)
    q = flat[1:].view(2, 33, 4, 64)
    k, v = torch.randn(2, 2, 40, 2, 64, device="cuda", dtype=torch.float16).unbind(0)
    out, lse = lk.context_attention(q, k, v)
    want, want_lse = lk.context_attention(q.clone(), k, v)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
