"""Install: ``pip install --no-build-isolation -e .[test]`` (the extension builds against the torch
already installed, so pip must not hide it in an isolated build environment).

The context-attention extension ``latte_kernels._C`` is built by the ``build_ext`` command below: a
CUDAExtension (csrc/*.cpp + csrc/*.cu for sm_80 and sm_90, on CuTe: needs the CUTLASS headers,
``pip install nvidia-cutlass`` or ``CUTLASS_INCLUDE``, see latte_kernels/_ext.py) when torch has CUDA and
a CUDA toolkit is found, else a CppExtension (csrc/*.cpp, the CPU kernel, no CUTLASS). A failing compiler
fails the install. torch is imported only there, when the extension is built: the metadata steps
(``egg_info``, ``dist_info``) never import it. If torch cannot be imported (pip's build isolation), the
package installs without the extension and ``latte_kernels/_ext.py`` builds it just in time on first use
in a source checkout.

The shipped digits checkpoint (``latteflow/assets/digits/``: weights, config, tokenizer, manifest) is
package data of ``latteflow.assets.digits``, declared as a package so setuptools copies it knowingly.
"""
import glob
import importlib.util
import sys
import warnings
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext

EXT_NAME = "latte_kernels._C"
ASSET_PACKAGES = ["latteflow.assets", "latteflow.assets.digits"]


def _ext_module():
    """latte_kernels/_ext.py alone (not the package, whose import needs triton): the build flags and
    the CUTLASS include lookup live there, shared with the just-in-time build."""
    spec = importlib.util.spec_from_file_location("_latte_ext_build", Path(__file__).parent / "latte_kernels" / "_ext.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torch_extension():
    """``(Extension, torch's BuildExtension)``, or None when torch is not importable here."""
    with warnings.catch_warnings():
        # pip builds the extension before it installs numpy (a runtime dependency): torch then warns that
        # it cannot initialise NumPy, which the extension build never uses
        warnings.filterwarnings("ignore", message=".*Failed to initialize NumPy")
        try:
            import torch
            from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
        except ImportError:
            return None
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cxx = ["-O3", "-std=c++17"]
    if torch.version.cuda is not None and CUDA_HOME is not None:
        ext_build = _ext_module()
        nvcc = ext_build.nvcc_flags(ext_build.cutlass_include())  # RuntimeError naming `pip install nvidia-cutlass`
        ext = CUDAExtension(EXT_NAME, cpp + sorted(glob.glob("csrc/*.cu")),
                            extra_compile_args={"cxx": cxx + ["-DLATTE_WITH_CUDA"], "nvcc": nvcc})
    else:
        ext = CppExtension(EXT_NAME, cpp, extra_compile_args={"cxx": cxx})
    return ext, BuildExtension  # ninja when installed, else setuptools' compiler


class build_ext(_setuptools_build_ext):
    """Builds ``latte_kernels._C`` through torch's ``BuildExtension``, importing torch only when it runs
    (metadata steps finalise this command too, e.g. egg_info's source list, but never run it)."""

    def run(self):
        found = _torch_extension()
        if found is None:
            print("setup.py: torch is not importable here (pip build isolation?); latte_kernels._C is not built now "
                  "and will be built just in time on first use. Use `pip install --no-build-isolation -e .` to build "
                  "it at install time.", file=sys.stderr)
            return
        ext, torch_build_ext = found
        for placeholder in self.extensions:  # keep setuptools' bookkeeping of it, take torch's build settings
            if placeholder.name == ext.name:
                placeholder.__dict__.update(vars(ext))
        delegate = torch_build_ext(self.distribution)
        delegate.__dict__.update(vars(self))  # the options this command was given and finalised with
        if delegate.use_ninja:
            delegate.force = True  # what BuildExtension.finalize_options adds: ninja decides what is stale
        delegate.run()


setup(
    name="latteflow",
    version="0.1.0",
    description="Fused kernels and a fast sampler for LaTtE-Flow (layerwise timestep-expert flow transformers)",
    python_requires=">=3.10",
    # benchmarks/ is not installed (a top-level ``benchmarks`` would collide with other projects'): it runs
    # from a checkout, ``python -m benchmarks.<name>`` in the repository root
    packages=find_packages(include=["latte_kernels", "latte_kernels.*", "latteflow", "latteflow.*"]) + ASSET_PACKAGES,
    package_data={"latteflow.assets.digits": ["*.json", "*.safetensors"]},
    include_package_data=True,
    entry_points={"console_scripts": ["latteflow=latteflow.apps.cli:main"]},
    ext_modules=[Extension(EXT_NAME, sources=[])],  # replaced by build_ext, once torch is imported
    cmdclass={"build_ext": build_ext},
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
