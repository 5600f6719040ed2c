"""The C++/CUDA extension (``csrc/``): the only module that knows how it is built and loaded.

``load()`` returns ``torch.ops.latte_ext`` with the extension's ops registered:

1. ``latte_kernels._C`` when it was built at install time (``pip install -e .`` or
   ``python setup.py build_ext --inplace``);
2. otherwise, in a source checkout, a just-in-time build of ``csrc/`` with
   ``torch.utils.cpp_extension.load`` into ``build/latte_ext_jit/<torch version>/`` (CPU sources only
   when torch has no CUDA), done once and cached on disk; ``MAX_JOBS`` files compile at once and
   ``LATTE_NVCC_THREADS=N`` lets nvcc compile each file's architectures on N threads;
3. otherwise one ``RuntimeError`` saying how to build it, with the compiler's last lines.

The CUDA kernels are written on CuTe, so a CUDA build needs the CUTLASS headers: ``cutlass_include()``
finds them (``$CUTLASS_INCLUDE``, ``$CUTLASS_PATH/include``, or the ``nvidia-cutlass`` wheel) and says
``pip install nvidia-cutlass`` when they are missing. The CPU build needs none of it. ``setup.py``
reads the compile flags from here, so both builds compile the same way.

Nothing here runs at import time; the result (or the failure) is cached for the process.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import threading
from pathlib import Path
from typing import Optional

import torch

_ROOT = Path(__file__).resolve().parent.parent
_CSRC = _ROOT / "csrc"
_LOCK = threading.Lock()
_LOADED = False
_ERROR: Optional[str] = None

HOW_TO_BUILD = (
    "build it with `pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace` "
    "in the repository root (needs a C++17 compiler; nvcc too where torch has CUDA)"
)


def with_cuda() -> bool:
    """Whether builds include the CUDA kernels: torch was built with CUDA and a toolkit is found."""
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


CUTLASS_HINT = (
    "pip install nvidia-cutlass (the headers are all that is used: `pip install --no-deps nvidia-cutlass` "
    "suffices), or set CUTLASS_INCLUDE to a folder holding cute/ and cutlass/ (CUTLASS_PATH: a CUTLASS checkout)"
)


def _has_headers(path: Path) -> bool:
    return (path / "cute" / "tensor.hpp").is_file() and (path / "cutlass" / "cutlass.h").is_file()


def cutlass_include() -> Path:
    """The CUTLASS/CuTe include folder the CUDA kernels compile against: ``$CUTLASS_INCLUDE``, else
    ``$CUTLASS_PATH/include``, else the ``nvidia-cutlass`` wheel's ``cutlass_library/source/include``.
    A variable that is set must point at the headers. Raises RuntimeError naming the fix."""
    for var, sub in (("CUTLASS_INCLUDE", ""), ("CUTLASS_PATH", "include")):
        value = os.environ.get(var)
        if value:
            path = Path(value) / sub if sub else Path(value)
            if not _has_headers(path):
                raise RuntimeError(f"{var}={value} holds no CUTLASS headers (expected {path}/cute/tensor.hpp); "
                                   f"{CUTLASS_HINT}")
            return path
    spec = importlib.util.find_spec("cutlass_library")  # locates the wheel without importing it
    if spec is not None and spec.origin:
        path = Path(spec.origin).resolve().parent / "source" / "include"
        if _has_headers(path):
            return path
    raise RuntimeError(f"building the CUDA kernels needs the CUTLASS (CuTe) headers, which were not found: "
                       f"{CUTLASS_HINT}")


def nvcc_flags(include: Path) -> list:
    """nvcc flags of the CUDA kernels (sm_80 and sm_90; the SM80 tensor-core path runs on both)."""
    return ["-O3", "-std=c++17", "-DLATTE_WITH_CUDA", "--expt-relaxed-constexpr", f"-I{include}",
            # torch's extension flags hide the fp16/bf16 operators CUTLASS's types are built on
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]


def _sources(cuda: bool):
    cpp = sorted(str(p) for p in _CSRC.glob("*.cpp"))
    return cpp + (sorted(str(p) for p in _CSRC.glob("*.cu")) if cuda else [])


def _jit_build() -> None:
    from torch.utils.cpp_extension import load as cpp_load

    cuda = with_cuda()
    tag = f"torch{torch.__version__}-{'cuda' + str(torch.version.cuda) if cuda else 'cpu'}"
    build_dir = _ROOT / "build" / "latte_ext_jit" / tag.replace("+", "_")
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = ["-O3", "-std=c++17"] + (["-DLATTE_WITH_CUDA"] if cuda else [])
    cuda_flags = nvcc_flags(cutlass_include()) if cuda else None
    threads = os.environ.get("LATTE_NVCC_THREADS", "")
    if cuda and threads:  # nvcc compiles a file's architectures in parallel (MAX_JOBS parallelises files)
        if not threads.isdigit():
            raise ValueError(f"LATTE_NVCC_THREADS must be a non-negative integer, got {threads!r}")
        cuda_flags = cuda_flags + [f"--threads={threads}"]
    cpp_load(name="latte_ext_jit", sources=_sources(cuda), extra_cflags=flags,
             extra_cuda_cflags=cuda_flags, build_directory=str(build_dir),
             with_cuda=cuda, is_python_module=False, verbose=False)


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def load():
    """``torch.ops.latte_ext`` with the extension loaded; raises RuntimeError if it cannot be."""
    global _LOADED, _ERROR
    if _LOADED:
        return torch.ops.latte_ext
    with _LOCK:
        if _ERROR is not None:
            raise RuntimeError(_ERROR)
        if not _LOADED:
            try:
                importlib.import_module("latte_kernels._C")
            except ImportError as installed_error:
                if not (_CSRC / "binding.cpp").exists():
                    _ERROR = (f"latte_kernels' C++ extension (latte_kernels._C) is not built and no csrc/ "
                              f"sources are next to the package to build it from ({installed_error}); reinstall "
                              f"from a source checkout: {HOW_TO_BUILD}")
                    raise RuntimeError(_ERROR) from None
                if os.environ.get("LATTE_NO_JIT", "0") == "1":
                    _ERROR = f"latte_kernels._C is not built and LATTE_NO_JIT=1 forbids a just-in-time build; {HOW_TO_BUILD}"
                    raise RuntimeError(_ERROR) from None
                try:
                    _jit_build()
                except Exception as e:  # compiler missing or failing: one clear error, with its tail
                    _ERROR = (f"latte_kernels' C++ extension is not built and building it just in time failed; "
                              f"{HOW_TO_BUILD}.\nLast lines of the build output:\n{_tail(str(e))}")
                    raise RuntimeError(_ERROR) from None
            _LOADED = True
    return torch.ops.latte_ext


def _reset_for_tests() -> None:
    """Forgets a cached failure (tests that simulate one restore the state with this)."""
    global _ERROR
    _ERROR = None
