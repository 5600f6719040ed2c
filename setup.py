"""Install: ``pip install --no-build-isolation -e .[test]`` (the extension builds against the torch
already installed, so pip must not hide it in an isolated build environment).

The context-attention extension ``latte_kernels._C`` is built here: a CUDAExtension (csrc/*.cpp +
csrc/*.cu for sm_80 and sm_90, on CuTe: needs the CUTLASS headers, `pip install nvidia-cutlass` or
CUTLASS_INCLUDE, see latte_kernels/_ext.py) when torch has CUDA and a CUDA toolkit is found, else a
CppExtension (csrc/*.cpp, the CPU kernel, no CUTLASS). A failing compiler fails the install. If torch
cannot be imported (pip's build isolation), the package installs without it and
``latte_kernels/_ext.py`` builds it just in time on first use in a source checkout."""
import glob
import importlib.util
import sys
from pathlib import Path

from setuptools import find_packages, setup


def _ext_module():
    """latte_kernels/_ext.py alone (not the package, whose import needs triton): the build flags and
    the CUTLASS include lookup live there, shared with the just-in-time build."""
    spec = importlib.util.spec_from_file_location("_latte_ext_build", Path(__file__).parent / "latte_kernels" / "_ext.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_build():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("setup.py: torch is not importable here (pip build isolation?); latte_kernels._C is not built now "
              "and will be built just in time on first use. Use `pip install --no-build-isolation -e .` to build "
              "it at install time.", file=sys.stderr)
        return [], {}
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cxx = ["-O3", "-std=c++17"]
    if torch.version.cuda is not None and CUDA_HOME is not None:
        ext_build = _ext_module()
        nvcc = ext_build.nvcc_flags(ext_build.cutlass_include())  # RuntimeError naming `pip install nvidia-cutlass`
        ext = CUDAExtension("latte_kernels._C", cpp + sorted(glob.glob("csrc/*.cu")),
                            extra_compile_args={"cxx": cxx + ["-DLATTE_WITH_CUDA"], "nvcc": nvcc})
    else:
        ext = CppExtension("latte_kernels._C", cpp, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension}  # ninja when installed, else setuptools' compiler


ext_modules, cmdclass = extension_build()

setup(
    name="latteflow",
    version="0.1.0",
    description="Fused kernels and a fast sampler for LaTtE-Flow (layerwise timestep-expert flow transformers)",
    python_requires=">=3.10",
    packages=find_packages(include=["latte_kernels", "latte_kernels.*", "latteflow", "latteflow.*", "benchmarks"]),
    package_data={"latteflow": ["assets/digits/*"]},
    include_package_data=True,
    entry_points={"console_scripts": ["latteflow=latteflow.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.45",
        "numpy",
        "safetensors",
        "pillow",
        "tqdm",
        "scikit-learn",
        "ninja",  # the just-in-time build of the extension (latte_kernels/_ext.py)
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "dcae": ["diffusers"],
        "bench": ["matplotlib"],
        "cuda": ["nvidia-cutlass>=4.2"],  # CuTe headers for the CUDA build (setup.py / _ext.py find them)
    },
)
