"""``lk.residual_attention`` (the Triton kernels, through the interpreter on CPU) against the float64
reference: forward, gradients of every input through random cotangents on both outputs, odd sizes,
GQA, state (with empty rows), in-kernel RoPE, non-contiguous inputs, poisoned buffers, opcheck,
torch.compile; and on a GPU the low-precision rule, CUDA-graph replay and O(N) memory."""
import pytest
import torch

import latte_kernels as lk
from latte_kernels import _backend
from latte_kernels import _residual_attention_fwd as fwd_module
from latte_kernels import reference as ref
from helpers import HAS_CUDA, TOL, assert_lowp_close, poison_

f64 = torch.float64
KERNEL_ON_CPU = _backend.INTERPRET and _backend.HAS_TRITON
needs_kernel = pytest.mark.skipif(not KERNEL_ON_CPU, reason="the Triton kernel runs on CPU only under TRITON_INTERPRET=1")


def make(shape, dtype, device, noncontig=False):
    """Random (B, N, H, D) tensor; ``noncontig`` gives a head-major view with a padded head_dim."""
    if not noncontig:
        return torch.randn(*shape, dtype=dtype, device=device)
    b, n, h, d = shape
    return torch.randn(b, h, n, d + 8, dtype=dtype, device=device)[..., 3:3 + d].transpose(1, 2)


def case(b, nq, nk, hq, hkv, d, *, res=True, state=False, rope=False, noncontig=False, dtype=torch.float32,
         device="cpu", empty_rows=True):
    """Positional inputs and keyword arguments of one call."""
    mk = lambda *s: make(s, dtype, device, noncontig)  # noqa: E731
    args = [mk(b, nq, hq, d), mk(b, nk, hkv, d), mk(b, nk, hkv, d)]
    kw = dict(scale=0.37, prev_scale=0.21)
    if res:
        kw.update(q_prev=mk(b, nq, hq, d), k_prev=mk(b, nk, hkv, d), gate=torch.randn(b, hq, device=device))
    if state:
        lse_c = torch.randn(b, hq, nq, device=device) + 3.0
        if empty_rows:
            lse_c[0, 0, : min(5, nq)] = float("-inf")  # rows whose context was empty
            lse_c[-1, -1, -1] = float("-inf")
        kw["state"] = (mk(b, nq, hq, d), lse_c)
    if rope:
        gw = 7 if nq % 7 == 0 else nq
        kw["rope_grid"] = (nq // gw, gw)
    return args, kw


def leaves(args, kw):
    """Every floating input, in a fixed order, for gradients."""
    out = list(args) + [kw[n] for n in ("q_prev", "k_prev", "gate") if n in kw]
    return out + (list(kw["state"]) if "state" in kw else [])


def rebuild(args, kw, new):
    """The same call with ``new`` (ordered as ``leaves``) substituted."""
    it = iter(new)
    args = [next(it) for _ in args]
    kw = dict(kw)
    for n in ("q_prev", "k_prev", "gate"):
        if n in kw:
            kw[n] = next(it)
    if "state" in kw:
        kw["state"] = (next(it), next(it))
    return args, kw


def as_f64(args, kw):
    return rebuild(args, kw, [t.detach().to(f64) for t in leaves(args, kw)])


def assert_close(got, want, dtype, what=""):
    """Max error within the dtype's tolerance, relative to the tensor's scale (one table: TOL)."""
    tol = TOL[dtype]
    err = (got.double() - want.double()).abs().max().item()
    bound = tol["atol"] + tol["rtol"] * want.double().abs().max().item()
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


def grads(fn, args, kw, d_out, d_lse):
    inputs = [t.detach().clone().requires_grad_(True) for t in leaves(args, kw)]
    a, k = rebuild(args, kw, inputs)
    out, lse = fn(*a, **k)
    gs = torch.autograd.grad((out, lse), inputs, (d_out.to(out.dtype), d_lse.to(lse.dtype)))
    return out, lse, gs


NAMES = ["q", "k", "v", "q_prev", "k_prev", "gate", "out_c", "lse_c"]


def names_of(kw):
    return ["q", "k", "v"] + (NAMES[3:6] if "gate" in kw else []) + (NAMES[6:] if "state" in kw else [])


# (b, nq, nk, hq, hkv, d, options): odd sizes, GQA 1/2/6, head_dim 24/32/40/64, every feature on and off
FWD_CASES = [
    (1, 63, 77, 2, 2, 32, dict(res=False)),
    (2, 77, 63, 6, 1, 32, dict()),
    (1, 130, 130, 4, 2, 64, dict()),
    (2, 63, 130, 2, 1, 40, dict(state=True)),
    (1, 77, 77, 6, 3, 24, dict(rope=True)),
    (2, 63, 63, 6, 1, 32, dict(state=True, rope=True, noncontig=True)),
    (1, 130, 77, 4, 4, 64, dict(res=False, state=True, noncontig=True)),
    (1, 20, 9, 2, 1, 16, dict(state=True)),  # fewer rows and keys than one block
]


@needs_kernel
@pytest.mark.parametrize("b,nq,nk,hq,hkv,d,opts", FWD_CASES)
def test_forward_matches_reference(b, nq, nk, hq, hkv, d, opts):
    args, kw = case(b, nq, nk, hq, hkv, d, **opts)
    out, lse = lk.residual_attention(*args, **kw)
    want_out, want_lse = ref.residual_attention(*as_f64(args, kw)[0], **as_f64(args, kw)[1])
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == (b, nq, hq, d) and lse.shape == (b, hq, nq)
    assert_close(out, want_out, torch.float32, "out")
    assert_close(lse, want_lse, torch.float32, "lse")


@needs_kernel
def test_forward_float16():
    args, kw = case(1, 77, 77, 4, 2, 32, state=True, rope=True, dtype=torch.float16)
    out, lse = lk.residual_attention(*args, **kw)
    want_out, want_lse = ref.residual_attention(*as_f64(args, kw)[0], **as_f64(args, kw)[1])
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    assert_close(out, want_out, torch.float16, "out")
    assert_close(lse, want_lse, torch.float16, "lse")


@needs_kernel
def test_state_merge_is_exact_at_the_edges():
    """An all-empty state changes nothing; a state whose weight dominates passes through."""
    args, kw = case(1, 63, 63, 2, 1, 32)
    plain = lk.residual_attention(*args, **kw)
    out_c = torch.randn_like(args[0])
    empty = lk.residual_attention(*args, **kw, state=(out_c, torch.full_like(plain[1], float("-inf"))))
    torch.testing.assert_close(empty[0], plain[0], atol=0, rtol=0)
    torch.testing.assert_close(empty[1], plain[1], atol=0, rtol=0)
    full = lk.residual_attention(*args, **kw, state=(out_c, torch.full_like(plain[1], 200.0)))
    torch.testing.assert_close(full[0], out_c, atol=1e-6, rtol=0)
    torch.testing.assert_close(full[1], torch.full_like(plain[1], 200.0), atol=1e-5, rtol=0)


GRAD_CASES = [
    (1, 63, 77, 2, 2, 32, dict(res=False)),
    (1, 77, 63, 6, 1, 32, dict(state=True)),
    (2, 63, 130, 4, 2, 40, dict(noncontig=True)),
    (1, 63, 63, 6, 3, 24, dict(state=True, rope=True)),
    (1, 130, 130, 2, 1, 64, dict(state=True, rope=True, noncontig=True)),
]


@needs_kernel
@pytest.mark.parametrize("b,nq,nk,hq,hkv,d,opts", GRAD_CASES)
def test_gradients_match_reference_autograd(b, nq, nk, hq, hkv, d, opts):
    args, kw = case(b, nq, nk, hq, hkv, d, **opts)
    d_out, d_lse = torch.randn(b, nq, hq, d, dtype=f64), torch.randn(b, hq, nq, dtype=f64)
    _, _, got = grads(lk.residual_attention, args, kw, d_out, d_lse)
    _, _, want = grads(ref.residual_attention, *as_f64(args, kw), d_out, d_lse)
    for name, g, w, x in zip(names_of(kw), got, want, leaves(args, kw)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert_close(g, w, torch.float32, f"d{name}")


@needs_kernel
@pytest.mark.parametrize("b,nq,nk,hq,hkv,d,opts", [GRAD_CASES[1], GRAD_CASES[4]])
def test_gradients_deterministic_mode_match_reference(b, nq, nk, hq, hkv, d, opts):
    """The separate query-major dq pass (torch.use_deterministic_algorithms) gives the same gradients."""
    args, kw = case(b, nq, nk, hq, hkv, d, **opts)
    d_out, d_lse = torch.randn(b, nq, hq, d, dtype=f64), torch.randn(b, hq, nq, dtype=f64)
    torch.use_deterministic_algorithms(True)
    try:
        _, _, got = grads(lk.residual_attention, args, kw, d_out, d_lse)
    finally:
        torch.use_deterministic_algorithms(False)
    _, _, want = grads(ref.residual_attention, *as_f64(args, kw), d_out, d_lse)
    for name, g, w in zip(names_of(kw), got, want):
        assert_close(g, w, torch.float32, f"d{name}")


@needs_kernel
def test_gradients_float16():
    args, kw = case(1, 63, 77, 4, 2, 32, state=True, dtype=torch.float16)
    d_out, d_lse = torch.randn(1, 63, 4, 32, dtype=f64), torch.randn(1, 4, 63, dtype=f64)
    _, _, got = grads(lk.residual_attention, args, kw, d_out, d_lse)
    _, _, want = grads(ref.residual_attention, *as_f64(args, kw), d_out, d_lse)
    for name, g, w in zip(names_of(kw), got, want):
        assert_close(g, w, torch.float16, f"d{name}")


@needs_kernel
def test_no_buffer_left_unwritten(monkeypatch):
    """Every buffer the kernels write is NaN-poisoned first; finite inputs must give finite results."""
    def poisoned(shape, dtype, device):
        return poison_(torch.empty(shape, dtype=dtype, device=device))

    monkeypatch.setattr(fwd_module, "empty", poisoned)
    for nk, opts in ((130, dict(state=True)), (77, dict(state=True, rope=True)), (130, dict(res=False))):
        args, kw = case(2, 77, nk, 6, 2, 40, **opts)
        out, lse, gs = grads(lk.residual_attention, args, kw, torch.randn(2, 77, 6, 40), torch.randn(2, 6, 77))
        for name, t in zip(["out", "lse"] + names_of(kw), [out, lse, *gs]):
            assert torch.isfinite(t).all(), f"{name} holds unwritten (NaN) entries with {opts}"


@needs_kernel
def test_opcheck_triton_path():
    args, kw = case(1, 20, 20, 2, 1, 16, state=True)
    q, k, v = args
    out_c, lse_c = kw["state"]
    full = (q, k, v, kw["q_prev"], kw["k_prev"], kw["gate"], out_c, lse_c, 0.3, 0.2, [4, 5], 10000.0)
    bare = (q, k, v, None, None, None, None, None, 0.25, 0.25, None, 10000.0)
    for a in (full, bare):
        torch.library.opcheck(torch.ops.latte.residual_attention.default, tuple(
            t.detach().requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in a))
    out, lse = torch.ops.latte.residual_attention(*full)
    torch.library.opcheck(torch.ops.latte.residual_attention_backward.default,
                          (torch.randn_like(out), torch.randn_like(lse), *full[:8], out, lse, *full[8:]))


def test_opcheck_reference_path():
    """float64 takes the reference with the dense backward, on every machine."""
    args, kw = case(1, 12, 12, 4, 2, 8, state=True, dtype=f64)
    q, k, v = args
    out_c, lse_c = kw["state"]
    full = (q, k, v, kw["q_prev"], kw["k_prev"], kw["gate"], out_c, lse_c, 0.3, 0.2, [3, 4], 10000.0)
    torch.library.opcheck(torch.ops.latte.residual_attention.default, tuple(
        t.detach().requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in full))
    out, lse = torch.ops.latte.residual_attention(*full)
    torch.library.opcheck(torch.ops.latte.residual_attention_backward.default,
                          (torch.randn_like(out), torch.randn_like(lse), *full[:8], out, lse, *full[8:]))


def test_dense_backward_matches_reference_autograd():
    """The non-Triton gradient (float64 here) against autograd of the reference."""
    args, kw = case(2, 15, 15, 6, 2, 16, state=True, rope=True, dtype=f64)
    kw["rope_grid"] = (3, 5)
    d_out, d_lse = torch.randn(2, 15, 6, 16, dtype=f64), torch.randn(2, 6, 15, dtype=f64)
    _, _, got = grads(lk.residual_attention, args, kw, d_out, d_lse)
    _, _, want = grads(ref.residual_attention, args, kw, d_out, d_lse)
    for name, g, w in zip(names_of(kw), got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8, msg=f"d{name}")


@needs_kernel
def test_torch_compile_fullgraph():
    """fullgraph torch.compile of the public function, forward and backward (backend aot_eager: the
    CPU inductor path would need a C++ compiler and adds nothing for an opaque custom op)."""
    args, kw = case(1, 20, 20, 2, 1, 16, state=True)
    kw["rope_grid"] = (4, 5)
    compiled = torch.compile(lambda *a, **k: lk.residual_attention(*a, **k), backend="aot_eager", fullgraph=True)
    d_out, d_lse = torch.randn(1, 20, 2, 16), torch.randn(1, 2, 20)
    out, lse, got = grads(compiled, args, kw, d_out, d_lse)
    want_out, want_lse, want = grads(lk.residual_attention, args, kw, d_out, d_lse)
    torch.testing.assert_close(out, want_out, atol=0, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=0, rtol=0)
    for name, g, w in zip(names_of(kw), got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0, msg=f"d{name}")


def test_bad_head_dim_names_the_argument():
    q = torch.randn(1, 8, 2, 12)
    with pytest.raises(ValueError, match="q head_dim must be a multiple of 8"):
        lk.residual_attention(q, q[:, :, :1], q[:, :, :1])


# --------------------------------------------------------------------------------------------------
# GPU


def lowp_reference(q, k, v, q_prev=None, k_prev=None, gate=None, scale=None, prev_scale=None, state=None,
                   rope_grid=None, rope_theta=10000.0):
    """The same computation done by PyTorch in the inputs' low precision (flash-attention's
    ``upcast=False`` baseline): logits, softmax and the weighted sum all in bf16/fp16."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    prev_scale = scale if prev_scale is None else prev_scale
    if rope_grid is not None:
        rot = lambda x: ref.rope_2d(x, rope_grid, theta=rope_theta)  # noqa: E731
        q, k = rot(q), rot(k)
        if q_prev is not None:
            q_prev, k_prev = rot(q_prev), rot(k_prev)
    hq = q.shape[2]
    heads = lambda t: t.transpose(1, 2).repeat_interleave(hq // t.shape[2], dim=1)  # noqa: E731
    logits = scale * (q.transpose(1, 2) @ heads(k).transpose(-1, -2))
    if q_prev is not None:
        g = torch.tanh(gate).to(q.dtype)[:, :, None, None]
        logits = logits + g * prev_scale * (q_prev.transpose(1, 2) @ heads(k_prev).transpose(-1, -2))
    lse = torch.logsumexp(logits, dim=-1)
    out = (torch.softmax(logits, dim=-1) @ heads(v)).transpose(1, 2)
    if state is not None:
        out_c, lse_c = state
        total = torch.logaddexp(lse_c.to(q.dtype), lse)
        w_c = torch.exp(lse_c.to(q.dtype) - total).transpose(1, 2)[..., None]
        w_s = torch.exp(lse - total).transpose(1, 2)[..., None]
        out, lse = w_c * out_c + w_s * out, total
    return out, lse.float()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,opts", [(64, dict()), (128, dict(state=True, rope=True)), (40, dict(res=False, noncontig=True)),
                                    (256, dict(state=True))])
def test_gpu_low_precision_rule(dtype, d, opts):
    b, n, hq, hkv = 2, 1000, 6, 2
    if opts.get("rope"):
        n = 40 * 25
    args, kw = case(b, n, n, hq, hkv, d, dtype=dtype, device="cuda", **opts)
    if opts.get("rope"):
        kw["rope_grid"] = (40, 25)
    d_out, d_lse = torch.randn(b, n, hq, d, device="cuda", dtype=f64), torch.randn(b, hq, n, device="cuda", dtype=f64)
    out, lse, got = grads(lk.residual_attention, args, kw, d_out, d_lse)
    out64, lse64, want = grads(ref.residual_attention, *as_f64(args, kw), d_out, d_lse)
    outl, lsel, base = grads(lowp_reference, args, kw, d_out, d_lse)
    assert_lowp_close(out, outl, out64)
    assert_lowp_close(lse, lsel, lse64)
    for name, g, gl, w in zip(names_of(kw), got, base, want):
        try:
            assert_lowp_close(g, gl, w)
        except AssertionError as err:
            raise AssertionError(f"d{name}: {err}") from None


@pytest.mark.gpu
def test_gpu_float32_is_not_tf32():
    args, kw = case(1, 500, 300, 4, 2, 64, state=True, device="cuda")
    out, lse = lk.residual_attention(*args, **kw)
    want_out, want_lse = ref.residual_attention(*as_f64(args, kw)[0], **as_f64(args, kw)[1])
    assert_close(out, want_out, torch.float32, "out")
    assert_close(lse, want_lse, torch.float32, "lse")


@pytest.mark.gpu
def test_gpu_backward_is_deterministic_in_deterministic_mode():
    """Default dq/dq_prev come from float32 atomics (order varies); deterministic mode is bitwise stable."""
    args, kw = case(2, 1000, 1000, 12, 2, 128, state=True, dtype=torch.bfloat16, device="cuda")
    d_out, d_lse = torch.randn(2, 1000, 12, 128, device="cuda"), torch.randn(2, 12, 1000, device="cuda")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        first = grads(lk.residual_attention, args, kw, d_out, d_lse)[2]
        second = grads(lk.residual_attention, args, kw, d_out, d_lse)[2]
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay():
    args, kw = case(2, 300, 300, 6, 2, 64, state=True, dtype=torch.bfloat16, device="cuda")
    kw["rope_grid"] = (15, 20)
    static = leaves(args, kw)
    a, k = rebuild(args, kw, static)
    op_args = lambda: (*a, k["q_prev"], k["k_prev"], k["gate"], *k["state"], 0.37, 0.21, [15, 20], 10000.0)  # noqa: E731
    d_out = torch.randn(2, 300, 6, 64, device="cuda", dtype=torch.bfloat16)
    d_lse = torch.randn(2, 6, 300, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: autotuning happens outside the capture
        for _ in range(2):
            out, lse = torch.ops.latte.residual_attention(*op_args())
            torch.ops.latte.residual_attention_backward(d_out, d_lse, *op_args()[:8], out, lse, *op_args()[8:])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = torch.ops.latte.residual_attention(*op_args())
        g_all = torch.ops.latte.residual_attention_backward(d_out, d_lse, *op_args()[:8], out, lse, *op_args()[8:])
    for t in static:  # mutate the captured inputs in place, then replay
        if t.dim() == 3:
            t.copy_(torch.randn_like(t) + 3.0)
        else:
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    want_out, want_lse = torch.ops.latte.residual_attention(*op_args())
    want_g = torch.ops.latte.residual_attention_backward(d_out, d_lse, *op_args()[:8], want_out, want_lse, *op_args()[8:])
    torch.testing.assert_close(out, want_out, atol=0, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=0, rtol=0)
    for g, w in zip(g_all, want_g):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


@pytest.mark.gpu
def test_gpu_memory_is_linear_in_n():
    """N = 16384: the reference would need B*Hq*N^2 logits (6 GiB in bf16); the kernels need O(N)."""
    n, hq, hkv, d = 16384, 12, 2, 128
    args, kw = case(1, n, n, hq, hkv, d, state=True, dtype=torch.bfloat16, device="cuda", empty_rows=False)
    inputs = [t.detach().requires_grad_(True) for t in leaves(args, kw)]
    a, k = rebuild(args, kw, inputs)

    def step():
        out, lse = lk.residual_attention(*a, **k)
        (out.float().sum() + lse.sum()).backward()
        return out

    step()  # autotuning (and its benchmarking buffers) outside the measurement
    for t in inputs:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    q_bytes = args[0].numel() * args[0].element_size()
    assert torch.isfinite(out).all() and torch.isfinite(inputs[0].grad).all()
    assert extra < 16 * q_bytes, f"peak extra {extra / 2**20:.0f} MiB is not O(N) (q is {q_bytes / 2**20:.0f} MiB)"


# --------------------------------------------------------------------------------------------------
# An empty state (lse_c = -inf) contributes nothing, even where out_c holds NaN (SPEC 2.3, 2.5)


# the kernels form w * out_c of an empty row (inf * 0 here) and discard it with a select: numpy, under
# the interpreter, warns about the discarded value
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("path", ["kernel", "torch-path", "reference"])
@pytest.mark.parametrize("rope", [False, True])
def test_empty_state_holding_nan_contributes_nothing(path, rope):
    if path == "kernel" and not KERNEL_ON_CPU:
        pytest.skip("the Triton kernel runs on CPU only under TRITON_INTERPRET=1")
    fn = ref.residual_attention if path == "reference" else lk.residual_attention
    dtype = torch.float32 if path == "kernel" else f64
    args, kw = case(2, 63, 63, 4, 2, 16, state=True, rope=rope, dtype=dtype)
    out_c, lse_c = kw["state"]
    lse_c = lse_c.to(dtype)
    lse_c[1, 2, 10:20] = float("-inf")
    clean = dict(kw, state=(out_c.masked_fill(torch.isneginf(lse_c).transpose(1, 2)[..., None], 0.0), lse_c))
    poisoned = out_c.clone()
    poisoned[0, 0:5, 0] = float("nan")  # rows 0..4 of head 0, batch 0 (lse_c = -inf there)
    poisoned[-1, -1, -1] = float("nan")
    poisoned[1, 10:20, 2] = float("inf")
    dirty = dict(kw, state=(poisoned, lse_c))
    d_out, d_lse = torch.randn(2, 63, 4, 16, dtype=f64), torch.randn(2, 4, 63, dtype=f64)
    out, lse, got = grads(fn, args, dirty, d_out, d_lse)
    want_out, want_lse, want = grads(fn, args, clean, d_out, d_lse)
    torch.testing.assert_close(out, want_out, atol=0, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=0, rtol=0)
    for name, g, w in zip(names_of(kw), got, want):
        assert torch.isfinite(g).all(), f"d{name} is not finite"
        torch.testing.assert_close(g, w, atol=0, rtol=0, msg=lambda m: f"d{name}: {m}")
