"""What ``benchmarks.gpu_check`` runs in its own subprocesses, one concern per subcommand:

    python -m benchmarks.gpu_probe facts               # device facts, one JSON line (prefix FACTS)
    python -m benchmarks.gpu_probe ext                 # load or just-in-time build the extension, timed (prefix EXT)
    python -m benchmarks.gpu_probe kernels --size small [--op NAME ...]
                                                       # one forward + backward call of each kernel

``kernels --size small`` is the run compute-sanitizer watches (tiny shapes, every Triton kernel and
the CUDA extension's forward and backward); ``--size target`` calls each kernel once at its SPEC 5
shape, which compiles (and autotunes) it into Triton's on-disk cache, so that ``gpu_check`` can warm
the kernels in parallel processes before the benchmarks time them one after the other.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

OPS = ("rope_2d", "mrope", "merge_attention_states", "residual_attention", "context_attention")


def facts() -> dict:
    """GPU name, driver, versions, measured copy bandwidth and bf16 matmul rate (random data)."""
    import torch

    from benchmarks.common import measure_copy_bandwidth_gbps, measure_matmul_tflops

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda or "",
           "cpus": os.cpu_count()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "not installed"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        out["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        out["driver"] = "unknown (no nvidia-smi)"
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch")
    props = torch.cuda.get_device_properties(0)
    out.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
               memory_gib=round(props.total_memory / 2**30, 1))
    out["copy_gbps"] = round(measure_copy_bandwidth_gbps(torch.device("cuda")), 1)
    out["matmul_bf16_tflops"] = round(measure_matmul_tflops(torch.device("cuda")), 1)
    return out


def ext() -> dict:
    """Loads the extension (prebuilt ``latte_kernels._C``, else the just-in-time build) and times it."""
    import importlib.util

    t0 = time.perf_counter()
    prebuilt = importlib.util.find_spec("latte_kernels._C") is not None
    from latte_kernels import _ext

    _ext.load()
    return {"how": "prebuilt latte_kernels._C" if prebuilt else "just-in-time build (or its cache)",
            "seconds": round(time.perf_counter() - t0, 1), "cuda": _ext.with_cuda(),
            "max_jobs": os.environ.get("MAX_JOBS", "")}


def call_once(op: str, size: str, device=None, dtype=None) -> None:
    """One forward and one backward call of ``op`` on random data (default: bf16 on CUDA)."""
    import torch

    import latte_kernels as lk

    dev, dt = torch.device(device or "cuda"), dtype or torch.bfloat16
    target = size == "target"
    b, hq, hkv, d = (4, 12, 2, 128) if target else (1, 4, 2, 64)
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dt, requires_grad=True)  # noqa: E731
    if op in ("rope_2d", "mrope"):
        n, grid = (4096, (64, 64)) if target else (64, (8, 8))
        x = mk(b, n, hq, d)
        if op == "rope_2d":
            y = lk.rope_2d(x, grid)
        else:
            pos = torch.randint(0, n, (3, b, n), device=dev)
            y = lk.mrope(x, pos, mrope_section=(16, 24, 24) if d == 128 else (8, 12, 12))
        outs, ins = [y], [x]
    elif op == "merge_attention_states":
        n = 4096 if target else 77
        oa, ob = mk(b, n, hq, d), mk(b, n, hq, d)
        la = torch.randn(b, hq, n, device=dev, requires_grad=True)
        lb = torch.randn(b, hq, n, device=dev, requires_grad=True)
        out, lse = lk.merge_attention_states(oa, la, ob, lb)
        outs, ins = [out, lse], [oa, la, ob, lb]
    elif op == "residual_attention":
        n = 4096 if target else 130
        q, k, v, qp, kp = mk(b, n, hq, d), mk(b, n, hkv, d), mk(b, n, hkv, d), mk(b, n, hq, d), mk(b, n, hkv, d)
        gate = torch.randn(b, hq, device=dev, requires_grad=True)
        out, lse = lk.residual_attention(q, k, v, q_prev=qp, k_prev=kp, gate=gate)
        outs, ins = [out, lse], [q, k, v, qp, kp, gate]
    elif op == "context_attention":
        nq, nc = (4096, 1024) if target else (77, 63)
        q, kc, vc = mk(b, nq, hq, d), mk(b, nc, hkv, d), mk(b, nc, hkv, d)
        lens = torch.randint(nc // 2, nc + 1, (b,), device=dev, dtype=torch.int32)
        out, lse = lk.context_attention(q, kc, vc, lens)
        outs, ins = [out, lse], [q, kc, vc]
    else:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.grad(outs, ins, grads)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def kernels(ops, size: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch")
    failed = []
    for op in ops:
        t0 = time.perf_counter()
        try:
            call_once(op, size)
            print(f"KERNEL {op} ok {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as e:  # one kernel's failure must not hide the others' sanitizer reports
            failed.append(op)
            print(f"KERNEL {op} failed: {type(e).__name__}: {e}", flush=True)
    if failed:
        raise SystemExit(f"failed: {' '.join(failed)}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("facts", help="device facts as one JSON line")
    sub.add_parser("ext", help="load / build the extension, timed")
    k = sub.add_parser("kernels", help="one forward + backward call of each kernel")
    k.add_argument("--size", choices=("small", "target"), default="small")
    k.add_argument("--op", nargs="+", choices=OPS, default=list(OPS))
    args = parser.parse_args(argv)
    if args.what == "facts":
        print("FACTS " + json.dumps(facts()), flush=True)
    elif args.what == "ext":
        print("EXT " + json.dumps(ext()), flush=True)
    else:
        kernels(args.op, args.size)


if __name__ == "__main__":
    sys.exit(main())
