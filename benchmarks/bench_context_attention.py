"""Benchmark of lk.context_attention (SPEC 2.4) against PyTorch: image queries over a padded cached
context with mixed per-row lengths.

Providers:
  ours        lk.context_attention (the csrc extension)
  reference   latte_kernels.reference.context_attention (materialises the logits)
  sdpa_mask   F.scaled_dot_product_attention over all Nc keys with a boolean padding mask
  sdpa_valid  F.scaled_dot_product_attention over each row's valid keys alone (a per-row loop): the
              SPEC 5 baseline, "<= 1.1x SDPA on the same valid keys"

Shapes: B=4, Hq=12, Hkv=2, D=128 (Qwen2-VL-2B), Nq in {64, 1024, 4096}, Nc in {32, 256, 1024, 4096},
bf16, lengths drawn in [Nc/2, Nc] with one row at Nc. TFLOP/s count the valid keys only
(4 Nq Hq D sum(lens) forward; 2.5x that for the backward). Rows go to benchmarks/results/<gpu>.csv.

    python -m benchmarks.bench_context_attention            # GPU: full sweep, writes rows
    python -m benchmarks.bench_context_attention --bwd      # forward + backward
    python -m benchmarks.bench_context_attention --quick    # one tiny shape on CPU, prints only
    python -m benchmarks.bench_context_attention --nq 4096 --nc 1024 --providers ours sdpa_valid  # the SPEC 5 shape
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F

import latte_kernels as lk
from latte_kernels import reference as ref

from .common import bench, peak_memory_mb, write_row

B, HQ, HKV, D = 4, 12, 2, 128
NQS = (64, 1024, 4096)
NCS = (32, 256, 1024, 4096)


def _sdpa(q, k, v, mask=None):
    """q (B, Nq, Hq, D), k/v (B, N, Hkv, D) -> (B, Nq, Hq, D); GQA by repeating kv heads."""
    rep = q.shape[2] // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if rep > 1:
        kt, vt = kt.repeat_interleave(rep, dim=1), vt.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)


def providers(q, k, v, lens, lens_host):
    nc = k.shape[1]
    mask = (torch.arange(nc, device=q.device)[None, :] < lens[:, None])[:, None, None, :]  # (B, 1, 1, Nc)
    return {
        "ours": lambda: lk.context_attention(q, k, v, lens)[0],
        "reference": lambda: ref.context_attention(q, k, v, lens)[0],
        "sdpa_mask": lambda: _sdpa(q, k, v, mask),
        "sdpa_valid": lambda: torch.cat([_sdpa(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n])
                                         for b, n in enumerate(lens_host)]),
    }


def make(nq, nc, dtype, device, gen):
    q = torch.randn(B, nq, HQ, D, dtype=dtype, device=device, generator=gen)
    k = torch.randn(B, nc, HKV, D, dtype=dtype, device=device, generator=gen)
    v = torch.randn(B, nc, HKV, D, dtype=dtype, device=device, generator=gen)
    lens_host = [nc] + torch.randint(max(nc // 2, 1), nc + 1, (B - 1,), generator=gen, device=device).tolist()
    return q, k, v, torch.tensor(lens_host, dtype=torch.int32, device=device), lens_host


def run(nq, nc, dtype, device, backward, write, names=None, path=None):
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, lens, lens_host = make(nq, nc, dtype, device, gen)
    if backward:
        for t in (q, k, v):
            t.requires_grad_()
    flops = 4 * nq * HQ * D * sum(lens_host) * (3.5 if backward else 1.0)
    shape = f"B{B}-Nq{nq}-Nc{nc}-Hq{HQ}-Hkv{HKV}-D{D}-{str(dtype).replace('torch.', '')}"
    rows = []
    for name, fn in providers(q, k, v, lens, lens_host).items():
        if names and name not in names:
            continue
        if name == "reference" and B * HQ * nq * nc * 4 > 8 * 2**30:  # the logits alone would exceed 8 GiB
            continue
        if backward:
            grad = torch.randn(B, nq, HQ, D, dtype=dtype, device=device, generator=gen)
            step = lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), grad)  # noqa: E731
        else:
            step = fn
        with torch.no_grad() if not backward else torch.enable_grad():
            t = bench(step, device)
            mem = peak_memory_mb(step, device)
        row = dict(op="context_attention", provider=name, mode="fwd+bwd" if backward else "fwd", shape=shape,
                   tflops=flops / (t["ms_p50"] * 1e-3) / 1e12, peak_mem_mb=mem if mem is not None else "", **t)
        rows.append(write_row(row, device, path) if write else row)
        print(f"{shape:48s} {row['mode']:8s} {name:11s} p50 {t['ms_p50']:9.4f} ms  "
              f"(p20 {t['ms_p20']:.4f}, p80 {t['ms_p80']:.4f})  {row['tflops']:7.2f} TFLOP/s")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tiny shape on CPU (float32); prints, writes nothing")
    parser.add_argument("--bwd", action="store_true", help="time forward + backward")
    parser.add_argument("--providers", nargs="*", help="subset of: ours reference sdpa_mask sdpa_valid")
    parser.add_argument("--nq", type=int, nargs="+", default=list(NQS), help="query lengths (default: the sweep)")
    parser.add_argument("--nc", type=int, nargs="+", default=list(NCS), help="context lengths (default: the sweep)")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default: benchmarks/results/<device>.csv)")
    args = parser.parse_args(argv)
    if args.quick:
        global B
        B = 2
        run(16, 24, torch.float32, torch.device("cpu"), args.bwd, write=False, names=args.providers)
        return
    if not torch.cuda.is_available():
        raise SystemExit("the sweep needs a CUDA device; use --quick for a CPU smoke test")
    device = torch.device("cuda")
    for nq, nc in itertools.product(args.nq, args.nc):
        run(nq, nc, torch.bfloat16, device, args.bwd, write=True, names=args.providers, path=args.out)


if __name__ == "__main__":
    main()
