"""Tensor descriptors (TMA, Hopper's bulk copy engine) for the residual-attention kernels.

On sm_90 and newer the per-tile loads of the (B, N, H, D) operands and the float32 dq reductions go
through tensor descriptors: the copy engine moves a whole tile between global and shared memory, so
no per-element addresses, masks or staging registers exist (bounds are the descriptor's: rows past N
and columns past D read as 0 and are dropped on writes). That is what keeps the key-major backward at
D=128 within the register file (``tests/kernels/sm90_compile.py``). Older GPUs, float32 and the CPU
interpreter take the pointer path of the same kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _backend

try:  # Triton >= 3.4 (3.6 on the GPU machine, 3.9 in CI)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer path only
    TensorDescriptor = None

_DTYPES = (torch.float16, torch.bfloat16)


def enabled(t: torch.Tensor) -> bool:
    """Whether the kernels on ``t`` (a CUDA tensor of the call) take the descriptor path."""
    return not _backend.INTERPRET and t.is_cuda and supported(t.dtype, torch.cuda.get_device_capability(t.device)[0])


def supported(dtype: torch.dtype, major: int) -> bool:
    """Whether ``dtype`` inputs take the descriptor path on a GPU of compute capability ``major``.x."""
    return TensorDescriptor is not None and dtype in _DTYPES and major >= 9


def addressable(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when a descriptor can address it (unit last stride; 16-byte aligned base; positive,
    16-byte aligned strides below 2^40 bytes: an expanded dimension's stride 0 is not one), else a
    contiguous copy (one O(N) pass)."""
    size = t.element_size()
    outer = [(s * size, n) for s, n in zip(t.stride()[:-1], t.shape[:-1])]
    if t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and \
            all(b % 16 == 0 and (0 < b < 2 ** 40 or n == 1) for b, n in outer):
        return t
    return t.contiguous()


def descriptor(t: torch.Tensor, block_m: int, dp: int):
    """A descriptor of the (B, N, H, D) tensor ``t`` whose block is ``block_m`` rows of one head,
    ``dp`` (the power-of-two padded head dim) wide."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, block_m, 1, dp])


@triton.jit
def rows(X, b, h, start_m, sb, sn, sh, sd, N, D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr,
          TMA: tl.constexpr):
    """Rows ``start_m ..`` of head ``h`` of batch ``b`` of a (B, N, H, D) tensor as a (BLOCK_M, DP) tile,
    0 past ``N`` and ``D``: with ``TMA`` ``X`` is a tensor descriptor of block (1, BLOCK_M, 1, DP) and the
    tile lands in shared memory without passing through registers; else masked pointer loads."""
    if TMA:
        x = tl.reshape(X.load([b, start_m, h, 0]), [BLOCK_M, DP])
    else:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, DP)
        mask = (offs_m < N)[:, None] & (offs_d < D)[None, :]
        x = tl.load(X + b.to(tl.int64) * sb + h * sh + offs_m[:, None] * sn + offs_d[None, :] * sd, mask=mask,
                    other=0.0)
    return x


@triton.jit
def add_rows(X, x, b, h, start_m, N, H, D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr,
              TMA: tl.constexpr):
    """Atomically adds the float32 (BLOCK_M, DP) tile ``x`` into rows ``start_m ..`` of head ``h`` of batch
    ``b`` of a contiguous (B, N, H, D) buffer, dropping what falls past ``N`` or ``D``: with ``TMA`` one
    bulk reduction from shared memory (``X`` a descriptor), else per-element float32 atomics."""
    if TMA:
        X.atomic_add([b, start_m, h, 0], tl.reshape(x, [1, BLOCK_M, 1, DP]))
    else:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, DP)
        mask = (offs_m < N)[:, None] & (offs_d < D)[None, :]
        at = X + (b.to(tl.int64) * N * H + h) * D + offs_m[:, None] * (H * D) + offs_d[None, :]
        tl.atomic_add(at, x, mask=mask, sem="relaxed")
