"""The CuTe layout algebra of the CUDA context-attention kernels, checked on the host (no GPU): tile
coverage of every tiled MMA and copy, swizzle bijectivity and bank-conflict freedom, ldmatrix
simulated by the PTX definition against each MMA fragment, the accumulator views the softmax and
P V use, and the GQA row packing with its inverse (tests/kernels/cute_layouts.cpp says what each
check proves). Built with nvcc's host compiler (or g++ with $CUDA_HOME); skips only where no
compiler or no CUTLASS/CUDA headers exist, and never under CI."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from latte_kernels import _ext

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).with_name("cute_layouts.cpp")


def _missing(why: str):
    if os.environ.get("CI") == "true":  # CI installs nvidia-cutlass and has nvcc: a skip would hide a gap
        pytest.fail(f"CI must run the CuTe layout checks: {why}")
    pytest.skip(why)


def _compiler(include: Path):
    flags = ["-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", f"-I{include}"]
    if shutil.which("nvcc"):
        return ["nvcc", "-x", "c++", *flags]
    cuda = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cuda and cxx and (Path(cuda) / "include" / "cuda_runtime_api.h").is_file():
        return [cxx, *flags, f"-I{Path(cuda) / 'include'}", f"-I{Path(cuda) / 'include' / 'cccl'}"]
    return None


@pytest.fixture(scope="module")
def layout_report(tmp_path_factory):
    try:
        include = _ext.cutlass_include()
    except RuntimeError as e:
        _missing(str(e))
    cmd = _compiler(include)
    if cmd is None:
        _missing("no nvcc, and no host C++ compiler with CUDA_HOME headers, to build cute_layouts.cpp")
    exe = tmp_path_factory.mktemp("cute") / "cute_layouts"
    built = subprocess.run([*cmd, str(SOURCE), "-o", str(exe)], capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, f"cute_layouts.cpp does not build:\n{built.stderr[-6000:]}"
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    return ran


def test_every_layout_check_passes(layout_report):
    out = layout_report.stdout
    assert layout_report.returncode == 0, f"layout check failed:\n{out[-4000:]}{layout_report.stderr[-2000:]}"
    assert "FAIL" not in out
    assert "all 137 layout checks passed" in out


@pytest.mark.parametrize("what", [
    "ldmatrix.trans delivers each lane's fragment exactly",
    "accumulator read as the A operand holds exactly the A fragment",
    "held by exactly one quad",
    "swizzled layout is a bijection",
    "covers 128x128 once in aligned 16-byte chunks",
    "gqa: packed row r = i * G + g",
])
def test_named_properties_are_checked(layout_report, what):
    assert what in layout_report.stdout


def test_cutlass_include_from_the_environment(monkeypatch):
    try:
        found = _ext.cutlass_include()
    except RuntimeError as e:
        _missing(str(e))
    monkeypatch.setenv("CUTLASS_INCLUDE", str(found))
    assert _ext.cutlass_include() == found
    monkeypatch.delenv("CUTLASS_INCLUDE")
    monkeypatch.setenv("CUTLASS_PATH", str(found.parent))
    if (found.parent / "include") == found:
        assert _ext.cutlass_include() == found


def test_missing_cutlass_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("CUTLASS_INCLUDE", str(tmp_path))
    with pytest.raises(RuntimeError, match="pip install nvidia-cutlass"):
        _ext.cutlass_include()
    monkeypatch.delenv("CUTLASS_INCLUDE")
    monkeypatch.delenv("CUTLASS_PATH", raising=False)
    monkeypatch.setattr(_ext.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install nvidia-cutlass"):
        _ext.cutlass_include()
