"""``latteflow bench``: the s/img of LaTtE-Flow sampling on this machine (SPEC 3.1, 5).

    latteflow bench                   # CUDA: the paper configuration, batch 1 and 50, every mode
    latteflow bench --small           # the small configuration (what a CPU-only machine always runs)
    latteflow bench --batch 50 --modes vanilla_couple-eager-reference latte-graphs-fused --out speed.csv
    latteflow bench --checkpoint RUN [--batch 50]   # s/img of a loaded checkpoint (``checkpoint_main``)

Per mode and batch it prints s/img (p50, with p20/p80), the speedup over the vanilla baseline when that
ran, the compile time apart, and the DC-AE decode apart (``latteflow.evaluation.speed`` says what one
timed run holds). ``--out`` appends one CSV row per measurement; ``--profile`` writes torch.profiler
tables beside it (or into a new temporary folder). ``python -m benchmarks.e2e`` takes the same flags
and adds the comparisons: the roofline floor, the project's results table, plots.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from latteflow.apps.argtypes import finite_float, positive_int
from latteflow.evaluation import speed

__all__ = ["CSV_COLUMNS", "add_arguments", "build_checkpoint_parser", "build_parser", "checkpoint_main", "main"]

CSV_COLUMNS = ["mode", "batch", "steps", "guidance", "s_per_img_p50", "s_per_img_p20", "s_per_img_p80", "compile_s",
               "device", "torch", "date"]


def add_arguments(parser: argparse.ArgumentParser, *, out_help: str, profile_help: str) -> argparse.ArgumentParser:
    """The bench flags, shared with ``benchmarks.e2e`` (which passes its own help for ``--out`` and
    ``--profile``: it writes the project's results table there)."""
    parser.add_argument("--small", action="store_true",
                        help="tiny backbone, K=4, 4x4 grid, T=4, batch 2, float32, eager modes only "
                             "(always on without CUDA); rows go to a new temporary folder unless --out is given")
    parser.add_argument("--batch", type=positive_int, nargs="+", default=None,
                        help="batch sizes (default: 1 50; small: 2)")
    parser.add_argument("--steps", type=positive_int, default=None, help="Euler steps T (default 40; small: 4)")
    parser.add_argument("--guidance", type=finite_float, default=5.0, help="CFG weight (default 5)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed runs per mode and batch, after one warm-up run (default 5; small: 3)")
    parser.add_argument("--modes", nargs="+", choices=speed.MODE_NAMES, default=None,
                        help="modes to run (default: all that the device supports)")
    parser.add_argument("--no-compile", action="store_true", help="skip latte-compile-reference")
    parser.add_argument("--no-decode", action="store_true", help="skip the DC-AE decode timing")
    parser.add_argument("--profile", action="store_true", help=profile_help)
    parser.add_argument("--out", type=Path, default=None, help=out_help)
    return parser


def build_parser(prog: str = "latteflow bench", parser_class: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = parser_class(prog=prog, description="Seconds per image of LaTtE-Flow sampling, per mode and batch.",
                          epilog="See latteflow/evaluation/speed.py for what one timed run holds.")
    return add_arguments(parser, out_help="CSV to append one row per measurement to (default: print only)",
                         profile_help="also write a torch.profiler table of the top kernels per mode and batch "
                                      "(beside --out when given, else in a new temporary folder)")


def _write(path: Optional[Path], row: Dict[str, object]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else ("" if v is None else v)) for k, v in row.items()})


def main(argv: Optional[Sequence[str]] = None, parser: Optional[argparse.ArgumentParser] = None) -> List[Dict[str, object]]:
    """Runs the measurement; returns one dict per (mode, batch): s/img p50/p20/p80, compile_s and
    speedup_vs_vanilla (None when the baseline did not run)."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    setup = speed.make_setup(args)
    try:
        modes = speed.select_modes(args, setup)
    except ValueError as e:
        parser.error(str(e))
    dev = setup.device
    if setup.small:
        print(f"[SMALL RUN on {dev.type}] the small configuration, not the paper's")
    profile_path = None
    if args.profile:
        folder = args.out.parent if args.out is not None else Path(tempfile.mkdtemp(prefix="latteflow_bench_"))
        profile_path = folder / "bench_profile.txt"
        profile_path.parent.mkdir(parents=True, exist_ok=True)
        profile_path.write_text(f"latteflow bench profile on {dev}, torch {torch.__version__}\n\n")
    stamp = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", torch=torch.__version__,
                 date=datetime.date.today().isoformat(), steps=setup.steps, guidance=setup.guidance)
    backbone = speed.build_backbone_for(setup)
    models: Dict[tuple, object] = {}
    results: List[Dict[str, object]] = []
    for batch in setup.batches:
        ids, mask = speed.class_prompts(batch, dev)
        for mode in modes:
            key = (mode.variant, mode.backend)
            if key not in models:
                models[key] = speed.build_model(backbone, setup, mode.variant, mode.backend)
            after = None if profile_path is None else (
                lambda run, title=f"{mode.name} B={batch},T={setup.steps}": speed.profile_table(run, dev, title, profile_path))
            t, compile_s, _ = speed.time_mode(models[key], mode, ids, mask, setup, after)
            r = dict(mode=mode.name, batch=batch, s_per_img=t["ms_p50"] / 1e3 / batch,
                     s_per_img_p20=t["ms_p20"] / 1e3 / batch, s_per_img_p80=t["ms_p80"] / 1e3 / batch,
                     compile_s=compile_s)
            results.append(r)
            _write(args.out, dict(stamp, mode=mode.name, batch=batch, s_per_img_p50=r["s_per_img"],
                                  s_per_img_p20=r["s_per_img_p20"], s_per_img_p80=r["s_per_img_p80"], compile_s=compile_s))
            extra = f"; compile {compile_s:.1f} s apart" if compile_s is not None else ""
            print(f"{mode.name:32s} B={batch:<3d} s/img p50 {r['s_per_img']:.4g} (p20 {r['s_per_img_p20']:.4g}, "
                  f"p80 {r['s_per_img_p80']:.4g}){extra}")
        base = next((r for r in results if r["batch"] == batch and r["mode"] == speed.BASELINE), None)
        for r in results:
            if r["batch"] == batch:
                r["speedup_vs_vanilla"] = base["s_per_img"] / r["s_per_img"] if base else None
                if base and r["mode"] != speed.BASELINE:
                    print(f"  speedup over {speed.BASELINE} at B={batch}: {r['mode']} x{r['speedup_vs_vanilla']:.2f}")
        if not args.no_decode:
            try:
                name, zs, xs, t, _ = speed.time_decode(setup, batch)
            except ImportError as e:
                print(f"DC-AE decode skipped: {e} (pip install diffusers, or the package's 'dcae' extra)")
                continue
            _write(args.out, dict(stamp, mode=f"{name}-decode", batch=batch, s_per_img_p50=t["ms_p50"] / 1e3 / batch,
                                  s_per_img_p20=t["ms_p20"] / 1e3 / batch, s_per_img_p80=t["ms_p80"] / 1e3 / batch))
            print(f"{name:32s} B={batch:<3d} decode {zs} -> {xs}: s/img p50 {t['ms_p50'] / 1e3 / batch:.4g}, "
                  f"reported apart from sampling")
    if profile_path is not None:
        print(f"profile tables -> {profile_path}")
    return results


CHECKPOINT_DESCRIPTION = ("latteflow bench --checkpoint RUN [--batch N]: s/img of a loaded checkpoint (prefill "
                          "included, decode apart; latteflow.evaluation.checkpoint_speed).")


def build_checkpoint_parser(prog: str = "latteflow bench --checkpoint",
                            parser_class: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser_class(prog=prog, description=CHECKPOINT_DESCRIPTION)
    p.add_argument("--checkpoint", required=True, help="shipped name or checkpoint directory")
    p.add_argument("--batch", type=positive_int, default=50, help="images per call (default 50, the paper's)")
    p.add_argument("--steps", type=positive_int, default=40)
    p.add_argument("--guidance", type=finite_float, default=5.0)
    p.add_argument("--repeats", type=positive_int, default=3, help="timed calls after one warm-up (median)")
    p.add_argument("--device", default=None)
    p.add_argument("--backbone", default=None, help="Qwen2-VL folder replacing the recorded one")
    p.add_argument("--vae", default=None, help="DC-AE folder replacing the recorded one")
    return p


def checkpoint_main(argv: Optional[Sequence[str]] = None, *, prog: str = "latteflow bench --checkpoint",
                    parser_class: type = argparse.ArgumentParser) -> int:
    """``latteflow bench --checkpoint RUN``: loads the checkpoint (``latteflow.pipeline.load_pipeline``),
    times it (``latteflow.evaluation.checkpoint_speed.time_pipeline``) and prints one line; returns 0."""
    from latteflow.apps.digits_recipe import device_description
    from latteflow.evaluation.checkpoint_speed import time_pipeline
    from latteflow.pipeline import load_pipeline

    a = build_checkpoint_parser(prog, parser_class).parse_args(None if argv is None else list(argv))
    pipe = load_pipeline(a.checkpoint, device=a.device, backbone=a.backbone, vae=a.vae)
    r = time_pipeline(pipe, batch=a.batch, steps=a.steps, guidance=a.guidance, repeats=a.repeats)
    print(f"{a.checkpoint}: {r['s_per_img']:.4f} s/img at batch {a.batch} (steps {a.steps}, guidance {a.guidance:g}, "
          f"prompt prefill included), decode {r['decode_s_per_img']:.4f} s/img apart; median of {a.repeats} on "
          f"{device_description(pipe.device)}")
    return 0
