"""The tensor-descriptor (TMA) path of the residual-attention kernels, which Hopper GPUs take, run on
CPU through the interpreter (``helpers.descriptor_path``): the same outputs and gradients as the float64
reference for odd sizes, GQA, state, RoPE, a padded head dim, scale 0 and non-contiguous inputs (copied
to an addressable layout first); on a Hopper GPU, the same results as the pointer path."""
import pytest
import torch

import helpers
import latte_kernels as lk
from latte_kernels import _tma
from latte_kernels import reference as ref
from test_residual_attention import as_f64, assert_close, case, grads, leaves, names_of, needs_kernel
from test_residual_attention import test_gradients_float16 as float16_gradients_match  # not collected twice

f64 = torch.float64
pytestmark = [needs_kernel, pytest.mark.skipif(_tma.TensorDescriptor is None, reason="Triton without tensor descriptors")]


@pytest.fixture
def descriptor_path():
    with helpers.descriptor_path() as taken:
        yield taken


@pytest.mark.parametrize("b,nq,nk,hq,hkv,d,opts", [
    (2, 77, 63, 6, 1, 32, dict()),
    (1, 130, 77, 4, 2, 40, dict(state=True)),  # head dim padded to 64: columns past D read as 0
    (2, 63, 63, 2, 2, 24, dict(rope=True, noncontig=True)),
    (1, 77, 130, 6, 3, 64, dict(noncontig=True)),
    (1, 20, 9, 2, 1, 16, dict(res=False)),
    (1, 70, 66, 4, 2, 32, dict(state=True, scale=0.0)),  # QK_ZERO: the q . k products are skipped
])
def test_descriptor_path_gradients_match_reference(descriptor_path, b, nq, nk, hq, hkv, d, opts):
    opts = dict(opts)
    scale = opts.pop("scale", None)
    args, kw = case(b, nq, nk, hq, hkv, d, **opts)
    if scale is not None:
        kw["scale"] = scale
    d_out, d_lse = torch.randn(b, nq, hq, d, dtype=f64), torch.randn(b, hq, nq, dtype=f64)
    _, _, got = grads(lk.residual_attention, args, kw, d_out, d_lse)
    _, _, want = grads(ref.residual_attention, *as_f64(args, kw), d_out, d_lse)
    assert descriptor_path, "the backward did not take the descriptor path"
    for name, g, w, x in zip(names_of(kw), got, want, leaves(args, kw)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert_close(g, w, torch.float32, f"d{name}")


def test_descriptor_path_float16(descriptor_path):
    float16_gradients_match()
    assert descriptor_path


def test_addressable_copies_only_what_a_descriptor_cannot_address():
    x = torch.randn(2, 5, 3, 16)
    assert lk_same(_tma.addressable(x), x)
    assert lk_same(_tma.addressable(x[:, 1:]), x[:, 1:])  # row offset: 3 * 16 * 4 bytes, aligned
    assert lk_same(_tma.addressable(x.transpose(1, 2)[..., :8].transpose(1, 2)), x.transpose(1, 2)[..., :8].transpose(1, 2))
    odd = torch.randn(2, 5, 3, 10)[..., :8]  # a row of 10 floats: 40-byte strides
    expanded = torch.randn(2, 5, 1, 16).expand(2, 5, 3, 16)  # stride 0 over the heads
    for view in (x[..., 1:9], odd, x.transpose(-1, -2), expanded):  # misaligned base / strides, strided last dim
        got = _tma.addressable(view)
        assert got.data_ptr() != view.data_ptr() and got.is_contiguous() and torch.equal(got, view)


def lk_same(a, b):
    return a.data_ptr() == b.data_ptr() and a.stride() == b.stride()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="the descriptor path runs on Hopper or newer")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_descriptor_path_matches_pointer_path(monkeypatch, dtype):
    """On Hopper both paths compile for the GPU: the same outputs and gradients up to the 16-bit rounding
    of their different summation orders (the float64 comparisons of either are in test_residual_attention)."""
    args, kw = case(2, 1000, 1000, 6, 2, 128, state=True, dtype=dtype, device="cuda")
    d_out = torch.randn(2, 1000, 6, 128, device="cuda", dtype=f64)
    d_lse = torch.randn(2, 6, 1000, device="cuda", dtype=f64)
    assert _tma.enabled(args[0])
    out, lse, gs = grads(lk.residual_attention, args, kw, d_out, d_lse)
    monkeypatch.setattr(_tma, "enabled", lambda t: False)
    out_p, lse_p, gs_p = grads(lk.residual_attention, args, kw, d_out, d_lse)
    for name, a, p in zip(["out", "lse"] + names_of(kw), [out, lse, *gs], [out_p, lse_p, *gs_p]):
        err = (a.double() - p.double()).abs().max().item() / (p.double().abs().max().item() + 1e-6)
        assert err < 2e-2, f"{name}: descriptor and pointer paths differ by {err:.2e} of the tensor's scale"
