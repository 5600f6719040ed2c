"""Every tensor argument of every public op as a non-contiguous view (SPEC 1): transposed (all dims
reversed), sliced (every other element of the last dim) and expanded (stride 0 over the batch), against
the float64 reference on contiguous copies, forward and gradients (with cotangents of the same layout).
Then the registered backward and in-place ops called directly with strided views of every argument.

A (op, layout) case views all of the op's arguments at once (one interpreter run); when it fails it
re-runs each argument alone and names the ones that break by themselves."""
from typing import Callable, Dict, NamedTuple

import pytest
import torch

import latte_kernels as lk
from latte_kernels import _backend
from latte_kernels import reference as ref
from latte_kernels.context_attention import ensure_registered
from helpers import TOL

f64 = torch.float64
needs_kernel = pytest.mark.skipif(not (torch.cuda.is_available() or _backend.INTERPRET),
                                  reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
LAYOUTS = ("transposed", "sliced", "expanded")


class Op(NamedTuple):
    build: Callable[[], Dict[str, torch.Tensor]]  # contiguous arguments, by name
    call: Callable  # (module, args) -> output tensor or tuple; module is lk or ref
    batch_dim: Dict[str, int] = {}  # the batch axis of arguments where it is not 0


def _randint(*shape, high=40):
    return torch.randint(0, high, shape)


def _residual_args(nk):
    t = torch.randn
    return dict(q=t(2, 12, 4, 16), k=t(2, nk, 2, 16), v=t(2, nk, 2, 16), q_prev=t(2, 12, 4, 16),
                k_prev=t(2, nk, 2, 16), gate=t(2, 4), out_c=t(2, 12, 4, 16), lse_c=t(2, 4, 12) + 1.0)


def _residual(rope_grid):
    def call(m, a):
        return m.residual_attention(a["q"], a["k"], a["v"], q_prev=a["q_prev"], k_prev=a["k_prev"], gate=a["gate"],
                                    scale=0.37, prev_scale=0.21, state=(a["out_c"], a["lse_c"]), rope_grid=rope_grid)
    return call


def _latte_args():
    a = _residual_args(12)
    del a["out_c"], a["lse_c"]
    return dict(a, k_ctx=torch.randn(2, 7, 2, 16), v_ctx=torch.randn(2, 7, 2, 16), ctx_lens=torch.tensor([7, 3]))


def _latte(m, a):
    return m.latte_attention(a["q"], a["k"], a["v"], (3, 4), k_ctx=a["k_ctx"], v_ctx=a["v_ctx"], ctx_lens=a["ctx_lens"],
                             q_prev=a["q_prev"], k_prev=a["k_prev"], gate=a["gate"])


OPS = {
    "rope_2d": Op(lambda: dict(x=torch.randn(2, 12, 3, 16)), lambda m, a: m.rope_2d(a["x"], (3, 4))),
    "rope_2d_positions": Op(lambda: dict(x=torch.randn(2, 12, 3, 16), positions=_randint(2, 2, 12)),
                            lambda m, a: m.rope_2d(a["x"], None, positions=a["positions"]), {"positions": 1}),
    "mrope": Op(lambda: dict(x=torch.randn(2, 12, 3, 16), positions=_randint(3, 2, 12, high=4096)),
                lambda m, a: m.mrope(a["x"], a["positions"], mrope_section=(2, 3, 3)), {"positions": 1}),
    "merge_attention_states": Op(
        lambda: dict(out_a=torch.randn(2, 9, 3, 16), lse_a=3 * torch.randn(2, 3, 9), out_b=torch.randn(2, 9, 3, 16),
                     lse_b=3 * torch.randn(2, 3, 9)),
        lambda m, a: m.merge_attention_states(a["out_a"], a["lse_a"], a["out_b"], a["lse_b"])),
    "context_attention": Op(
        lambda: dict(q=torch.randn(2, 9, 4, 16), k_ctx=torch.randn(2, 7, 2, 16), v_ctx=torch.randn(2, 7, 2, 16),
                     ctx_lens=torch.tensor([7, 3])),
        lambda m, a: m.context_attention(a["q"], a["k_ctx"], a["v_ctx"], a["ctx_lens"])),
    "residual_attention": Op(lambda: _residual_args(10), _residual(None)),
    "residual_attention_rope": Op(lambda: _residual_args(12), _residual((3, 4))),
    "latte_attention": Op(_latte_args, _latte),
}


def layout_of(t: torch.Tensor, layout: str, batch_dim: int = 0):
    """``(storage, view)``: a fresh tensor and a function making from it a non-contiguous view that holds
    ``t``'s values (for ``expanded``: its first batch entry, repeated). None where the layout is illegal."""
    if layout == "transposed":
        if t.dim() < 2:
            return None
        perm = list(range(t.dim()))[::-1]
        return t.permute(perm).contiguous(), lambda s: s.permute(perm)
    if layout == "sliced":
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big, lambda s: s[..., ::2]
    if layout == "expanded":
        return t.narrow(batch_dim, 0, 1).clone(), lambda s: s.expand(t.shape)
    raise ValueError(layout)


def _run(op: Op, module, storages, views, dtype, cotangents):
    """Outputs and the gradients of every floating storage (a leaf) of one call."""
    leaves = {n: (s.to(dtype) if s.is_floating_point() else s).detach().clone() for n, s in storages.items()}
    for s in leaves.values():
        s.requires_grad_(s.is_floating_point())
    args = {n: views[n](s) if n in views else s for n, s in leaves.items()}
    for n in views:
        assert not args[n].is_contiguous(), f"{n}: the test's view is contiguous"
    outs = op.call(module, args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    floating = [n for n, s in leaves.items() if s.requires_grad]
    cots = [c.to(o.dtype) for o, c in zip(outs, cotangents)]
    grads = torch.autograd.grad(outs, [leaves[n] for n in floating], cots)
    return [o.detach() for o in outs], dict(zip(floating, grads))


def _close(got, want, what, bad):
    tol = TOL[torch.float32]
    err = (got.double() - want.double()).abs().max().item()
    bound = tol["atol"] + tol["rtol"] * want.double().abs().max().item()
    if not err <= bound:
        bad.append(f"{what}: max error {err:.2e} > {bound:.2e}")


def mismatches(name: str, viewed, layout: str, seed: int = 0):
    """What differs from the reference when the arguments in ``viewed`` come as ``layout`` views."""
    op = OPS[name]
    torch.manual_seed(seed)
    base = op.build()
    storages, views = {}, {}
    for n, t in base.items():
        made = layout_of(t, layout, op.batch_dim.get(n, 0)) if n in viewed else None
        if made is None:
            storages[n] = t
        else:
            storages[n], views[n] = made
    shapes = op.call(ref, {n: views[n](s) if n in views else s for n, s in storages.items()})
    cotangents = []
    for o in shapes if isinstance(shapes, tuple) else (shapes,):  # in the same layout: the backward reads
        storage, view = layout_of(torch.randn(o.shape, dtype=f64), layout)  # them through their strides
        cotangents.append(view(storage))
    got_outs, got_grads = _run(op, lk, storages, views, torch.float32, cotangents)
    want_outs, want_grads = _run(op, ref, storages, views, f64, cotangents)
    bad = []
    for i, (g, w) in enumerate(zip(got_outs, want_outs)):
        _close(g, w, f"output {i}", bad)
    for n in want_grads:
        _close(got_grads[n], want_grads[n], f"d{n}", bad)
    return bad


def legal(name: str, layout: str):
    op = OPS[name]
    torch.manual_seed(0)
    return [n for n, t in op.build().items() if layout_of(t, layout, op.batch_dim.get(n, 0)) is not None]


@needs_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(OPS))
def test_every_argument_as_a_view(name, layout):
    viewed = legal(name, layout)
    bad = mismatches(name, viewed, layout)
    if bad:
        culprits = [n for n in viewed if mismatches(name, [n], layout)]
        pytest.fail(f"{name} with {layout} views of {culprits or viewed} (alone) differs from the reference: {bad}")


# --------------------------------------------------------------------------------------------------
# The registered ops that the public functions do not reach with arbitrary layouts: the backward ops
# (autograd hands them saved outputs; torch.compile users call them directly) and the in-place RoPEs.


def _transposed(t):
    if not isinstance(t, torch.Tensor) or t.dim() < 2:
        return t
    storage, view = layout_of(t, "transposed")
    return view(storage)


def _assert_same_with_views(op, args):
    want = op(*args)
    got = op(*[_transposed(a) for a in args])
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, **TOL[torch.float32], msg=lambda m: f"output {i}: {m}")


@needs_kernel
@pytest.mark.parametrize("rope_grid", [None, [3, 4]])
def test_residual_attention_backward_op_reads_strides(rope_grid):
    a = _residual_args(12)
    fwd = (a["q"], a["k"], a["v"], a["q_prev"], a["k_prev"], a["gate"], a["out_c"], a["lse_c"])
    consts = (0.37, 0.21, rope_grid, 10000.0)
    out, lse = torch.ops.latte.residual_attention(*fwd, *consts)
    _assert_same_with_views(torch.ops.latte.residual_attention_backward,
                            (torch.randn_like(out), torch.randn_like(lse), *fwd, out, lse, *consts))


@needs_kernel
def test_merge_backward_op_reads_strides():
    a = OPS["merge_attention_states"].build()
    fwd = (a["out_a"], a["lse_a"], a["out_b"], a["lse_b"])
    _assert_same_with_views(torch.ops.latte.merge_attention_states_backward,
                            (torch.randn(2, 9, 3, 16), torch.randn(2, 3, 9), *fwd))


def test_context_attention_backward_op_reads_strides():
    ensure_registered()
    a = OPS["context_attention"].build()
    fwd = (a["q"], a["k_ctx"], a["v_ctx"], a["ctx_lens"])
    out, lse = torch.ops.latte_ext.context_attention(*fwd, 0.25)
    _assert_same_with_views(torch.ops.latte_ext.context_attention_backward,
                            (torch.randn_like(out), torch.randn_like(lse), *fwd, out, lse, 0.25))


@needs_kernel
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("which", ["rope_2d_", "rope_2d_grid", "mrope_"])
def test_inplace_rope_ops_read_and_write_through_strides(which, layout):
    x = torch.randn(2, 12, 3, 16)
    positions = _randint(3 if which == "mrope_" else 2, 2, 12)
    if which == "rope_2d_":
        want = ref.rope_2d(x, None, positions=positions)
    elif which == "rope_2d_grid":
        want = ref.rope_2d(x, (3, 4))
    else:
        want = ref.mrope(x, positions, mrope_section=(2, 3, 3), theta=10000.0)
    storage, view = layout_of(x, layout)
    y = view(storage)
    p_storage, p_view = layout_of(positions, layout)
    p = p_view(p_storage)
    if which == "rope_2d_":
        torch.ops.latte.rope_2d_(y, p, 0, 10000.0)
    elif which == "rope_2d_grid":
        torch.ops.latte.rope_2d_(y, None, 4, 10000.0)
    else:
        torch.ops.latte.mrope_(y, p, [2, 3, 3], 10000.0)
    torch.testing.assert_close(y, want, **TOL[torch.float32])
    if layout == "sliced":  # the gaps between the view's elements are untouched
        assert (storage[..., 1::2] == 0).all()
