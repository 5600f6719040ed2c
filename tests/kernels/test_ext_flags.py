"""The just-in-time build's nvcc flags: LATTE_NVCC_THREADS adds nvcc's --threads (gpu_check sets it so
each file's two architectures compile at once); unset, the flags are exactly nvcc_flags()."""
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp

from latte_kernels import _ext


@pytest.fixture
def captured(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(_ext, "with_cuda", lambda: True)
    monkeypatch.setattr(_ext, "cutlass_include", lambda: Path("/nowhere/include"))
    monkeypatch.setattr(_ext, "_ROOT", tmp_path)
    monkeypatch.setattr(cpp, "load", lambda **kw: seen.update(kw))
    return seen


def test_threads_flag_only_when_asked(captured, monkeypatch):
    monkeypatch.delenv("LATTE_NVCC_THREADS", raising=False)
    _ext._jit_build()
    assert captured["extra_cuda_cflags"] == _ext.nvcc_flags(Path("/nowhere/include"))
    monkeypatch.setenv("LATTE_NVCC_THREADS", "2")
    _ext._jit_build()
    assert captured["extra_cuda_cflags"][-1] == "--threads=2"
    assert captured["extra_cuda_cflags"][:-1] == _ext.nvcc_flags(Path("/nowhere/include"))


def test_bad_threads_value_is_refused_naming_the_variable(captured, monkeypatch):
    monkeypatch.setenv("LATTE_NVCC_THREADS", "two")
    with pytest.raises(ValueError, match="LATTE_NVCC_THREADS"):
        _ext._jit_build()
    assert captured == {}
