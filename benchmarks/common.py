"""What every benchmark shares: timing, device facts, and the one CSV table per device.

Rows: ``op, provider, mode, shape, ms_p50, ms_p20, ms_p80, tflops, gbps, peak_mem_mb, gpu, torch,
triton, commit, date`` appended to ``benchmarks/results/<device>.csv`` (STYLE.md).
"""
from __future__ import annotations

import csv
import datetime
import os
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COLUMNS = ["op", "provider", "mode", "shape", "ms_p50", "ms_p20", "ms_p80", "tflops", "gbps", "peak_mem_mb",
           "gpu", "torch", "triton", "commit", "date"]


def device_name(device: Optional[torch.device] = None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{os.cpu_count()}core"


def results_path(device: Optional[torch.device] = None) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()
    return RESULTS_DIR / f"{slug}.csv"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return ""


def bench(fn: Callable[[], object], device: Optional[torch.device] = None, warmup_ms: float = 100, rep_ms: float = 500) -> Dict[str, float]:
    """Median and 20/80 quantiles in ms; ``triton.testing.do_bench`` on CUDA (autotuning is out of
    the timing: the first calls run before it starts), a wall-clock loop on CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fn()  # compile / autotune outside the timing
    if device.type == "cuda":
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"ms_p50": p50, "ms_p20": p20, "ms_p80": p80}
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    # "inclusive" interpolates between observed times; the default extrapolates (negative p20 on 3 samples)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else times * 9
    return {"ms_p50": statistics.median(times), "ms_p20": q[1], "ms_p80": q[7]}


def peak_memory_mb(fn: Callable[[], object], device: Optional[torch.device] = None) -> Optional[float]:
    """Peak CUDA memory allocated during one call beyond what was live before it; None on CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def write_row(row: Dict[str, object], device: Optional[torch.device] = None, path: Optional[Path] = None) -> Dict[str, object]:
    """Appends one row (missing columns left empty, provenance filled in) and returns it."""
    path = Path(path) if path else results_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {c: "" for c in COLUMNS}
    full.update(gpu=device_name(device), torch=torch.__version__, triton=_triton_version(), commit=_commit(),
                date=datetime.date.today().isoformat())
    for key, value in row.items():
        if key not in full:
            raise KeyError(f"unknown column {key!r}; columns are {COLUMNS}")
        full[key] = f"{value:.4g}" if isinstance(value, float) else value
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(full)
    return full


def measure_copy_bandwidth_gbps(device: Optional[torch.device] = None, mb: int = 1024) -> float:
    """Device-to-device copy bandwidth (read + write bytes over time), the ceiling for memory-bound ops."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = (mb if device.type == "cuda" else 64) * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device)["ms_p50"]
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def measure_matmul_tflops(device: Optional[torch.device] = None, dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """Dense matmul rate, the ceiling for compute-bound ops."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        dtype, n = torch.float32, 512
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    ms = bench(lambda: a @ b, device)["ms_p50"]
    return 2 * n**3 / (ms * 1e-3) / 1e12
