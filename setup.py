"""Install: ``pip install -e .[test]``. The C++/CUDA extension for context attention is built here
when a compiler is present (see ``latte_kernels/_ext.py`` for the just-in-time fallback)."""
from setuptools import find_packages, setup

setup(
    name="latteflow",
    version="0.1.0",
    description="Fused kernels and a fast sampler for LaTtE-Flow (layerwise timestep-expert flow transformers)",
    python_requires=">=3.10",
    packages=find_packages(include=["latte_kernels", "latte_kernels.*", "latteflow", "latteflow.*", "benchmarks"]),
    package_data={"latteflow": ["assets/digits/*"]},
    include_package_data=True,
    entry_points={"console_scripts": ["latteflow=latteflow.cli:main"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.45",
        "numpy",
        "safetensors",
        "pillow",
        "tqdm",
        "scikit-learn",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "dcae": ["diffusers"],
        "bench": ["matplotlib"],
    },
)
