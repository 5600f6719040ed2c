"""benchmarks.gpu_check on a CPU: the dry-run plan, the refusal without CUDA, the step orchestration with
fake steps (cut at the allowance, exceptions recorded, the next step still run, the summary always
written) and the SPEC 5 decisions taken from CSV rows."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check, gpu_summary
from benchmarks.common import COLUMNS, write_row
from benchmarks.gpu_steps import Command, Step, StepRecord, StepSkip, run_steps

ROOT = Path(__file__).resolve().parents[2]


def _run_cli(*args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_dry_run_prints_every_step_with_its_allowance_and_commands(tmp_path):
    res = _run_cli("--dry-run", "--budget-s", "240", "--out", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    scale = 240 / sum(gpu_check.SHARES.values())
    for i, (name, share) in enumerate(gpu_check.SHARES.items(), 1):
        assert f"{i}. {name}: allowance {share * scale:.0f} s" in out
    assert "ends by 240 s" in out  # the last step ends at the budget
    for needle in ("benchmarks.gpu_probe facts", "MAX_JOBS=", "-m gpu", "--junitxml=", "--tool memcheck",
                   "--tool racecheck", "LATTE_KERNELS_AUTOTUNE_MAX=2", "bench_residual_attention", "--n 16384",
                   "bench_context_attention --nq 4096 --nc 1024", "bench_rope", "benchmarks.e2e --batch 1 50",
                   "latte-graphs-fused", "latte-eager-fused", "vanilla_couple-eager-reference", "--no-compile",
                   "benchmarks.plot", "summary.md"):
        assert needle in out, needle
    assert "max-autotune" not in out and "latte-compile-reference" not in out
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_without_cuda_it_refuses_with_one_line_and_exit_2(tmp_path):
    res = _run_cli("--out", str(tmp_path / "o"), env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 2
    assert res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and "CUDA" in res.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad", ["0", "-5", "nan", "abc"])
def test_bad_budget_is_refused_naming_the_argument(bad, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--dry-run", "--budget-s", bad])
    assert e.value.code == 2
    assert "--budget-s" in capsys.readouterr().err


def _cmd(code, log, **kw):
    return Command([sys.executable, "-c", code], log, **kw)


def _step(name, allowance, build, **kw):
    return Step(name, allowance, build, min_s=kw.pop("min_s", 0.2), **kw)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is dead for our purpose
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_overrunning_step_is_cut_raising_step_recorded_next_steps_run(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    sleeper = (f"import subprocess, sys, time; "
               f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
               f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    seen = []

    def boom(ctx):
        raise RuntimeError("step bug")

    def after_reads(ctx, rec):
        seen.append((tmp_path / "hello.log").read_text())

    steps = [
        _step("slow", 1.5, lambda ctx: [[_cmd(sleeper, "slow.log")]]),
        _step("raises", 5, boom),
        _step("fine", 20, lambda ctx: [[_cmd("print('hello')", "hello.log")]], after=after_reads),
        _step("fails", 10, lambda ctx: [[_cmd("import sys; sys.exit(3)", "fails.log")]]),
        _step("absent", 10, lambda ctx: (_ for _ in ()).throw(StepSkip("tool missing"))),
        _step("no_program", 10, lambda ctx: [[Command(["/nonexistent/tool"], "np.log")]]),
    ]
    recs = run_steps(steps, tmp_path, 60, {}, cwd=tmp_path, progress=False)
    by = {r.name: r for r in recs}
    assert by["slow"].status == "timeout" and by["slow"].returncodes == [None]
    assert "killed" in by["slow"].notes[0]
    deadline = time.monotonic() + 10
    while _pid_alive(int(pidfile.read_text())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pid_alive(int(pidfile.read_text())), "the process group was not killed"
    assert by["raises"].status == "error" and "RuntimeError: step bug" in by["raises"].notes[0]
    assert by["fine"].status == "ok" and "hello" in seen[0]
    assert by["fails"].status == "failed" and "exit 3" in by["fails"].notes[0]
    assert by["absent"].status == "skipped" and by["absent"].notes == ["tool missing"]
    assert by["no_program"].status == "error" and "could not start" in (tmp_path / "np.log").read_text()


def _handshake(mine, theirs):
    """Creates ``mine`` and waits for ``theirs``: two of these finish only when they run together."""
    return (f"import os, time; open({str(mine)!r}, 'w').close()\n"
            f"while not os.path.exists({str(theirs)!r}): time.sleep(0.02)")


def test_a_stage_runs_its_commands_together_and_unused_time_passes_on(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    pair = [_cmd(_handshake(a, b), "a.log"), _cmd(_handshake(b, a), "b.log")]
    steps = [_step("pair", 10, lambda ctx: [pair]),
             _step("quick", 10, lambda ctx: [[_cmd("pass", "q.log")]]),
             # allowance 1 s, needs 3 s: finishes on the time the two steps before it left unused
             _step("uses_slack", 1.0, lambda ctx: [[_cmd("import time; time.sleep(3)", "s.log")]])]
    recs = run_steps(steps, tmp_path, 21, {}, cwd=tmp_path, progress=False)
    assert [r.status for r in recs] == ["ok", "ok", "ok"], [r.line() for r in recs]


def test_step_that_no_longer_fits_is_skipped_saying_so(tmp_path):
    steps = [_step("eats", 2, lambda ctx: [[_cmd("import time; time.sleep(30)", "e.log")]]),
             Step("late", 0.5, lambda ctx: [[_cmd("pass", "l.log")]], min_s=5)]
    recs = run_steps(steps, tmp_path, 2.5, {}, cwd=tmp_path, progress=False)
    assert recs[0].status == "timeout"
    assert recs[1].status == "skipped" and "no longer fits the budget" in recs[1].notes[0]
    assert not (tmp_path / "l.log").exists()


def test_main_writes_the_summary_with_not_measured_reasons(tmp_path, capsys):
    out = tmp_path / "o"
    steps = [_step("kernels", 1.0, lambda ctx: [[_cmd("import time; time.sleep(30)", "k.log")]]),
             _step("e2e", 5, lambda ctx: (_ for _ in ()).throw(ValueError("no e2e here")))]
    assert gpu_check.main(["--out", str(out), "--budget-s", "6"], steps=steps) == 0
    text = (out / "summary.md").read_text()
    assert "| kernels | 1 |" in text and "timeout" in text
    assert "not measured (kernels step timeout" in text
    assert "not measured (e2e step error before e2e.log: ValueError: no e2e here" in text
    for t in gpu_summary.evaluate([]):
        assert t.what in text
    recap = capsys.readouterr().out.strip().splitlines()
    assert recap[-1].startswith("summary: ") and recap[1].startswith("targets: 0 met, 0 not met")
    assert all(len(line) <= 100 for line in recap[:-1])
    assert text.rstrip().endswith(recap[-1])


# ---- SPEC 5 decisions from rows ---------------------------------------------------------------

def _rows(tmp_path, spec):
    """Writes rows through benchmarks.common.write_row (the real CSV format) and reads them back."""
    path = tmp_path / "rows.csv"
    for op, provider, mode, shape, extra in spec:
        write_row(dict(op=op, provider=provider, mode=mode, shape=shape, **extra), path=path)
    rows = gpu_summary.read_rows([path])
    assert list(rows[0]) == COLUMNS
    return rows


def _sample(tmp_path, good):
    ra, mem, ca, rope = gpu_summary.RA_SHAPE, gpu_summary.RA_MEM_SHAPE, gpu_summary.CA_SHAPE, gpu_summary.ROPE_SHAPE
    g = lambda a, b: a if good else b  # noqa: E731
    spec = [
        ("e2e", "latte-graphs-fused", "sample", "B=50,T=40", dict(ms_p50=g(250.0, 400.0))),    # 0.005 / 0.008 s/img
        ("e2e", "latte-eager-fused", "sample", "B=50,T=40", dict(ms_p50=600.0)),
        ("e2e", gpu_summary.VANILLA, "sample", "B=50,T=40", dict(ms_p50=g(1500.0, 1000.0))),  # 6x / 2.5x
        ("e2e", "latte-graphs-fused", "sample", "B=1,T=40", dict(ms_p50=g(11.0, 13.0))),
        ("e2e", "vanilla-roofline", "floor", "B=1,T=40", dict(ms_p50=5.0, gbps=4000.0)),
        ("residual_attention", "ours", "fwd", ra, dict(ms_p50=g(1.5, 1.7))),
        ("residual_attention", "sdpa", "fwd", ra, dict(ms_p50=1.0)),
        ("residual_attention", "flex", "fwd", ra, dict(ms_p50=g(4.6, 4.4))),                 # 3.07x / 2.59x
        ("residual_attention", "ours", "fwd+bwd", ra, dict(ms_p50=g(5.3, 5.5))),
        ("residual_attention", "sdpa", "fwd+bwd", ra, dict(ms_p50=3.0)),                     # 1.77x / 1.83x
        ("residual_attention", "ours", "fwd", mem, dict(ms_p50=20.0, peak_mem_mb=g(210.0, 30000.0))),
        ("residual_attention", "reference", "fwd", mem, dict(ms_p50="OOM")),
        ("context_attention", "ours", "fwd", ca, dict(ms_p50=g(1.09, 1.11))),
        ("context_attention", "sdpa_valid", "fwd", ca, dict(ms_p50=1.0)),
        ("rope_2d", "ours", "fwd", rope, dict(ms_p50=0.1, gbps=g(3300.0, 3100.0))),          # of 4000: 82% / 77%
        ("rope_2d", "ours", "bwd", rope, dict(ms_p50=0.1, gbps=g(3300.0, 3100.0))),
        ("mrope", "ours", "fwd", rope, dict(ms_p50=0.1, gbps=g(3300.0, 3100.0))),
        ("mrope", "ours", "bwd", rope, dict(ms_p50=0.1, gbps=g(3300.0, 3100.0))),
    ]
    return _rows(tmp_path, spec)


@pytest.mark.parametrize("good", [True, False])
def test_targets_decided_from_rows(tmp_path, good):
    facts = {"copy_gbps": 4000.0}
    targets = gpu_summary.evaluate(_sample(tmp_path, good), facts)
    by = {t.what.split(",")[0] if t.what.startswith("e2e paper") else t.what: t for t in targets}
    expect = "met" if good else "not met"
    measured = [t for t in targets if not t.result.startswith("not measured") and t.result != "reported"]
    assert len(measured) == 12
    assert all(t.result == expect for t in measured), [(t.what, t.measured, t.result) for t in measured]
    b50 = next(t for t in targets if "batch 50, s/img" in t.what)
    assert b50.measured.startswith("0.005 s/img" if good else "0.008 s/img") and "latte-graphs-fused" in b50.measured
    speed = next(t for t in targets if "speedup" in t.what)
    assert speed.measured.startswith("6.00x" if good else "2.50x")
    mem = next(t for t in targets if t.what.startswith("memory"))
    assert "reference: OOM" in mem.measured
    assert next(t for t in targets if "DC-AE" in t.what).result.startswith("not measured")
    assert sum(t.result.startswith("not measured here") for t in targets) == 2  # the compile-time ones
    assert by  # every target has a distinct row


def test_missing_rows_say_why_and_copy_bandwidth_falls_back_to_the_e2e_floor(tmp_path):
    rows = _sample(tmp_path, True)
    kept = [r for r in rows if r["op"] != "context_attention"]
    targets = gpu_summary.evaluate(kept, {}, {"context_attention": "the extension did not build"})
    ca = next(t for t in targets if t.what.startswith("context_attention"))
    assert ca.result == "not measured (the extension did not build)"
    rope = next(t for t in targets if t.what.startswith("rope_2d fwd"))
    assert rope.result == "met" and "of 4000 GB/s" in rope.measured  # the floor row's bandwidth
    only_ours = [r for r in rows if not (r["op"] == "residual_attention" and r["provider"] == "sdpa")]
    ra = next(t for t in gpu_summary.evaluate(only_ours) if "/ SDPA (without)" in t.what)
    assert ra.result == "not measured (no sdpa row)"


def test_latest_row_wins_and_ours_oom_is_not_met(tmp_path):
    rows = _sample(tmp_path, False) + _sample(tmp_path / "again", True)[:1]
    b50 = next(t for t in gpu_summary.evaluate(rows) if "batch 50, s/img" in t.what)
    assert b50.result == "met"  # the rerun's 250 ms row replaced the 400 ms one
    oom = _rows(tmp_path / "oom", [("residual_attention", "ours", "fwd", gpu_summary.RA_MEM_SHAPE, dict(ms_p50="OOM"))])
    mem = next(t for t in gpu_summary.evaluate(oom) if t.what.startswith("memory"))
    assert mem.result == "not met" and "ours: OOM" in mem.measured


def test_missing_rows_name_the_command_that_should_have_written_them(tmp_path):
    (tmp_path / "bench_rope.log").write_text("$ python -m benchmarks.bench_rope\nRuntimeError: Triton failed\n")
    rec = StepRecord("kernels", 100, status="timeout",
                     logs=["warm_rope_2d.log", "bench_residual_attention_fwd.log",
                           "bench_residual_attention_fwdbwd.log", "bench_rope.log",
                           "bench_residual_attention_memory.log"],
                     returncodes=[0, 0, 0, 1, None], notes=["cut"])
    why = gpu_check.why_from_records([rec], {"decode": "diffusers not installed"}, tmp_path)
    assert "residual_attention" not in why  # its command ran: a missing row there is the row's own story
    assert "residual_attention_fwdbwd" not in why
    assert why["rope"] == "bench_rope.log: exit 1: RuntimeError: Triton failed"
    assert why["memory"] == "bench_residual_attention_memory.log cut at the kernels step's deadline"
    assert why["context_attention"] == "kernels step timeout before bench_context_attention.log: cut"
    assert why["e2e"] == "e2e step not run" and why["decode"] == "diffusers not installed"


# ---- readers of the step outputs ----------------------------------------------------------------

def test_sanitizer_verdicts():
    assert gpu_check.sanitizer_verdict("...\n========= ERROR SUMMARY: 0 errors\n") == "0 errors"
    assert gpu_check.sanitizer_verdict("========= ERROR SUMMARY: 4 errors\n") == "4 errors"
    assert gpu_check.sanitizer_verdict("========= Error: Device not supported\n").startswith(
        "refused (Device not supported")
    assert gpu_check.sanitizer_verdict("Traceback ...") == "no summary"


def test_junit_counts_and_test_notes(tmp_path):
    (tmp_path / "pytest_kernels.xml").write_text(
        '<testsuites><testsuite tests="7" failures="1" errors="1" skipped="2"/></testsuites>')
    rec = StepRecord("tests", 80, status="failed")
    ctx = gpu_check.new_context(tmp_path, "x.csv")
    gpu_check._tests_after(ctx, rec)
    assert rec.notes == ["kernels: 3 passed, 1 failed, 1 errors, 2 skipped", "model: no junit XML"]
    assert ctx["facts"]["gpu tests (kernels)"] == "3 passed, 1 failed, 1 errors, 2 skipped"


def test_extension_failure_forbids_later_jit_builds_and_is_the_reason(tmp_path):
    (tmp_path / "extension.log").write_text("$ python -m benchmarks.gpu_probe ext\nRuntimeError: no CUTLASS headers\n")
    ctx = gpu_check.new_context(tmp_path, "x.csv")
    rec = StepRecord("extension", 110, status="failed")
    gpu_check._ext_after(ctx, rec)
    assert ctx["ext_ok"] is False and rec.notes == ["RuntimeError: no CUTLASS headers"]
    env = gpu_check._tests_build(ctx)[0][0].env
    assert env["LATTE_NO_JIT"] == "1" and env["LATTE_KERNELS_AUTOTUNE_MAX"] == gpu_check.AUTOTUNE_MAX
    assert "LATTE_NO_JIT" not in gpu_check._tests_build(gpu_check.new_context(tmp_path, "x.csv"))[0][0].env
    logs = [c.log for stage in gpu_check._kernels_build(ctx) for c in stage]
    assert "bench_context_attention.log" not in logs
    sanitized = gpu_check._sanitizer_build({**ctx, "dry_run": True})[0][0].argv
    assert "context_attention" not in sanitized and "residual_attention" in sanitized


# ---- the subprocess side -----------------------------------------------------------------------

def _probe(*args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_probe", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_probe_ext_reports_how_the_extension_loaded_and_how_long_it_took():
    res = _probe("ext", env_extra={"MAX_JOBS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("EXT ")]
    info = gpu_check._tagged_json(line, "EXT")
    assert info["seconds"] >= 0 and info["max_jobs"] == "1" and info["how"]


def test_probe_needs_cuda_for_facts_and_kernels():
    for args in (("facts",), ("kernels", "--size", "small")):
        res = _probe(*args, env_extra={"CUDA_VISIBLE_DEVICES": ""})
        assert res.returncode == 1 and "no CUDA device" in res.stderr, res.stderr[-500:]
    bad = _probe("kernels", "--op", "softmax")
    assert bad.returncode == 2 and "--op" in bad.stderr


@pytest.mark.parametrize("op", ["rope_2d", "mrope", "merge_attention_states", "residual_attention",
                                "context_attention"])
def test_probe_calls_every_kernel_with_valid_arguments(op):
    # on CPU (reference paths, or the C++ kernel for context_attention): the sanitizer's run is well formed
    import torch

    from benchmarks import gpu_probe

    gpu_probe.call_once(op, "small", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="op must be one of"):
        gpu_probe.call_once("softmax", "small", torch.device("cpu"), torch.float32)
