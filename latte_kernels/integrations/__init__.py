"""Adapters that route third-party models through latte_kernels ops.

Each adapter lives in its own module and imports its library (e.g. transformers) only when called,
so importing ``latte_kernels`` never needs those libraries.
"""
from .qwen2_vl import apply_to_qwen2_vl

__all__ = ["apply_to_qwen2_vl"]
