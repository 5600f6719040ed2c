"""merge_attention_states kernels against the reference: values, strides, -inf sides, gradients,
poisoned outputs, opcheck, torch.compile, and (GPU) low precision and CUDA graphs."""
import pytest
import torch

import latte_kernels as lk
from latte_kernels import _backend
from latte_kernels import merge as merge_mod
from latte_kernels import reference as ref
from helpers import HAS_CUDA, INTERPRET, TOL, assert_lowp_close, poison_

DEV = "cuda" if HAS_CUDA else "cpu"
needs_kernel = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
NEG_INF = float("-inf")

# (B, N, H, D): odd N, H 1..6, head_dim 16..128
SHAPES = [(2, 63, 1, 16), (1, 77, 3, 32), (2, 63, 6, 64), (1, 77, 5, 128)]


def states(b, n, h, d, dtype=torch.float32, strided=False):
    """Two partial attentions; with ``strided`` the b side comes as transposed views."""
    out_a = torch.randn(b, n, h, d, dtype=dtype, device=DEV)
    lse_a = 3 * torch.randn(b, h, n, device=DEV)
    if strided:
        out_b = torch.randn(b, h, n, d, dtype=dtype, device=DEV).transpose(1, 2)
        lse_b = 3 * torch.randn(b, n, h, device=DEV).transpose(1, 2)
    else:
        out_b = torch.randn(b, n, h, d, dtype=dtype, device=DEV)
        lse_b = 3 * torch.randn(b, h, n, device=DEV)
    return out_a, lse_a, out_b, lse_b


def with_empty_rows(lse_a, lse_b):
    """-inf on a only (rows 0..4), on b only (rows 5..9), on both (rows 10..12) of head 0."""
    lse_a, lse_b = lse_a.clone(), lse_b.clone()
    lse_a[:, 0, 0:5] = NEG_INF
    lse_b[:, 0, 5:10] = NEG_INF
    lse_a[:, 0, 10:13] = NEG_INF
    lse_b[:, 0, 10:13] = NEG_INF
    return lse_a, lse_b


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,n,h,d", SHAPES)
def test_matches_reference(b, n, h, d, dtype):
    out_a, lse_a, out_b, lse_b = states(b, n, h, d, dtype, strided=h % 2 == 1)
    out, lse = lk.merge_attention_states(out_a, lse_a, out_b, lse_b)
    ref_out, ref_lse = ref.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.is_contiguous() and lse.is_contiguous()
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **TOL[torch.float32])


@needs_kernel
def test_launchers_write_every_element_of_poisoned_buffers():
    b, n, h, d = 2, 77, 3, 32
    out_a, lse_a, out_b, lse_b = states(b, n, h, d, strided=True)
    out, lse = poison_(torch.empty(b, n, h, d, device=DEV)), poison_(torch.empty(b, h, n, device=DEV))
    merge_mod._launch_fwd(out, lse, out_a, lse_a, out_b, lse_b)
    ref_out, ref_lse = ref.merge_attention_states(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse, **TOL[torch.float32])

    g, g_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = [poison_(torch.empty_like(t, memory_format=torch.contiguous_format)) for t in (out_a, lse_a, out_b, lse_b)]
    merge_mod._launch_bwd(*grads, g, g_lse, out_a, lse_a, out_b, lse_b)
    expected = merge_mod._merge_backward_torch(g, g_lse, out_a, lse_a, out_b, lse_b)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_empty_sides(dtype):
    """-inf on one side returns the other side exactly; on both, output 0 and lse -inf; never NaN."""
    out_a, lse_a, out_b, lse_b = states(2, 63, 2, 64, dtype)
    lse_a, lse_b = with_empty_rows(lse_a, lse_b)
    out, lse = lk.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(out[:, 0:5, 0], out_b[:, 0:5, 0]) and torch.equal(lse[:, 0, 0:5], lse_b[:, 0, 0:5])
    assert torch.equal(out[:, 5:10, 0], out_a[:, 5:10, 0]) and torch.equal(lse[:, 0, 5:10], lse_a[:, 0, 5:10])
    assert torch.equal(out[:, 10:13, 0], torch.zeros_like(out[:, 10:13, 0]))
    assert torch.isneginf(lse[:, 0, 10:13]).all()
    ref_out, ref_lse = ref.merge_attention_states(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **TOL[torch.float32])


def _grads(fn, inputs, g, g_lse):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out, lse = fn(*leaves)
    torch.autograd.backward((out, lse), (g, g_lse))
    return [t.grad for t in leaves]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gradients_match_reference_autograd(dtype):
    inputs = states(2, 77, 3, 32, dtype, strided=True)
    g = torch.randn(2, 3, 77, 32, dtype=dtype, device=DEV).transpose(1, 2)  # non-contiguous cotangent
    g_lse = torch.randn(2, 3, 77, device=DEV)
    got = _grads(lk.merge_attention_states, inputs, g, g_lse)
    want = _grads(ref.merge_attention_states, inputs, g, g_lse)
    for name, a, b in zip(("out_a", "lse_a", "out_b", "lse_b"), got, want):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, **TOL[dtype if name.startswith("out") else torch.float32], msg=name)


@needs_kernel
def test_gradients_with_empty_sides_are_finite_and_right():
    out_a, lse_a, out_b, lse_b = states(1, 63, 2, 16)
    lse_a, lse_b = with_empty_rows(lse_a, lse_b)
    g, g_lse = torch.randn_like(out_a), torch.randn(1, 2, 63, device=DEV)
    d_oa, d_la, d_ob, d_lb = _grads(lk.merge_attention_states, (out_a, lse_a, out_b, lse_b), g, g_lse)
    for t in (d_oa, d_la, d_ob, d_lb):
        assert torch.isfinite(t).all()
    # a empty: everything flows to b; out = out_b so d lse_b = g_lse
    assert torch.equal(d_oa[:, 0:5, 0], torch.zeros_like(d_oa[:, 0:5, 0])) and torch.equal(d_ob[:, 0:5, 0], g[:, 0:5, 0])
    assert torch.equal(d_la[:, 0, 0:5], torch.zeros_like(d_la[:, 0, 0:5]))
    torch.testing.assert_close(d_lb[:, 0, 0:5], g_lse[:, 0, 0:5], atol=1e-6, rtol=1e-6)
    # both empty: no gradient anywhere
    for t in (d_oa[:, 10:13, 0], d_ob[:, 10:13, 0], d_la[:, 0, 10:13], d_lb[:, 0, 10:13]):
        assert torch.equal(t, torch.zeros_like(t))
    # rows with finite lse on both sides still match the reference's autograd
    want = _grads(ref.merge_attention_states, (out_a, lse_a, out_b, lse_b), g, g_lse)
    torch.testing.assert_close(d_oa[:, :, 1], want[0][:, :, 1], **TOL[torch.float32])
    torch.testing.assert_close(d_la[:, 1], want[1][:, 1], **TOL[torch.float32])


def test_output_gradient_only_and_lse_gradient_only():
    """Either output may be unused; the missing cotangent counts as zero (float64, reference path)."""
    inputs = [t.double() for t in states(1, 5, 2, 8)]
    leaves = [t.clone().requires_grad_() for t in inputs]
    out, _ = lk.merge_attention_states(*leaves)
    out.sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    ref.merge_attention_states(*ref_leaves)[0].sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float64])


def test_float64_gradcheck_through_torch_path():
    inputs = [t.double().requires_grad_() for t in states(1, 5, 2, 8)]
    assert not _backend.triton_runs(inputs[0])
    torch.autograd.gradcheck(lk.merge_attention_states, inputs)


def test_bad_arguments_raise_naming_the_argument():
    out_a, lse_a, out_b, lse_b = states(1, 5, 2, 8)
    with pytest.raises(ValueError, match="out_b"):
        lk.merge_attention_states(out_a, lse_a, out_b[:, :4], lse_b)
    with pytest.raises(TypeError, match="lse_a"):
        lk.merge_attention_states(out_a, lse_a.half(), out_b, lse_b)
    with pytest.raises(ValueError, match="lse_b"):
        lk.merge_attention_states(out_a, lse_a, out_b, lse_b.transpose(1, 2))


@needs_kernel
def test_opcheck():
    out_a, lse_a, out_b, lse_b = [t.requires_grad_() for t in states(1, 9, 2, 16, strided=True)]
    torch.library.opcheck(torch.ops.latte.merge_attention_states.default, (out_a, lse_a, out_b, lse_b))
    g, g_lse = torch.randn(1, 9, 2, 16, device=DEV), torch.randn(1, 2, 9, device=DEV)
    torch.library.opcheck(torch.ops.latte.merge_attention_states_backward.default,
                          (g, g_lse, out_a.detach(), lse_a.detach(), out_b.detach(), lse_b.detach()))


@needs_kernel
def test_torch_compile_fullgraph():
    """backend="aot_eager" (forward and backward through the fakes; see test_rope for why)."""
    torch._dynamo.reset()

    def f(out_a, lse_a, out_b, lse_b):
        out, lse = lk.merge_attention_states(out_a, lse_a, out_b, lse_b)
        return out * 2, lse + 1

    inputs = states(1, 21, 3, 32, strided=True)
    g, g_lse = torch.randn(1, 21, 3, 32, device=DEV), torch.randn(1, 3, 21, device=DEV)
    leaves_e = [t.clone().requires_grad_() for t in inputs]
    leaves_c = [t.clone().requires_grad_() for t in inputs]
    eager = f(*leaves_e)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves_c)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.autograd.backward(eager, (g, g_lse))
    torch.autograd.backward(compiled, (g, g_lse))
    for a, b in zip(leaves_c, leaves_e):
        torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision(dtype):
    out_a, lse_a, out_b, lse_b = states(4, 4096, 12, 128, dtype)
    out, lse = lk.merge_attention_states(out_a, lse_a, out_b, lse_b)
    ref64, lse64 = ref.merge_attention_states(out_a.double(), lse_a.double(), out_b.double(), lse_b.double())
    # PyTorch in low precision: weights and products in the dtype
    lse_lp = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse_lp).transpose(1, 2).unsqueeze(-1).to(dtype)
    w_b = torch.exp(lse_b - lse_lp).transpose(1, 2).unsqueeze(-1).to(dtype)
    assert_lowp_close(out, w_a * out_a + w_b * out_b, ref64)
    torch.testing.assert_close(lse, lse64.float(), **TOL[torch.float32])


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_replay():
    out_a, lse_a, out_b, lse_b = states(2, 255, 4, 64)
    lk.merge_attention_states(out_a, lse_a, out_b, lse_b)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = lk.merge_attention_states(out_a, lse_a, out_b, lse_b)
    fresh = states(2, 255, 4, 64)
    lse_fresh_a, lse_fresh_b = with_empty_rows(fresh[1], fresh[3])
    for dst, src in zip((out_a, lse_a, out_b, lse_b), (fresh[0], lse_fresh_a, fresh[2], lse_fresh_b)):
        dst.copy_(src)
    poison_(out)
    poison_(lse)
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_lse = ref.merge_attention_states(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse, **TOL[torch.float32])


# --------------------------------------------------------------------------------------------------
# A -inf side contributes nothing, whatever its output holds (SPEC 2.3)

PATHS = {  # the kernels (float32), the op's PyTorch path (float64) and the reference module
    "kernel": (lk.merge_attention_states, torch.float32),
    "torch-path": (lk.merge_attention_states, torch.float64),
    "reference": (ref.merge_attention_states, torch.float64),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_neg_inf_side_holding_nan_contributes_nothing(path):
    fn, dtype = PATHS[path]
    if path == "kernel" and not (HAS_CUDA or INTERPRET):
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    out_a, lse_a, out_b, lse_b = (t.to(dtype) for t in states(2, 63, 2, 16))
    lse_a, lse_b = with_empty_rows(lse_a, lse_b)
    clean = [out_a.clone(), lse_a, out_b.clone(), lse_b]
    out_a[:, 0:5, 0] = float("nan")  # a empty there
    out_b[:, 5:10, 0] = float("nan")  # b empty there
    out_a[:, 10:13, 0] = float("nan")  # both empty
    out_b[:, 10:13, 0] = float("inf")
    g, g_lse = torch.randn_like(out_a), torch.randn(2, 2, 63, dtype=lse_a.dtype, device=DEV)
    leaves = [t.clone().requires_grad_() for t in (out_a, lse_a, out_b, lse_b)]
    out, lse = fn(*leaves)
    assert torch.equal(out[:, 0:5, 0], out_b[:, 0:5, 0].to(out.dtype))
    assert torch.equal(out[:, 5:10, 0], out_a[:, 5:10, 0].to(out.dtype))
    assert torch.equal(out[:, 10:13, 0], torch.zeros_like(out[:, 10:13, 0]))
    assert torch.isfinite(out).all() and not lse.isnan().any()
    torch.autograd.backward((out, lse), (g, g_lse))
    for name, t in zip(("out_a", "lse_a", "out_b", "lse_b"), leaves):
        assert torch.isfinite(t.grad).all(), f"d{name} is not finite"
    want = _grads(fn, clean, g, g_lse)
    for name, got, w in zip(("out_a", "lse_a", "out_b", "lse_b"), (t.grad for t in leaves), want):
        torch.testing.assert_close(got, w, atol=0, rtol=0, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("d", [3, 12, 264, 1000])
def test_head_dim_outside_the_spec_is_refused(d):
    out_a, lse_a, out_b, lse_b = states(1, 5, 2, d)
    with pytest.raises(ValueError, match="out_a head_dim must be a multiple of 8"):
        lk.merge_attention_states(out_a, lse_a, out_b, lse_b)
    with pytest.raises(ValueError, match="out_a head_dim must be a multiple of 8"):
        ref.merge_attention_states(out_a, lse_a, out_b, lse_b)


@pytest.mark.parametrize("shape", [(0, 5, 2, 16), (1, 0, 2, 16), (1, 5, 0, 16)])
def test_empty_tensors_are_refused(shape):
    b, n, h, _ = shape
    out_a, out_b = torch.randn(shape), torch.randn(shape)
    lse_a, lse_b = torch.randn(b, h, n), torch.randn(b, h, n)
    for fn in (lk.merge_attention_states, ref.merge_attention_states):
        with pytest.raises(ValueError, match="out_a must be non-empty"):
            fn(out_a, lse_a, out_b, lse_b)
