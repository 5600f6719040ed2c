"""Everything a GPU can tell that a CPU cannot, in one command within a time budget (SPEC 6).

    python -m benchmarks.gpu_check [--out DIR] [--budget-s 480] [--dry-run]

Steps, in order, each with its own allowance (a share of ``--budget-s``; time a step leaves unused goes
to the ones after it), each a subprocess that is killed with its process group at its deadline, each
recorded whatever happens, the next one run anyway (``benchmarks/gpu_steps.py``):

1. facts: GPU name, driver, torch / triton / CUDA versions, measured copy bandwidth and bf16 matmul rate;
2. extension: ``latte_kernels._C`` or its just-in-time build (``MAX_JOBS`` = all cores, nvcc compiling
   the two architectures of each file on two threads: ``LATTE_NVCC_THREADS=2``), timed;
3. tests: the ``gpu``-marked tests, no ``-x``, a per-test timeout, junit XML kept (autotuning pruned as
   in step 5, so the tests check the configs the benchmarks time);
4. sanitizer: compute-sanitizer memcheck and racecheck over one small forward + backward call of each
   Triton kernel and of the CUDA extension (``benchmarks/gpu_probe.py kernels --size small``);
5. kernels: the Triton kernels warmed at their SPEC 5 shapes in parallel processes (into Triton's disk
   cache), then the SPEC 5 benchmarks one after the other, autotuning pruned with
   ``LATTE_KERNELS_AUTOTUNE_MAX`` (each kernel keeps its first N configs; unset, all);
6. e2e: ``benchmarks.e2e`` in the paper configuration at batch 1 and 50, eager and CUDA graphs, with the
   vanilla eager baseline (no max-autotune compile mode: its compile alone takes minutes);
7. plots: ``benchmarks.plot`` over the rows.

Under ``--out`` (default ``benchmarks/results/gpu_check``): ``<device>.csv`` (the columns of
``benchmarks/results/``), its PNG plots, one log per command, the pytest junit XML and ``summary.md``
(``benchmarks/gpu_summary.py``), which is written even when steps fail or are skipped. ``--dry-run``
prints the timed plan on any machine; without CUDA and without ``--dry-run`` the command exits 2.
Runs from a source checkout with ``PYTHONPATH=.`` and no network.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from benchmarks import gpu_summary
from benchmarks.gpu_steps import Command, Step, StepRecord, StepSkip, run_steps

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_check"
AUTOTUNE_MAX = "2"
TEST_TIMEOUT_S = 60
# shares of the budget per step, in seconds of the default 480 s budget
SHARES = {"facts": 20, "extension": 110, "tests": 80, "sanitizer": 70, "kernels": 100, "e2e": 90, "plots": 10}
E2E_MODES = ("vanilla_couple-eager-reference", "latte-eager-fused", "latte-graphs-fused")
WARM_OPS = ("rope_2d", "mrope", "residual_attention")


def _py(ctx: dict, *args: str) -> List[str]:
    return [ctx["python"], *args]


def _log_text(ctx: dict, name: str) -> str:
    path = Path(ctx["out"]) / name
    return path.read_text(errors="replace") if path.is_file() else ""


def _tagged_json(text: str, tag: str) -> Optional[dict]:
    for line in reversed(text.splitlines()):
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    return None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("$ ")]
    return lines[-1][:200] if lines else "no output"


# ---- 1. facts -----------------------------------------------------------------------------------

def _facts_build(ctx):
    return [[Command(_py(ctx, "-m", "benchmarks.gpu_probe", "facts"), "facts.log")]]


def _facts_after(ctx, rec: StepRecord):
    facts = _tagged_json(_log_text(ctx, "facts.log"), "FACTS")
    if facts:
        ctx["facts"].update(facts)
        rec.notes.append(f"{facts.get('gpu')}: copy {facts.get('copy_gbps')} GB/s, "
                         f"bf16 matmul {facts.get('matmul_bf16_tflops')} TFLOP/s")
    elif rec.status == "ok":
        rec.status = "failed"
        rec.notes.append("no FACTS line in facts.log")


# ---- 2. extension -------------------------------------------------------------------------------

def _ext_build(ctx):
    return [[Command(_py(ctx, "-m", "benchmarks.gpu_probe", "ext"), "extension.log",
                     env={"MAX_JOBS": str(os.cpu_count() or 1), "LATTE_NVCC_THREADS": "2"})]]


def _ext_after(ctx, rec: StepRecord):
    text = _log_text(ctx, "extension.log")
    info = _tagged_json(text, "EXT")
    ctx["ext_ok"] = bool(info) and rec.status == "ok"
    if ctx["ext_ok"]:
        ctx["facts"]["extension"] = f"{info['how']}, {info['seconds']} s (MAX_JOBS={info['max_jobs']})"
        rec.notes.append(ctx["facts"]["extension"])
        return
    ctx["facts"]["extension"] = f"not loaded ({rec.status})"
    ctx["why"]["context_attention"] = "the extension did not build (extension.log)"
    if rec.status == "timeout":
        # a build killed mid-way leaves torch's lock file behind; the next load would wait on it forever
        for lock in glob.glob(str(ROOT / "build" / "latte_ext_jit" / "*" / "lock")):
            os.remove(lock)
            rec.notes.append(f"removed the stale build lock {lock}")
    else:
        rec.notes.append(_last_line(text))


def _no_jit_env(ctx) -> Dict[str, str]:
    """Once the extension failed to build, later steps must not start a build of their own."""
    return {} if ctx.get("ext_ok", True) else {"LATTE_NO_JIT": "1"}


# ---- 3. gpu tests -------------------------------------------------------------------------------

def _timeout_args() -> List[str]:
    if importlib.util.find_spec("pytest_timeout") is not None:
        return [f"--timeout={TEST_TIMEOUT_S}"]
    # fallback: faulthandler dumps the stuck test's traceback; the step's deadline kills the run
    return ["-o", f"faulthandler_timeout={TEST_TIMEOUT_S}"]


def _tests_build(ctx):
    stages = []
    for part in ("kernels", "model"):
        xml = Path(ctx["out"]) / f"pytest_{part}.xml"
        argv = _py(ctx, "-m", "pytest", f"tests/{part}", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider",
                   f"--junitxml={xml}", *_timeout_args())
        env = {"LATTE_KERNELS_AUTOTUNE_MAX": AUTOTUNE_MAX, **_no_jit_env(ctx)}  # the configs the benchmarks time
        stages.append([Command(argv, f"pytest_{part}.log", env=env, ok_codes=(0, 5))])
    return stages


def junit_counts(path: Path) -> Optional[Dict[str, int]]:
    """tests / failures / errors / skipped summed over a junit XML file's test suites."""
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}


def _tests_after(ctx, rec: StepRecord):
    for part in ("kernels", "model"):
        c = junit_counts(Path(ctx["out"]) / f"pytest_{part}.xml")
        if c is None:
            rec.notes.append(f"{part}: no junit XML")
            continue
        passed = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
        line = f"{part}: {passed} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped"
        rec.notes.append(line)
        ctx["facts"][f"gpu tests ({part})"] = line.split(": ", 1)[1]


# ---- 4. compute-sanitizer -----------------------------------------------------------------------

SANITIZER_TOOLS = {"memcheck": ["--leak-check", "no"], "racecheck": ["--racecheck-report", "analysis"]}


def _sanitizer_build(ctx):
    if shutil.which("compute-sanitizer") is None and not ctx.get("dry_run"):
        raise StepSkip("compute-sanitizer is not on the PATH")
    ops = [op for op in ("rope_2d", "mrope", "merge_attention_states", "residual_attention", "context_attention")
           if op != "context_attention" or ctx.get("ext_ok", True)]
    env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "LATTE_KERNELS_AUTOTUNE_MAX": "1", **_no_jit_env(ctx)}
    return [[Command(["compute-sanitizer", "--tool", tool, *flags, "--error-exitcode", "3",
                      *_py(ctx, "-m", "benchmarks.gpu_probe", "kernels", "--size", "small", "--op", *ops)],
                     f"sanitizer_{tool}.log", env=env)] for tool, flags in SANITIZER_TOOLS.items()]


def sanitizer_verdict(text: str) -> str:
    """'0 errors', 'N errors', 'refused (...)' or 'no summary' from a compute-sanitizer log."""
    m = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    refusal = re.search(r"(Device not supported[^\n]*|not supported on this device[^\n]*|Unable to[^\n]*)", text)
    if m:
        return f"{m[-1]} errors"
    if refusal:
        return f"refused ({refusal.group(1).strip()[:80]})"
    return "no summary"


def _sanitizer_after(ctx, rec: StepRecord):
    for tool in SANITIZER_TOOLS:
        text = _log_text(ctx, f"sanitizer_{tool}.log")
        if text:
            verdict = sanitizer_verdict(text)
            rec.notes.append(f"{tool}: {verdict}")
            ctx["facts"][f"compute-sanitizer {tool}"] = verdict


# ---- 5. kernel benchmarks -----------------------------------------------------------------------

def _kernels_build(ctx):
    env = {"LATTE_KERNELS_AUTOTUNE_MAX": AUTOTUNE_MAX, **_no_jit_env(ctx)}
    csv = str(ctx["csv"])
    warm = [Command(_py(ctx, "-m", "benchmarks.gpu_probe", "kernels", "--size", "target", "--op", op),
                    f"warm_{op}.log", env=env) for op in WARM_OPS]
    ra = ("-m", "benchmarks.bench_residual_attention", "--d", "128", "--out", csv)
    stages = [warm,
              [Command(_py(ctx, *ra, "--n", "4096", "--providers", "ours", "sdpa", "flex", "--modes", "fwd"),
                       "bench_residual_attention_fwd.log", env=env)],
              [Command(_py(ctx, *ra, "--n", "4096", "--providers", "ours", "sdpa", "--modes", "fwd+bwd"),
                       "bench_residual_attention_fwdbwd.log", env=env)]]
    if ctx.get("ext_ok", True):
        stages.append([Command(_py(ctx, "-m", "benchmarks.bench_context_attention", "--nq", "4096", "--nc", "1024",
                                   "--providers", "ours", "sdpa_valid", "--out", csv),
                               "bench_context_attention.log", env=env)])
    stages.append([Command(_py(ctx, "-m", "benchmarks.bench_rope", "--n", "4096", "--d", "128", "--heads", "12",
                               "--providers", "ours", "torch", "--out", csv), "bench_rope.log", env=env)])
    stages.append([Command(_py(ctx, *ra, "--n", "16384", "--providers", "ours", "reference", "--modes", "fwd"),
                           "bench_residual_attention_memory.log", env=env)])
    return stages


# ---- 6. end to end ------------------------------------------------------------------------------

def _has_diffusers() -> bool:
    return importlib.util.find_spec("diffusers") is not None


def _e2e_build(ctx):
    argv = _py(ctx, "-m", "benchmarks.e2e", "--batch", "1", "50", "--modes", *E2E_MODES, "--no-compile",
               "--repeats", "3", "--out", str(ctx["csv"]))
    if not _has_diffusers():
        argv.append("--no-decode")
    return [[Command(argv, "e2e.log", env=_no_jit_env(ctx))]]


def _e2e_after(ctx, rec: StepRecord):
    if not _has_diffusers():
        ctx["why"]["decode"] = "diffusers not installed: the DC-AE decode row is skipped"
        rec.notes.append(ctx["why"]["decode"])


# ---- 7. plots -----------------------------------------------------------------------------------

def _plots_build(ctx):
    if not Path(ctx["csv"]).is_file() and not ctx.get("dry_run"):
        raise StepSkip("no rows to plot")
    if importlib.util.find_spec("matplotlib") is None:
        raise StepSkip("matplotlib not installed")
    return [[Command(_py(ctx, "-m", "benchmarks.plot", str(ctx["csv"])), "plots.log")]]


def plan(budget_s: float) -> List[Step]:
    """The steps with their allowances, scaled from the 480 s shares to ``budget_s``."""
    scale = budget_s / sum(SHARES.values())
    a = {k: v * scale for k, v in SHARES.items()}
    return [
        Step("facts", a["facts"], _facts_build, _facts_after, what="GPU, driver, versions, copy GB/s, bf16 TFLOP/s"),
        Step("extension", a["extension"], _ext_build, _ext_after, what="latte_kernels._C or its JIT build, timed"),
        Step("tests", a["tests"], _tests_build, _tests_after,
             what=f"gpu-marked tests, per-test timeout {TEST_TIMEOUT_S} s, junit XML"),
        Step("sanitizer", a["sanitizer"], _sanitizer_build, _sanitizer_after,
             what="compute-sanitizer memcheck + racecheck, small run of every kernel"),
        Step("kernels", a["kernels"], _kernels_build,
             what=f"Triton kernels warmed in parallel, then the SPEC 5 benchmarks "
                  f"(LATTE_KERNELS_AUTOTUNE_MAX={AUTOTUNE_MAX})"),
        Step("e2e", a["e2e"], _e2e_build, _e2e_after, what="paper config, batch 1 and 50, eager and graphs"),
        Step("plots", a["plots"], _plots_build, min_s=2.0, what="PNG per op beside the CSV"),
    ]


def new_context(out: Path, csv_name: str, dry_run: bool = False) -> dict:
    return {"out": out, "csv": out / csv_name, "python": sys.executable, "facts": {}, "why": {}, "dry_run": dry_run}


def print_plan(steps: Sequence[Step], ctx: dict, budget_s: float, stream=sys.stdout) -> None:
    w = stream.write
    w(f"gpu_check plan: budget {budget_s:.0f} s, output {ctx['out']}\n")
    w(f"autotuning pruned in the tests and kernels steps: LATTE_KERNELS_AUTOTUNE_MAX={AUTOTUNE_MAX} (each kernel "
      f"keeps its first {AUTOTUNE_MAX} configs, so the tests check the configs the benchmarks time; harmless where "
      f"latte_kernels does not read it; every config: `pytest -m gpu` without it)\n")
    w("a step that overruns its allowance is killed (process group) and recorded; unused time goes to later steps\n")
    cumulative = 0.0
    for i, step in enumerate(steps, 1):
        cumulative += step.allowance_s
        w(f"\n{i}. {step.name}: allowance {step.allowance_s:.0f} s (ends by {cumulative:.0f} s) - {step.what}\n")
        try:
            stages = step.build(ctx)
        except StepSkip as e:
            w(f"   (skipped here: {e})\n")
            continue
        for stage in stages:
            for cmd in stage:
                w(f"   {'|| ' if len(stage) > 1 else ''}{cmd.shell()}\n")
    w(f"\nthen: {ctx['out'] / 'summary.md'} (always written)\n")


# the logs whose commands write each group's rows (gpu_summary.evaluate's groups)
GROUP_LOGS = {
    "residual_attention": ("kernels", ("bench_residual_attention_fwd.log",)),
    "residual_attention_fwdbwd": ("kernels", ("bench_residual_attention_fwdbwd.log",)),
    "memory": ("kernels", ("bench_residual_attention_memory.log",)),
    "context_attention": ("kernels", ("bench_context_attention.log",)),
    "rope": ("kernels", ("bench_rope.log",)),
    "e2e": ("e2e", ("e2e.log",)),
    "decode": ("e2e", ("e2e.log",)),
}


def why_from_records(records: Sequence[StepRecord], why: Dict[str, str], out: Optional[Path] = None) -> Dict[str, str]:
    """The reason a target's rows are missing, from the command that should have written them: cut at
    its step's deadline, its exit status and last log line, or its step not reaching it."""
    by = {r.name: r for r in records}
    reasons = dict(why)
    for group, (step, logs) in GROUP_LOGS.items():
        if group in reasons:
            continue
        rec = by.get(step)
        if rec is None:
            reasons[group] = f"{step} step not run"
            continue
        codes = dict(zip(rec.logs, rec.returncodes))
        for log in logs:
            if log not in rec.logs:
                reasons[group] = f"{step} step {rec.status} before {log}" + (
                    f": {rec.notes[0][:80]}" if rec.notes and rec.status != "ok" else "")
                break
            code = codes.get(log, "?")
            if code is None:
                reasons[group] = f"{log} cut at the {step} step's deadline"
                break
            if code != 0:
                last = _last_line((out / log).read_text(errors="replace")) if out and (out / log).is_file() else ""
                reasons[group] = f"{log}: exit {code}" + (f": {last[:100]}" if last else "")
                break
    return {k: v for k, v in reasons.items() if v}


def write_summary(ctx: dict, records: Sequence[StepRecord], budget_s: float, elapsed_s: float) -> str:
    rows = gpu_summary.read_rows([ctx["csv"]])
    if "gpu" not in ctx["facts"] and rows:
        ctx["facts"]["gpu"] = rows[-1].get("gpu", "")
    targets = gpu_summary.evaluate(rows, ctx["facts"], why_from_records(records, ctx["why"], Path(ctx["out"])))
    text = gpu_summary.render(targets, ctx["facts"], records, budget_s, ctx["out"], ctx["csv"], elapsed_s)
    (Path(ctx["out"]) / "summary.md").write_text(text)
    return text


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budget-s must be a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"--budget-s must be positive and finite, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--budget-s", type=_positive_seconds, default=480.0, help="total time budget (default 480)")
    parser.add_argument("--dry-run", action="store_true", help="print the timed plan and exit (any machine)")
    return parser


def _csv_name() -> str:
    from benchmarks.common import results_path

    return results_path().name


def main(argv: Optional[Sequence[str]] = None, steps: Optional[Sequence[Step]] = None) -> int:
    """Returns the exit status: 0 when the run completed (whatever it found), 2 without CUDA.
    ``steps``: replaces the plan (tests run fake steps through the same path)."""
    args = build_parser().parse_args(argv)
    out = args.out.resolve()
    if args.dry_run:
        ctx = new_context(out, "<device>.csv", dry_run=True)
        print_plan(steps or plan(args.budget_s), ctx, args.budget_s)
        return 0
    import torch

    if steps is None and not torch.cuda.is_available():
        sys.stderr.write("gpu_check: no CUDA device (torch.cuda.is_available() is False); "
                         "`--dry-run` prints the plan\n")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    ctx = new_context(out, _csv_name())
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("MPLBACKEND", "Agg")
    env.pop("TRITON_INTERPRET", None)  # the GPU runs the compiled kernels, never the interpreter
    t0 = time.monotonic()
    records: List[StepRecord] = []
    try:
        run_steps(steps or plan(args.budget_s), out, args.budget_s, ctx, cwd=ROOT, base_env=env, records=records)
    finally:
        text = write_summary(ctx, records, args.budget_s, time.monotonic() - t0)
        recap = text.rstrip("\n").split("## Recap\n\n", 1)[-1]
        print(recap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
