"""rope_2d and mrope: ours (Triton) against the reference and a plain PyTorch rotation.

Providers:
- ``ours``: ``lk.rope_2d`` / ``lk.mrope`` (the Triton kernel wherever ``_backend.triton_runs``);
- ``reference``: ``latte_kernels.reference`` (float32 math, then rounded);
- ``torch``: what model code does in eager PyTorch: cos/sin tables (B, N, D) from the positions in
  float32, rounded to the dtype, then ``x * cos + rotate_half(x) * sin`` (tables built inside the timing,
  as the op builds its angles inside);
- ``torch_compile``: ``torch.compile`` of that function (CUDA only; inductor is too slow to be worth
  it on a CPU smoke run).

Modes: ``fwd`` (rotate), ``bwd`` (the gradient w.r.t. x given the output's gradient). Bandwidth is the
bytes each mode must move (x or grad read + result written + positions read) over the median time,
printed beside the device's measured copy bandwidth (the SPEC 5 target is >= 80% of it).

    python -m benchmarks.bench_rope            # CUDA: SPEC shapes, rows to benchmarks/results/<gpu>.csv
    python -m benchmarks.bench_rope --quick    # one tiny shape, any device; on CPU rows go to a temp file
    python -m benchmarks.bench_rope --n 4096 --d 128 --heads 12 --providers ours torch   # one shape
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

import latte_kernels as lk
from latte_kernels import reference as ref

from .common import bench, measure_copy_bandwidth_gbps, peak_memory_mb, results_path, write_row

SECTIONS = {64: (8, 12, 12), 128: (16, 24, 24)}
GRIDS = {1024: (32, 32), 4096: (64, 64), 16384: (128, 128)}


def _angles(op: str, b: int, n: int, d: int, positions: torch.Tensor) -> torch.Tensor:
    """(B, N, D/2) float32 angles, built the way model code builds its tables."""
    pos = positions.float()
    if op == "rope_2d":
        inv = ref.rope_2d_inv_freq(d, 10000.0, positions.device)
        return torch.cat([pos[0, ..., None] * inv, pos[1, ..., None] * inv], dim=-1)
    inv = ref.mrope_inv_freq(d, 1e6, positions.device)
    section = SECTIONS.get(d, _even_section(d))
    axis = torch.tensor([i for i, s in enumerate(section) for _ in range(s)], device=positions.device)
    return pos[axis].permute(1, 2, 0) * inv


def _even_section(d: int):
    q = d // 8
    return (q, (d // 2 - q) // 2, d // 2 - q - (d // 2 - q) // 2)


def torch_rotation(x: torch.Tensor, positions: torch.Tensor, op: str) -> torch.Tensor:
    """Plain PyTorch RoPE in x's dtype (transformers' habit)."""
    b, n, _, d = x.shape
    angle = _angles(op, b, n, d, positions)
    emb = torch.cat([angle, angle], dim=-1)
    cos, sin = emb.cos().to(x.dtype).unsqueeze(2), emb.sin().to(x.dtype).unsqueeze(2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


PROVIDERS = ("ours", "reference", "torch", "torch_compile")


def providers(op: str, grid, section, device: torch.device) -> Dict[str, Callable]:
    if op == "rope_2d":
        ours = lambda x, pos: lk.rope_2d(x, grid)  # noqa: E731  (positions from the grid, in-kernel)
        reference = lambda x, pos: ref.rope_2d(x, grid)  # noqa: E731
    else:
        ours = lambda x, pos: lk.mrope(x, pos, mrope_section=section)  # noqa: E731
        reference = lambda x, pos: ref.mrope(x, pos, mrope_section=section)  # noqa: E731
    plain = lambda x, pos: torch_rotation(x, pos, op)  # noqa: E731
    table = {"ours": ours, "reference": reference, "torch": plain}
    if device.type == "cuda":
        table["torch_compile"] = torch.compile(plain, dynamic=False)
    return table


def run_case(op: str, b: int, n: int, h: int, d: int, dtype: torch.dtype, device: torch.device, copy_gbps: float,
             out_path: Optional[Path], rep_ms: float, names=None) -> None:
    torch._dynamo.reset()  # a fresh compile per shape, never a silent fall-back to eager at the cache limit
    grid = GRIDS.get(n, (1, n))
    section = SECTIONS.get(d, _even_section(d))
    x = torch.randn(b, n, h, d, dtype=dtype, device=device)
    if op == "rope_2d":
        positions = ref.grid_positions(grid, b, device).contiguous()
        pos_bytes = 0  # ours derives them in-kernel
    else:
        positions = torch.randint(0, n, (3, b, n), device=device)
        pos_bytes = positions.numel() * positions.element_size()
    moved = 2 * x.numel() * x.element_size() + pos_bytes
    shape = f"B{b}-N{n}-H{h}-D{d}-{str(dtype).replace('torch.', '')}"
    for name, fn in providers(op, grid, section, device).items():
        if names and name not in names:
            continue
        for mode in ("fwd", "bwd"):
            if mode == "fwd":
                call = lambda fn=fn: fn(x, positions)  # noqa: E731
            else:
                xg = x.detach().clone().requires_grad_()
                y = fn(xg, positions)
                g = torch.randn_like(y)
                call = lambda y=y, xg=xg, g=g: torch.autograd.grad(y, xg, g, retain_graph=True)  # noqa: E731
            t = bench(call, device, warmup_ms=min(100, rep_ms), rep_ms=rep_ms)
            gbps = moved / (t["ms_p50"] * 1e-3) / 1e9
            mem = peak_memory_mb(call, device)
            row = dict(op=op, provider=name, mode=mode, shape=shape, gbps=gbps, peak_mem_mb=mem if mem is not None else "",
                       **t)
            if out_path is not None:
                write_row(row, device, out_path)
            print(f"{op:8s} {name:13s} {mode} {shape:28s} p50 {t['ms_p50']:9.4f} ms  {gbps:8.1f} GB/s "
                  f"({100 * gbps / copy_gbps:5.1f}% of copy)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tiny shape (runs on CPU too) as a smoke test")
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV to append to (default: benchmarks/results/<device>.csv on CUDA, a temp file on CPU)")
    parser.add_argument("--ops", nargs="+", choices=("rope_2d", "mrope"), default=["rope_2d", "mrope"])
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384], help="sequence lengths (CUDA sweep)")
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128], help="head dims (CUDA sweep)")
    parser.add_argument("--heads", type=int, nargs="+", default=[12, 2], help="head counts (CUDA sweep)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=None, help="subset (default: all)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_path = args.out
    if out_path is None:
        # CPU numbers are smoke output, never results: keep them out of benchmarks/results/
        out_path = results_path(device) if device.type == "cuda" else Path(tempfile.gettempdir()) / "bench_rope_cpu.csv"
    copy_gbps = measure_copy_bandwidth_gbps(device)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"copy bandwidth {copy_gbps:.1f} GB/s; rows -> {out_path}")
    if device.type == "cpu":
        print("note: on CPU 'ours' is the Triton interpreter (TRITON_INTERPRET=1) or else the reference: "
              "a smoke test of the benchmark, not a measurement")

    if args.quick:
        # CPU has no bfloat16 kernel path (the interpreter lacks it): float32 there
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        for op in args.ops:
            run_case(op, 1, 64, 2, 64, dtype, device, copy_gbps, out_path, rep_ms=50, names=args.providers)
        return
    for op in args.ops:
        for d in args.d:
            for n in args.n:
                for h in args.heads:
                    run_case(op, 4, n, h, d, torch.bfloat16, device, copy_gbps, out_path, rep_ms=500,
                             names=args.providers)


if __name__ == "__main__":
    main()
