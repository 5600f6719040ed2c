"""The one place an autotuned kernel's config list passes through before ``triton.autotune``.

``LATTE_KERNELS_AUTOTUNE_MAX=N`` (read when a kernel module is imported) keeps only the first ``N``
configs of every list: for short GPU slots, where first-call autotuning would eat the time. The lists
are ordered best-first, so the first config is each kernel's default. Unset or empty: every config.
"""
from __future__ import annotations

import os

ENV = "LATTE_KERNELS_AUTOTUNE_MAX"


def max_configs() -> int | None:
    """The knob's value: a positive int, or None when unset/empty. Anything else raises ValueError."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{ENV} must be a positive integer, got {raw!r}") from None
    if n < 1:
        raise ValueError(f"{ENV} must be a positive integer, got {raw!r}")
    return n


def limit(configs: list) -> list:
    """``configs`` cut to the knob's first N (all of them when the knob is unset)."""
    n = max_configs()
    return list(configs) if n is None else list(configs)[:n]
