"""Which implementation runs an op: the one place that decides.

- Triton kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before
  ``latte_kernels`` was imported (that is how CI exercises the kernels), for float16, bfloat16 and
  float32 (the interpreter has no bfloat16, so CPU bfloat16 takes the reference). float64 always
  takes the reference: it exists for ``gradcheck``.
- The context-attention extension (``csrc/``) runs on CPU and CUDA whenever it is built or can be
  built just in time; see ``_ext.py``.
- Everything else takes the plain-PyTorch reference.
"""
from __future__ import annotations

import importlib.util
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_runs(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels handle these (same-device) tensors."""
    t = tensors[0]
    if not HAS_TRITON or t.dtype not in _TRITON_DTYPES:
        return False
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and INTERPRET and t.dtype != torch.bfloat16
