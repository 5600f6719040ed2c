"""Benchmark of ``lk.residual_attention`` (SPEC 2.5, targets in SPEC 5) against its peers.

Providers:
  ours       lk.residual_attention with the gated residual (Triton)
  reference  latte_kernels.reference (materialises the N x N logits)
  sdpa       F.scaled_dot_product_attention WITHOUT the residual: the speed-of-light baseline
  sdpa_mask  SDPA with the residual as an additive float mask built from q_prev/k_prev in the call
  flex       compiled FlexAttention, the previous logits as a captured (B, Hq, N, N) tensor in score_mod
             (precomputed outside the timing; its gradient is not taken)

Modes fwd, bwd (backward alone, the forward graph built outside the timing) and fwd+bwd. A provider
that runs out of memory is recorded as ``OOM``. Rows go to ``benchmarks/results/<device>.csv``.

    python -m benchmarks.bench_residual_attention            # the full sweep on a GPU
    python -m benchmarks.bench_residual_attention --quick    # one tiny CPU shape (kernel under the
                                                             # Triton interpreter), rows to a temp file
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

if "--quick" in sys.argv:  # must precede importing triton / latte_kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import latte_kernels as lk  # noqa: E402
from latte_kernels import reference as ref  # noqa: E402
from benchmarks.common import bench, peak_memory_mb, write_row  # noqa: E402

OP = "residual_attention"
RESIDUAL_PROVIDERS = ("ours", "reference", "sdpa_mask", "flex")


def flops(b, hq, n, d, provider, mode):
    """fwd: 4 B Hq N^2 D (q.k and p.v) plus 2 B Hq N^2 D for the residual dot; bwd ~2.5x fwd."""
    fwd = 4 * b * hq * n * n * d + (2 * b * hq * n * n * d if provider in RESIDUAL_PROVIDERS else 0)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def make_inputs(b, n, hq, hkv, d, dtype, device):
    mk = lambda h: torch.randn(b, n, h, d, dtype=dtype, device=device, requires_grad=True)  # noqa: E731
    return dict(q=mk(hq), k=mk(hkv), v=mk(hkv), q_prev=mk(hq), k_prev=mk(hkv),
                gate=torch.randn(b, hq, device=device, requires_grad=True))


def residual_logits(x):
    """tanh(gate) * prev_scale * q_prev k_prev^T as a (B, Hq, N, N) tensor (prev_scale = D^-0.5)."""
    hq, hkv, d = x["q_prev"].shape[2], x["k_prev"].shape[2], x["q_prev"].shape[3]
    qp = x["q_prev"].transpose(1, 2)
    kp = x["k_prev"].transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    return torch.tanh(x["gate"]).to(qp.dtype)[:, :, None, None] * (d ** -0.5) * (qp @ kp.transpose(-1, -2))


def forward_fn(provider, x, device):
    """A zero-argument callable returning the tensors to differentiate, and the inputs it differentiates."""
    bhsd = lambda t: t.transpose(1, 2)  # noqa: E731
    if provider == "ours":
        return (lambda: lk.residual_attention(x["q"], x["k"], x["v"], q_prev=x["q_prev"], k_prev=x["k_prev"], gate=x["gate"])[0],
                list(x.values()))
    if provider == "reference":
        return (lambda: ref.residual_attention(x["q"], x["k"], x["v"], q_prev=x["q_prev"], k_prev=x["k_prev"], gate=x["gate"])[0],
                list(x.values()))
    if provider == "sdpa":
        return (lambda: F.scaled_dot_product_attention(bhsd(x["q"]), bhsd(x["k"]), bhsd(x["v"]), enable_gqa=True),
                [x["q"], x["k"], x["v"]])
    if provider == "sdpa_mask":
        return (lambda: F.scaled_dot_product_attention(bhsd(x["q"]), bhsd(x["k"]), bhsd(x["v"]), attn_mask=residual_logits(x),
                                                       enable_gqa=True),
                list(x.values()))
    if provider == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        with torch.no_grad():
            prev = residual_logits(x).detach()  # the captured previous logits

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + prev[b, h, q_idx, kv_idx]

        flex = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
        return (lambda: flex(bhsd(x["q"]), bhsd(x["k"]), bhsd(x["v"]), score_mod=score_mod, enable_gqa=True),
                [x["q"], x["k"], x["v"]])
    raise ValueError(f"unknown provider {provider!r}")


def timed_fn(provider, mode, x, device):
    fwd, inputs = forward_fn(provider, x, device)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fwd()
        return run
    if mode == "fwd+bwd":
        def run():
            out = fwd()
            return torch.autograd.grad(out, inputs, torch.ones_like(out))
        return run
    out = fwd()  # bwd alone: one forward graph, backward replayed on it
    grad = torch.ones_like(out)
    return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def run_one(provider, mode, b, n, hq, hkv, d, dtype, device, path, quick):
    shape = f"B={b},N={n},Hq={hq},Hkv={hkv},D={d},{str(dtype).replace('torch.', '')}"
    row = dict(op=OP, provider=provider, mode=mode, shape=shape)
    x = fn = None
    try:
        x = make_inputs(b, n, hq, hkv, d, dtype, device)
        fn = timed_fn(provider, mode, x, device)
        times = bench(fn, device, warmup_ms=10 if quick else 100, rep_ms=50 if quick else 500)
        mem = peak_memory_mb(fn, device)
        row.update(times, tflops=flops(b, hq, n, d, provider, mode) / (times["ms_p50"] * 1e-3) / 1e12)
        if mem is not None:
            row["peak_mem_mb"] = mem
    except RuntimeError as err:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if not is_oom(err):
            raise
        row.update(ms_p50="OOM", ms_p20="OOM", ms_p80="OOM")
    finally:
        del x, fn
        if device.type == "cuda":
            torch.cuda.empty_cache()
    written = write_row(row, device, path)
    print(f"{provider:>10} {mode:>8} {shape:>40}  p50 {written['ms_p50']:>8} ms  {written['tflops']:>6} TFLOP/s  "
          f"peak {written['peak_mem_mb'] or '-'} MiB", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one tiny CPU shape (ours via TRITON_INTERPRET, reference, sdpa)")
    parser.add_argument("--n", type=int, nargs="*", default=[64, 256, 1024, 4096, 16384])
    parser.add_argument("--d", type=int, nargs="*", default=[64, 128])
    parser.add_argument("--providers", nargs="*", default=["ours", "reference", "sdpa", "sdpa_mask", "flex"])
    parser.add_argument("--modes", nargs="*", default=["fwd", "bwd", "fwd+bwd"])
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default: benchmarks/results/<device>.csv)")
    args = parser.parse_args(argv)

    if args.quick:
        device = torch.device("cpu")
        path = args.out or Path(tempfile.mkdtemp(prefix="bench_ra_")) / "quick.csv"
        for provider in ("ours", "reference", "sdpa"):
            for mode in args.modes:
                run_one(provider, mode, 1, 64, 4, 2, 32, torch.float32, device, path, quick=True)
        print(f"rows written to {path} (CPU smoke test: not results)")
        return
    if not torch.cuda.is_available():
        parser.error("the sweep needs a CUDA device; use --quick for the CPU smoke test")
    device = torch.device("cuda")
    for d in args.d:
        for n in args.n:
            for provider in args.providers:
                for mode in args.modes:
                    run_one(provider, mode, 4, n, 12, 2, d, torch.bfloat16, device, args.out, quick=False)


if __name__ == "__main__":
    main()
