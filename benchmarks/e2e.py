"""End-to-end sampling benchmark: seconds per image of LaTtE-Flow against the vanilla baseline.

    python -m benchmarks.e2e                 # CUDA: the paper configuration, rows to benchmarks/results/<gpu>.csv
    python -m benchmarks.e2e --no-compile    # skip the torch.compile mode (its max-autotune compile takes minutes)
    python -m benchmarks.e2e --small         # the small configuration (what a CPU-only machine always runs);
                                             # rows to --out, else to a new temporary folder (printed)

The measurement (the configurations, the modes, one timed run) is ``latteflow.evaluation.speed``, shared
with ``latteflow bench`` (same flags); this script adds the comparisons: the roofline floor per mode, the
speedup over the baseline, the rows of the results table and the profile tables.

The paper configuration (SPEC 5): a random-weight backbone with the text shapes of Qwen2-VL-2B
(``paper_qwen2vl_config()``: 28 layers, hidden 1536, 12 heads, 2 KV heads, head_dim 128, MLP 8960;
nothing is downloaded), K = 4 expert groups of M = 7 layers, an 8 x 8 grid of 64 image tokens with 32
latent channels, class prompts of 11 tokens ("class 007" through the character tokenizer, with <bos>
and <eos>) and the null prompt "" (2 tokens), T = 40 Euler steps, classifier-free guidance 5, batch 1
and 50, bfloat16.

Modes (the ``provider`` column):

- ``vanilla_couple-eager-reference``: the paper's baseline, all 28 layers every step, reference ops, eager;
- ``latte-eager-reference``: LaTtE-Flow (7 layers per step, residual attention), reference ops, eager;
- ``latte-eager-fused``: the same with the ``latte_kernels`` ops;
- ``latte-graphs-fused``: the same with one CUDA graph per expert group (``cuda_graphs=True``);
- ``latte-compile-reference``: ``torch.compile(mode="max-autotune")`` over the reference model's
  per-group velocity; its compile time is measured apart (the first call) and kept out of s/img.

One timed run is what a user pays for a batch: one backbone prefill over the conditional prompts and
the null prompt together (``build_context``; one call, so the backbone's weights stream once), then
``model.sample`` (T steps; for the graphs mode that includes the sampler's per-call graph capture).
s/img = run time / B; the DC-AE f32c32 decode of the (B, 32, 8, 8) latents to (B, 3, 256, 256) images
is timed apart (random weights, an ``AutoencoderDC`` config written to match dc-ae-f32c32-in-1.0).

Where the time goes (arithmetic from the shapes, not a measurement). One Qwen2-VL-2B decoder layer
holds 46.8 M parameters (q/k/v/o 5.5 M, MLP 41.3 M), so one LaTtE-Flow step (M = 7 layers) reads
328 M parameters = 655 MB in bf16 and does 2 x 328 M FLOPs per token row; the baseline step (L = 28)
reads 2.62 GB. With CFG a step has 2B x 64 token rows:

- batch 1: 128 rows -> 84 GFLOP and 655 MB per step, 128 FLOP per byte, below the ridge point of an
  H100 (~990 dense bf16 TFLOP/s over ~3.35 TB/s = ~295 FLOP/byte, datasheet figures): the step is
  bound by streaming the 7 layers' weights once, ~0.2 ms per step, ~8 ms for 40 steps, plus ~0.8 ms
  for the prefill's 2.6 GB. At ~0.2 ms per step, launching the step's ~100 kernels (a dozen or more per
  layer) one by one from Python costs as much as the step itself: that is what CUDA graphs remove.
- batch 50: 6400 rows -> 4.2 TFLOP per step, 6400 FLOP per byte: compute bound, ~4 ms per step at
  datasheet rate, ~0.0034 s/img for 40 steps; the SPEC's 0.006 s/img needs ~57% of peak matmul.
- the baseline does exactly L/M = 4x the layer FLOPs and bytes per step (minus the residual-attention
  logits, which are tiny at 64 tokens), so where both run near their floor the speedup is ~4x; the
  SPEC's ">= 5x over vanilla eager" counts on the eager baseline also losing time to launches.

The floor printed per mode is exactly that model: per step ``max(FLOPs / matmul rate, bytes /
bandwidth)`` with the matmul rate and copy bandwidth measured on the device in the same run, FLOPs =
2 x (parameters hit by every token) x token rows + 2 x (per-row parameters: timestep MLP, gates) x rows
+ attention over (64 + context) keys (+ the residual logits), bytes = the group's parameters x their
size + the context K/V it reads; plus the same for the prefill (all L layers, causal attention). It
ignores activation traffic (at batch 1 it stays in L2, at batch 50 the step is compute bound anyway).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from latteflow.apps.bench import add_arguments
# the measurement's names stay reachable here too (callers and tests of this script use e2e.MODES, ...)
from latteflow.evaluation.speed import (BASELINE, MODE_NAMES, MODES, Mode, Setup, build_backbone_for,  # noqa: F401
                                        build_model, class_prompts, dc_ae_config, generate, make_setup,
                                        profile_table, select_modes, time_decode, time_mode, time_runs)

from .common import (RESULTS_DIR, device_name, measure_copy_bandwidth_gbps, measure_matmul_tflops, peak_memory_mb,
                     results_path, write_row)

# ----------------------------------------------------------------------------------------------------
# roofline arithmetic


def forward_cost(*, token_params: float, row_params: float, weight_params: float, rows: int, tokens: int,
                 ctx_keys: int, layers: int, residual_layers: int, num_heads: int, head_dim: int,
                 bytes_per_param: float, causal: bool = False, extra_bytes: float = 0.0) -> Tuple[float, float]:
    """``(FLOPs, bytes)`` of one forward of a stack of attention layers over ``rows`` sequences.

    FLOPs: ``2 * token_params * rows * tokens`` (every linear weight a token passes through) +
    ``2 * row_params * rows`` (weights applied once per row: timestep MLP, residual gates) +
    ``4 * rows * heads * tokens * keys * head_dim`` per layer (QK^T and PV; ``keys = tokens + ctx_keys``,
    or ``(tokens + 1) / 2`` on average when ``causal``) + ``2 * rows * heads * tokens^2 * head_dim`` per
    residual layer (the previous layer's image-image logits). Bytes: every weight read once
    (``weight_params * bytes_per_param``) + ``extra_bytes`` (e.g. the context K/V)."""
    for name, value in (("rows", rows), ("tokens", tokens), ("layers", layers), ("num_heads", num_heads),
                        ("head_dim", head_dim)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if ctx_keys < 0 or residual_layers < 0 or residual_layers > layers:
        raise ValueError(f"need ctx_keys >= 0 and 0 <= residual_layers <= layers, got {ctx_keys}, {residual_layers}")
    keys = (tokens + 1) / 2 if causal else tokens + ctx_keys
    flops = 2.0 * token_params * rows * tokens + 2.0 * row_params * rows
    flops += layers * 4.0 * rows * num_heads * tokens * keys * head_dim
    flops += residual_layers * 2.0 * rows * num_heads * tokens * tokens * head_dim
    return flops, weight_params * bytes_per_param + extra_bytes


def roofline_floor_s(flops: float, nbytes: float, matmul_tflops: float, bandwidth_gbps: float) -> float:
    """The least time a step can take: ``max(flops / matmul rate, bytes / bandwidth)`` in seconds."""
    if not (matmul_tflops > 0 and bandwidth_gbps > 0):
        raise ValueError(f"rates must be positive, got {matmul_tflops} TFLOP/s and {bandwidth_gbps} GB/s")
    return max(flops / (matmul_tflops * 1e12), nbytes / (bandwidth_gbps * 1e9))


def _step_params(model, group) -> Tuple[int, int, int]:
    """``(token_params, row_params, all_params)`` one step of ``group`` reads: the group's own weights
    plus the model's shared timestep MLP; row parameters (the timestep MLP and the residual gates) act
    once per row, every other weight once per token."""
    time_embed = sum(p.numel() for p in model.time_embed.parameters())
    total = sum(p.numel() for p in group.parameters()) + time_embed
    row = time_embed + sum(layer.gate.weight.numel() for layer in group.layers if layer.gate is not None)
    return total - row, row, total


def sample_cost(model, batch: int, prompt_len: int, steps: int, guided: bool = True) -> Tuple[float, float, List[Tuple[float, float]]]:
    """``(prefill FLOPs, prefill bytes, [(FLOPs, bytes) per sampling step])`` of one batch."""
    from latteflow.core.context import text_model
    from latteflow.core.sampler import timestep_schedule

    layers = text_model(model.backbone).layers
    attn = model.groups[0].layers[0]
    heads, head_dim, kv_heads = attn.num_heads, attn.head_dim, attn.num_kv_heads
    size = model.dtype.itemsize
    backbone_params = sum(p.numel() for p in layers.parameters()) + sum(
        p.numel() for p in text_model(model.backbone).norm.parameters())
    # one prefill call over the B conditional prompts and the null prompt (padded to the same length)
    prefill = forward_cost(token_params=backbone_params, row_params=0, weight_params=backbone_params, rows=batch + 1,
                           tokens=prompt_len, ctx_keys=0, layers=len(layers), residual_layers=0, num_heads=heads,
                           head_dim=head_dim, bytes_per_param=size, causal=True)
    rows = 2 * batch if guided else batch
    tokens = model.cfg.num_tokens
    per_group = []
    for group in model.groups:
        token_p, row_p, all_p = _step_params(model, group)
        m = len(group.layers)
        residual = sum(layer.gate is not None for layer in group.layers)
        ctx_bytes = m * 2 * rows * prompt_len * kv_heads * head_dim * size
        per_group.append(forward_cost(token_params=token_p, row_params=row_p, weight_params=all_p, rows=rows,
                                      tokens=tokens, ctx_keys=prompt_len, layers=m, residual_layers=residual,
                                      num_heads=heads, head_dim=head_dim, bytes_per_param=size,
                                      extra_bytes=ctx_bytes))
    return prefill[0], prefill[1], [per_group[k] for _, _, k in timestep_schedule(model.cfg, steps)]


# ----------------------------------------------------------------------------------------------------
# main


def build_parser(prog: str = "python -m benchmarks.e2e",
                 parser_class: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command line; ``latteflow bench`` passes its own name and a parser class whose errors are one line."""
    parser = parser_class(prog=prog, description=__doc__.split("\n\n")[0],
                          epilog="See the module docstring (or benchmarks/README.md) for what is timed.")
    return add_arguments(
        parser,
        profile_help="also write a torch.profiler table of the top kernels per mode and batch "
                     "(benchmarks/results/<device>_e2e_profile.txt; beside --out when given; a temp "
                     "file for small/CPU runs)",
        out_help="CSV to append rows to (default: benchmarks/results/<gpu>.csv for the paper "
                 "configuration on CUDA, else e2e_smoke.csv in a new temporary folder, printed)")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _out_paths(args: argparse.Namespace, setup: Setup) -> Tuple[Path, Path]:
    """(CSV, profile text): results/ only for the paper configuration on CUDA; a smoke run without
    ``--out`` writes into a new temporary folder of its own (never a fixed, shared /tmp name)."""
    real = setup.device.type == "cuda" and not setup.small
    if args.out is not None:
        return args.out, args.out.with_name(f"{args.out.stem}_e2e_profile.txt")
    if real:
        return results_path(setup.device), RESULTS_DIR / f"{results_path(setup.device).stem}_e2e_profile.txt"
    folder = Path(tempfile.mkdtemp(prefix="latteflow_e2e_smoke_"))
    return folder / "e2e_smoke.csv", folder / "e2e_smoke_profile.txt"


def _decode(setup: Setup, batch: int, csv_path: Path) -> Optional[Dict[str, float]]:
    try:
        name, zs, xs, t, mem = time_decode(setup, batch, lambda fn: peak_memory_mb(fn, setup.device))
    except ImportError as e:
        print(f"DC-AE decode skipped: {e} (pip install diffusers, or the package's 'dcae' extra)")
        return None
    shape = f"B={batch},T={setup.steps}"
    write_row(dict(op="e2e", provider=name, mode="decode", shape=shape, peak_mem_mb="" if mem is None else mem, **t),
              setup.device, csv_path)
    print(f"{name:32s} B={batch:<3d} decode {zs} -> {xs}: "
          f"s/img p50 {t['ms_p50'] / 1e3 / batch:.4g} (p20 {t['ms_p20'] / 1e3 / batch:.4g}, "
          f"p80 {t['ms_p80'] / 1e3 / batch:.4g}), reported apart from sampling")
    return t


def main(argv: Optional[Sequence[str]] = None,
         parser: Optional[argparse.ArgumentParser] = None) -> List[Dict[str, object]]:
    """Runs the benchmark; returns one dict per (mode, batch) with its timing, floor and speedup.
    ``parser``: the command line to parse ``argv`` with (default ``build_parser()``)."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    setup = make_setup(args)
    try:
        modes = select_modes(args, setup)
    except ValueError as e:
        parser.error(str(e))
    csv_path, profile_path = _out_paths(args, setup)
    dev = setup.device
    label = device_name(dev)
    if dev.type == "cpu":
        print(f"[CPU SMOKE RUN on {label}] no CUDA device: the small configuration; a test of the benchmark's "
              f"path, not a measurement")
    elif setup.small:
        print(f"[SMALL RUN on {label}] the small configuration, not the paper's")
    tflops = measure_matmul_tflops(dev)
    gbps = measure_copy_bandwidth_gbps(dev)
    print(f"device {label}; torch {torch.__version__}; measured matmul {tflops:.4g} TFLOP/s, copy bandwidth "
          f"{gbps:.4g} GB/s; rows -> {csv_path}")
    if args.profile:
        profile_path.parent.mkdir(parents=True, exist_ok=True)
        profile_path.write_text(f"e2e profile on {label}, torch {torch.__version__}\n\n")

    backbone = build_backbone_for(setup)
    models: Dict[Tuple[str, str], object] = {}
    results: List[Dict[str, object]] = []
    for batch in setup.batches:
        ids, mask = class_prompts(batch, dev)
        prompt_len = ids.shape[1]
        shape = f"B={batch},T={setup.steps}"
        floors_written = set()
        for mode in modes:
            key = (mode.variant, mode.backend)
            if key not in models:
                models[key] = build_model(backbone, setup, mode.variant, mode.backend)
            model = models[key]

            def after(run, title=f"{mode.name} {shape}"):  # while the mode is in force: memory, profile
                mem = peak_memory_mb(run, dev)
                if args.profile:
                    profile_table(run, dev, title, profile_path)
                return mem

            t, compile_s, mem = time_mode(model, mode, ids, mask, setup, after)
            if mode.compile:
                write_row(dict(op="e2e_compile", provider=mode.name, mode="compile", shape=shape,
                               ms_p50=compile_s * 1e3, ms_p20=compile_s * 1e3, ms_p80=compile_s * 1e3), dev, csv_path)
            pre_f, pre_b, step_costs = sample_cost(model, batch, prompt_len, setup.steps)
            floor_s = roofline_floor_s(pre_f, pre_b, tflops, gbps) + sum(
                roofline_floor_s(f, b, tflops, gbps) for f, b in step_costs)
            flops = pre_f + sum(f for f, _ in step_costs)
            nbytes = pre_b + sum(b for _, b in step_costs)
            run_s = t["ms_p50"] / 1e3
            write_row(dict(op="e2e", provider=mode.name, mode="sample", shape=shape, tflops=flops / run_s / 1e12,
                           gbps=nbytes / run_s / 1e9, peak_mem_mb="" if mem is None else mem, **t), dev, csv_path)
            family = "vanilla" if model.cfg.is_vanilla else "latte"
            if family not in floors_written:  # the floor as a row: ms = floor, tflops/gbps = the rates it used
                floors_written.add(family)
                write_row(dict(op="e2e", provider=f"{family}-roofline", mode="floor", shape=shape,
                               ms_p50=floor_s * 1e3, ms_p20=floor_s * 1e3, ms_p80=floor_s * 1e3, tflops=tflops,
                               gbps=gbps), dev, csv_path)
            results.append(dict(mode=mode.name, batch=batch, steps=setup.steps, s_per_img=run_s / batch,
                                s_per_img_p20=t["ms_p20"] / 1e3 / batch, s_per_img_p80=t["ms_p80"] / 1e3 / batch,
                                floor_s_per_img=floor_s / batch, fraction_of_floor=floor_s / run_s,
                                compile_s=compile_s, peak_mem_mb=mem))
            r = results[-1]
            extra = f"; compile {compile_s:.1f} s apart" if compile_s is not None else ""
            print(f"{mode.name:32s} B={batch:<3d} s/img p50 {r['s_per_img']:.4g} (p20 {r['s_per_img_p20']:.4g}, "
                  f"p80 {r['s_per_img_p80']:.4g}); floor {r['floor_s_per_img']:.4g} s/img, "
                  f"{100 * r['fraction_of_floor']:.1f}% of floor{extra}")
        base = next((r for r in results if r["batch"] == batch and r["mode"] == BASELINE), None)
        for r in results:
            if r["batch"] != batch:
                continue
            r["speedup_vs_vanilla"] = base["s_per_img"] / r["s_per_img"] if base else None
            if base and r["mode"] != BASELINE:
                print(f"  speedup over {BASELINE} at B={batch}: {r['mode']} x{r['speedup_vs_vanilla']:.2f}")
        if base is None:
            print(f"  (no speedup: {BASELINE} was not run)")
        if not args.no_decode:
            _decode(setup, batch, csv_path)
    if args.profile:
        print(f"profile tables -> {profile_path}")
    return results


if __name__ == "__main__":
    main()
