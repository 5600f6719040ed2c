"""Helpers the tests share: output poisoning, dtype tolerances, the low-precision error rule."""
import contextlib
import os

import torch

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fills ``t`` with NaN (floating) or an out-of-range sentinel (integer) so an unwritten tile
    fails the comparison. Use on output buffers before a kernel writes them."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).min)


def poisoned_empty(*shape, dtype, device) -> torch.Tensor:
    return poison_(torch.empty(*shape, dtype=dtype, device=device))


# Tolerances per dtype for comparisons against a float32/float64 reference (one table, STYLE.md).
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def assert_lowp_close(out, ref_lowp, ref_fp64, factor: float = 2.0, eps: float = 1e-6):
    """flash-attention's rule: the kernel's max error against fp64 is at most ``factor`` times the
    error of the same computation done by PyTorch in the low precision."""
    err = (out.double() - ref_fp64.double()).abs().max().item()
    base = (ref_lowp.double() - ref_fp64.double()).abs().max().item()
    assert err <= factor * base + eps, f"error {err:.3e} > {factor} x PyTorch's {base:.3e} (+{eps})"


@contextlib.contextmanager
def descriptor_path():
    """Makes the residual-attention kernels take their tensor-descriptor (Hopper) path on any tensor,
    so the interpreter runs it on CPU; yields the list of shapes the path was taken for. The interpreter
    executes descriptor loads but has no bulk reduction: one is added as load, add, store (the
    interpreter runs one program at a time, so that is the reduction's result)."""
    from triton.runtime import interpreter

    from latte_kernels import _tma

    def create_descriptor_reduce(self, kind, desc, value, indices):
        ptrs, mask = desc.materialize_pointers(indices)
        old = self.create_masked_load(ptrs, mask, None, None, False)
        return self.create_masked_store(ptrs, interpreter.TensorHandle(old.data + value.data, old.dtype), mask, None)

    builder = interpreter.InterpreterBuilder
    added = not hasattr(builder, "create_descriptor_reduce")
    if added:
        builder.create_descriptor_reduce = create_descriptor_reduce
    taken, enabled = [], _tma.enabled
    _tma.enabled = lambda t: taken.append(tuple(t.shape)) or True
    try:
        yield taken
    finally:
        _tma.enabled = enabled
        if added:
            del builder.create_descriptor_reduce
