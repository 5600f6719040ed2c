"""rope_2d and mrope kernels against the reference: values, strides, positions, inverse/backward,
in place, poisoned outputs, opcheck, torch.compile, and (GPU) low precision and CUDA graphs."""
import pytest
import torch

import latte_kernels as lk
from latte_kernels import _backend
from latte_kernels import reference as ref
from latte_kernels import rope as rope_mod
from helpers import HAS_CUDA, INTERPRET, TOL, assert_lowp_close, poison_

DEV = "cuda" if HAS_CUDA else "cpu"
# On CPU the kernels run only through the interpreter; without it these tests would compare the
# reference with itself, so they say so instead of passing vacuously.
needs_kernel = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="Triton kernels need CUDA or TRITON_INTERPRET=1")

SECTIONS = {16: (2, 3, 3), 32: (4, 6, 6), 64: (8, 12, 12), 128: (16, 24, 24)}
# (N, grid, H, D): odd token counts, H from 1 to 6, every head_dim the tests promise
CASES = [(63, (7, 9), 1, 16), (77, (7, 11), 3, 32), (63, (9, 7), 6, 64), (77, (11, 7), 5, 128), (77, (1, 77), 2, 64)]


def bshd(b, n, h, d, dtype=torch.float32, layout="contiguous"):
    """A (B, N, H, D) tensor in one of the layouts callers produce."""
    if layout == "contiguous":
        return torch.randn(b, n, h, d, dtype=dtype, device=DEV)
    if layout == "bhsd":  # q.transpose(1, 2) of a (B, H, N, D) projection
        return torch.randn(b, h, n, d, dtype=dtype, device=DEV).transpose(1, 2)
    if layout == "sliced":  # a q slice of a fused qkv projection: non-unit head and token strides
        return torch.randn(b, n, h, 3 * d, dtype=dtype, device=DEV)[..., d:2 * d]
    raise ValueError(layout)


def tol(dtype):
    return TOL[dtype]


def section_of(d):
    return SECTIONS[d]


# --------------------------------------------------------------------------------------------------
# Values


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,grid,h,d", CASES)
def test_rope_2d_grid_matches_reference(n, grid, h, d, dtype):
    x = bshd(2, n, h, d, dtype, layout="bhsd" if h % 2 else "sliced")
    out = lk.rope_2d(x, grid, theta=10000.0)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref.rope_2d(x, grid, theta=10000.0), **tol(dtype))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,grid,h,d", CASES)
def test_mrope_matches_reference(n, grid, h, d, dtype):
    x = bshd(2, n, h, d, dtype, layout="sliced" if h % 2 else "bhsd")
    positions = torch.randint(0, 4096, (3, 2, n), device=DEV)
    out = lk.mrope(x, positions, mrope_section=section_of(d), theta=1e6)
    assert out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, ref.mrope(x, positions, mrope_section=section_of(d), theta=1e6), **tol(dtype))


@needs_kernel
@pytest.mark.parametrize("section", [(0, 4, 4), (8, 0, 0), (3, 0, 5)])
def test_mrope_uneven_and_empty_sections(section):
    x = bshd(1, 63, 2, 16)
    positions = torch.stack([torch.randint(0, 50, (1, 63)), torch.randint(100, 200, (1, 63)),
                             torch.randint(300, 400, (1, 63))]).to(DEV)
    out = lk.mrope(x, positions, mrope_section=section, theta=1e4)
    torch.testing.assert_close(out, ref.mrope(x, positions, mrope_section=section, theta=1e4), **TOL[torch.float32])


@needs_kernel
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_rope_2d_explicit_positions(pos_dtype):
    """positions override the grid; strided (expanded over the batch) positions are read correctly."""
    x = bshd(3, 77, 2, 32, layout="bhsd")
    positions = torch.randint(0, 20000, (2, 1, 77), dtype=pos_dtype, device=DEV).expand(2, 3, 77)
    out = lk.rope_2d(x, None, theta=100.0, positions=positions)
    torch.testing.assert_close(out, ref.rope_2d(x, None, theta=100.0, positions=positions), **TOL[torch.float32])
    # a given grid does not change the result when positions are given
    torch.testing.assert_close(lk.rope_2d(x, (7, 11), theta=100.0, positions=positions), out, atol=0, rtol=0)


@needs_kernel
def test_rope_2d_grid_equals_its_positions():
    x = bshd(2, 77, 3, 64)
    positions = ref.grid_positions((7, 11), 2, DEV)
    torch.testing.assert_close(lk.rope_2d(x, (7, 11)), lk.rope_2d(x, None, positions=positions), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# The launcher writes every element of a poisoned buffer, strided or not


@needs_kernel
@pytest.mark.parametrize("kind", ["rope_2d", "mrope"])
def test_launcher_writes_every_output_element(kind):
    x = bshd(2, 77, 5, 32, layout="sliced")
    out = poison_(torch.empty(2, 5, 77, 32, device=DEV)).transpose(1, 2)  # a strided output buffer
    if kind == "rope_2d":
        rope_mod._rope_2d_into(out, x, None, 11, 10000.0, False)
        expected = ref.rope_2d(x, (7, 11))
    else:
        positions = torch.randint(0, 500, (3, 2, 77), device=DEV)
        rope_mod._mrope_into(out, x, positions, (4, 6, 6), 1e6, False)
        expected = ref.mrope(x, positions, mrope_section=(4, 6, 6))
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


# --------------------------------------------------------------------------------------------------
# Inverse rotation and gradients


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["rope_2d", "mrope"])
def test_gradients_match_reference_autograd(kind, dtype):
    n, h, d = 63, 3, 64
    x = bshd(2, n, h, d, dtype, layout="bhsd").requires_grad_()
    xr = x.detach().clone().requires_grad_()
    if kind == "rope_2d":
        fn = lambda t, impl: impl.rope_2d(t, (7, 9))  # noqa: E731
    else:
        positions = torch.randint(0, 1000, (3, 2, n), device=DEV)
        fn = lambda t, impl: impl.mrope(t, positions, mrope_section=SECTIONS[d])  # noqa: E731
    g = torch.randn(2, h, n, d, dtype=dtype, device=DEV).transpose(1, 2)  # a non-contiguous cotangent
    fn(x, lk).backward(g)
    fn(xr, ref).backward(g)
    torch.testing.assert_close(x.grad, xr.grad, **tol(dtype))


@needs_kernel
def test_inverse_flag_undoes_the_rotation():
    x = bshd(2, 77, 4, 128)
    positions = torch.randint(0, 3000, (3, 2, 77), device=DEV)
    y = torch.ops.latte.mrope(x, positions, [16, 24, 24], 1e6, False)
    torch.testing.assert_close(torch.ops.latte.mrope(y, positions, [16, 24, 24], 1e6, True), x, atol=1e-5, rtol=1e-5)
    z = torch.ops.latte.rope_2d(x, None, 11, 1e4, True)
    torch.testing.assert_close(torch.ops.latte.rope_2d(z, None, 11, 1e4, False), x, atol=1e-5, rtol=1e-5)


def test_float64_gradcheck_through_reference_path():
    """float64 takes the reference math behind the same op, including the inverse-rotation backward."""
    x = torch.randn(1, 6, 2, 16, dtype=torch.float64, requires_grad=True)
    positions = torch.randint(0, 30, (3, 1, 6))
    assert not _backend.triton_runs(x)
    torch.autograd.gradcheck(lambda t: lk.mrope(t, positions, mrope_section=(2, 3, 3)), (x,))
    torch.autograd.gradcheck(lambda t: lk.rope_2d(t, (2, 3)), (x,))
    torch.autograd.gradgradcheck(lambda t: lk.rope_2d(t, (2, 3)), (x,))


def test_cpu_bfloat16_takes_reference():
    x = torch.randn(1, 12, 2, 16, dtype=torch.bfloat16)
    assert not _backend.triton_runs(x)
    torch.testing.assert_close(lk.rope_2d(x, (3, 4)), ref.rope_2d(x, (3, 4)), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# In place


@needs_kernel
@pytest.mark.parametrize("kind", ["rope_2d", "mrope"])
def test_inplace_rotates_the_view_and_nothing_else(kind):
    base = torch.randn(2, 63, 3, 48, device=DEV)
    before = base.clone()
    x = base[..., 8:40]  # strided view; the columns around it must stay untouched
    positions = torch.randint(0, 100, (3, 2, 63), device=DEV)
    if kind == "rope_2d":
        expected = ref.rope_2d(x.clone(), (9, 7))
        result = lk.rope_2d(x, (9, 7), inplace=True)
    else:
        expected = ref.mrope(x.clone(), positions, mrope_section=(4, 6, 6))
        result = lk.mrope(x, positions, mrope_section=(4, 6, 6), inplace=True)
    assert result is x
    torch.testing.assert_close(x, expected, **TOL[torch.float32])
    assert torch.equal(base[..., :8], before[..., :8]) and torch.equal(base[..., 40:], before[..., 40:])


def test_inplace_refuses_autograd_and_overlapping_inputs():
    x = torch.randn(1, 4, 2, 16, requires_grad=True)
    with pytest.raises(ValueError, match="x requires grad"):
        lk.rope_2d(x, (2, 2), inplace=True)
    positions = torch.zeros(3, 1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="x requires grad"):
        lk.mrope(x, positions, mrope_section=(2, 3, 3), inplace=True)
    expanded = torch.randn(1, 4, 1, 16).expand(1, 4, 2, 16)
    with pytest.raises(ValueError, match="overlapping"):
        lk.rope_2d(expanded, (2, 2), inplace=True)


# --------------------------------------------------------------------------------------------------
# Validation reuses _validate: a couple of representative failures


def test_bad_arguments_raise_naming_the_argument():
    x = torch.randn(1, 6, 2, 16)
    with pytest.raises(ValueError, match="grid_hw"):
        lk.rope_2d(x, (2, 4))
    with pytest.raises(ValueError, match="positions"):
        lk.mrope(x, torch.zeros(3, 1, 5, dtype=torch.long), mrope_section=(2, 3, 3))
    with pytest.raises(TypeError, match="positions"):
        lk.mrope(x, torch.zeros(3, 1, 6), mrope_section=(2, 3, 3))
    with pytest.raises(ValueError, match="mrope_section"):
        lk.mrope(x, torch.zeros(3, 1, 6, dtype=torch.long), mrope_section=(2, 3, 4))
    with pytest.raises(ValueError, match="head_dim"):
        lk.rope_2d(torch.randn(1, 6, 2, 12), (2, 3))


# --------------------------------------------------------------------------------------------------
# torch.library and torch.compile


@needs_kernel
def test_opcheck():
    x = torch.randn(1, 15, 2, 16, device=DEV)
    pos2 = torch.randint(0, 9, (2, 1, 15), device=DEV)
    pos3 = torch.randint(0, 9, (3, 1, 15), device=DEV)
    torch.library.opcheck(torch.ops.latte.rope_2d.default, (x.requires_grad_(), None, 5, 1e4, False))
    torch.library.opcheck(torch.ops.latte.rope_2d.default, (x, pos2, 0, 1e4, True))
    torch.library.opcheck(torch.ops.latte.mrope.default, (x, pos3, [2, 3, 3], 1e6, False))
    torch.library.opcheck(torch.ops.latte.rope_2d_.default, (torch.randn(1, 15, 2, 16, device=DEV), None, 5, 1e4))
    torch.library.opcheck(torch.ops.latte.mrope_.default, (torch.randn(1, 15, 2, 16, device=DEV), pos3, [2, 3, 3], 1e6))


@needs_kernel
def test_torch_compile_fullgraph():
    """backend="aot_eager": traces the public functions and their backward through the fakes (the
    custom ops stay opaque to inductor anyway; inductor's C++ build is too slow for 2 CPU cores)."""
    torch._dynamo.reset()
    positions = torch.randint(0, 100, (3, 2, 35), device=DEV)

    def f(x):
        y = lk.rope_2d(x, (5, 7), theta=1e4)
        return lk.mrope(y, positions, mrope_section=(4, 6, 6), theta=1e6)

    x = bshd(2, 35, 3, 32, layout="bhsd").requires_grad_()
    xc = x.detach().clone().requires_grad_()
    eager = f(x)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(xc)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
    g = torch.randn_like(eager)
    eager.backward(g)
    compiled.backward(g)
    torch.testing.assert_close(xc.grad, x.grad, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# GPU: low precision against fp64, large angles, CUDA graphs


def _torch_lowp_rotation(x, angle):
    """The same rotation the way PyTorch code (transformers) does it in x's dtype: cos/sin rounded to
    the dtype, ``x * cos + rotate_half(x) * sin`` in that dtype. ``angle``: float32 (B, N, D/2)."""
    cos = torch.cat([angle.cos(), angle.cos()], -1).to(x.dtype).unsqueeze(2)
    sin = torch.cat([angle.sin(), angle.sin()], -1).to(x.dtype).unsqueeze(2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["rope_2d", "mrope"])
def test_gpu_low_precision(kind, dtype):
    """flash-attention's rule: error against fp64 at most 2x that of PyTorch in the same dtype."""
    b, n, h, d = 2, 4096, 12, 128
    x = torch.randn(b, h, n, d, device="cuda", dtype=dtype).transpose(1, 2)
    if kind == "rope_2d":
        pos = ref.grid_positions((64, 64), b, "cuda").float()
        inv = ref.rope_2d_inv_freq(d, 1e4, "cuda")
        angle = torch.cat([pos[0, ..., None] * inv, pos[1, ..., None] * inv], -1)
        out, ref64 = lk.rope_2d(x, (64, 64)), ref.rope_2d(x.double(), (64, 64))
    else:
        positions = torch.randint(0, 32768, (3, b, n), device="cuda")
        axis = torch.repeat_interleave(torch.arange(3, device="cuda"), torch.tensor([16, 24, 24], device="cuda"))
        angle = positions.float()[axis].permute(1, 2, 0) * ref.mrope_inv_freq(d, 1e6, "cuda")
        out = lk.mrope(x, positions, mrope_section=(16, 24, 24))
        ref64 = ref.mrope(x.double(), positions, mrope_section=(16, 24, 24))
    assert_lowp_close(out, _torch_lowp_rotation(x, angle), ref64, factor=2.0)


@pytest.mark.gpu
def test_gpu_large_angles_float32():
    """Positions up to 32k with theta=1e6: tl.cos/tl.sin must be accurate, not approximate, here."""
    x = torch.randn(1, 8192, 2, 128, device="cuda")
    positions = torch.randint(0, 32768, (3, 1, 8192), device="cuda")
    torch.testing.assert_close(lk.mrope(x, positions, mrope_section=(16, 24, 24)),
                               ref.mrope(x, positions, mrope_section=(16, 24, 24)), atol=2e-5, rtol=2e-5)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_replay():
    x = torch.randn(2, 256, 4, 64, device="cuda")
    positions = torch.randint(0, 500, (3, 2, 256), device="cuda")
    out_buf = torch.empty(2, 256, 4, 64, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (compiles the kernels) outside capture
        lk.mrope(x, positions, mrope_section=(8, 12, 12))
        lk.rope_2d(x, (16, 16))
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lk.mrope(x, positions, mrope_section=(8, 12, 12))
        out_buf.copy_(lk.rope_2d(y, (16, 16)))
    x.copy_(torch.randn_like(x))
    positions.copy_(torch.randint(0, 500, positions.shape, device="cuda"))
    poison_(out_buf)
    graph.replay()
    torch.cuda.synchronize()
    expected = ref.rope_2d(ref.mrope(x, positions, mrope_section=(8, 12, 12)), (16, 16))
    torch.testing.assert_close(out_buf, expected, **TOL[torch.float32])
