"""Which implementation runs an op: the one place that decides.

- Triton kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before
  ``latte_kernels`` was imported (that is how CI exercises the kernels), for float16, bfloat16 and
  float32 (the interpreter has no bfloat16, so CPU bfloat16 takes the reference). float64 always
  takes the reference: it exists for ``gradcheck``.
- The context-attention extension (``csrc/``) runs on CPU for every float dtype (float64 computed in
  float64, so ``gradcheck`` goes through the C++ kernel) and on CUDA for float16, bfloat16 and
  float32 (CUDA float64 takes the reference); ``_ext.py`` builds or loads it.
- Everything else takes the plain-PyTorch reference.
- ``LATTE_KERNELS_BACKEND=reference`` (read at import) sends every op to the plain-PyTorch reference
  on every device: no Triton launch, and the extension is never built or loaded. The escape hatch for
  a user who meets a kernel bug on their GPU. The default is ``auto`` (the rules above).

Triton launches on the current CUDA device, so every launch runs inside ``device_guard`` of its
tensors: tensors on ``cuda:1`` launch there even while ``cuda:0`` is current.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BACKEND = os.environ.get("LATTE_KERNELS_BACKEND", "auto").strip().lower() or "auto"
if BACKEND not in ("auto", "reference"):
    raise ValueError(f"LATTE_KERNELS_BACKEND must be 'auto' or 'reference', got {BACKEND!r}")
REFERENCE_ONLY = BACKEND == "reference"
HAS_TRITON = importlib.util.find_spec("triton") is not None
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CUDA_EXT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_runs(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels handle these (same-device) tensors."""
    t = tensors[0]
    if REFERENCE_ONLY or not HAS_TRITON or t.dtype not in _TRITON_DTYPES:
        return False
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and INTERPRET and t.dtype != torch.bfloat16


def extension_runs(t: torch.Tensor) -> bool:
    """Whether the csrc extension handles this (validated) tensor's op."""
    if REFERENCE_ONLY:
        return False
    if t.device.type == "cpu":
        return True
    return t.device.type == "cuda" and t.dtype in _CUDA_EXT_DTYPES


def device_guard(t: torch.Tensor):
    """The context a Triton launch on ``t``'s tensors runs in: ``t``'s CUDA device made current (a
    host-side switch, safe under CUDA-graph capture), nothing for CPU tensors (the interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
