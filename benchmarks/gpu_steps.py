"""The step runner of ``benchmarks.gpu_check``: commands as subprocesses, each step inside its time
allowance, every failure recorded and the next step run anyway.

A ``Step`` is a name, an allowance in seconds and a ``build(ctx)`` that returns its stages: a stage is
a list of ``Command`` run at the same time (one command, or several compiles warmed in parallel), the
stages one after the other. ``build`` sees what earlier steps found (``ctx``), so a later step can,
for instance, forbid a just-in-time build of an extension that failed to build.

The schedule is cumulative: step i must end by ``t0 + allowance_0 + ... + allowance_i``, so time a
step leaves unused goes to the steps after it, and the whole run ends within the budget. A command
still running at its step's deadline is killed with its whole process group (``start_new_session``)
and the step is recorded as ``timeout``; a step whose remaining time is below ``min_s`` is not
started and is recorded as ``skipped`` with the seconds that were left.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from tqdm import tqdm

STATUSES = ("ok", "failed", "timeout", "skipped", "error")


class StepSkip(Exception):
    """Raised by a step's ``build`` when it cannot run here (a tool missing, an input absent): the step is
    recorded as skipped with this message, and the next one runs."""


@dataclasses.dataclass
class Command:
    """One subprocess: ``argv``, extra environment, the log file its stdout and stderr go to (a name
    under the output folder) and ``ok_codes``, the exit statuses that count as success."""
    argv: List[str]
    log: str
    env: Dict[str, str] = dataclasses.field(default_factory=dict)
    ok_codes: Sequence[int] = (0,)

    def shell(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in sorted(self.env.items()))
        return (env + " " if env else "") + " ".join(_quote(a) for a in self.argv) + f"  > {self.log}"


def _quote(arg: str) -> str:
    return arg if arg and all(c.isalnum() or c in "-_./=:,+" for c in arg) else "'" + arg.replace("'", "'\\''") + "'"


@dataclasses.dataclass
class Step:
    """``build(ctx)`` returns the stages (lists of commands run together); ``after(ctx, record)``, run
    whatever happened, reads the logs into ``ctx`` / ``record.notes`` and cleans up (it may raise:
    that is recorded too). ``min_s``: below this much time left the step is skipped."""
    name: str
    allowance_s: float
    build: Callable[[dict], List[List[Command]]]
    after: Optional[Callable[[dict, "StepRecord"], None]] = None
    min_s: float = 5.0
    what: str = ""


@dataclasses.dataclass
class StepRecord:
    name: str
    allowance_s: float
    status: str = "skipped"
    used_s: float = 0.0
    notes: List[str] = dataclasses.field(default_factory=list)
    logs: List[str] = dataclasses.field(default_factory=list)
    returncodes: List[Optional[int]] = dataclasses.field(default_factory=list)

    def line(self) -> str:
        return f"{self.name}: {self.status} ({self.used_s:.0f} of {self.allowance_s:.0f} s)" + (
            f"; {self.notes[0]}" if self.notes else "")


def last_line(path: Path, width: int = 100) -> str:
    """The last non-empty line a command printed (its error, usually), cut to ``width``."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    lines = [ln for ln in lines if not ln.startswith("$ ")]
    return lines[-1][:width] if lines else "no output"


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's process group, SIGKILL after 3 s if anything is left."""
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(commands: Sequence[Command], out_dir: Path, deadline: float, cwd: Path,
              base_env: Dict[str, str]) -> List[Optional[int]]:
    """Starts the commands together and waits for them until ``deadline`` (time.monotonic()); the ones
    still running then are killed with their process groups. Returns the exit codes (None: killed)."""
    procs = []
    try:
        for cmd in commands:
            log = (out_dir / cmd.log).open("w")
            log.write(f"$ {cmd.shell()}\n")
            log.flush()
            env = {**base_env, **cmd.env}
            try:
                proc = subprocess.Popen(cmd.argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as e:  # the program is missing: said in its log, raised to the step
                log.write(f"could not start: {e}\n")
                log.close()
                raise
            procs.append((proc, log))
        codes: List[Optional[int]] = []
        for proc, _ in procs:
            try:
                codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 0.0)))
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                codes.append(None)
        return codes
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                _kill_group(proc)
            log.close()


def run_steps(steps: Sequence[Step], out_dir: Path, budget_s: float, ctx: dict, cwd: Path,
              base_env: Optional[Dict[str, str]] = None, progress: bool = True,
              records: Optional[List[StepRecord]] = None) -> List[StepRecord]:
    """Runs the steps in order on the cumulative schedule; never raises for a step's failure. Each
    step's record is appended to ``records`` (a new list by default) as it starts, so a caller
    interrupted mid-way still holds what ran."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base_env = dict(os.environ if base_env is None else base_env)
    t0 = time.monotonic()
    end = t0 + budget_s
    cumulative = 0.0
    records = [] if records is None else records
    bar = tqdm(steps, desc="gpu_check", unit="step", disable=not progress)
    for step in bar:
        bar.set_postfix_str(step.name)
        cumulative += step.allowance_s
        deadline = min(t0 + cumulative, end)
        rec = StepRecord(step.name, step.allowance_s)
        records.append(rec)
        left = deadline - time.monotonic()
        if left < step.min_s:
            rec.status = "skipped"
            rec.notes.append(f"no longer fits the budget ({max(left, 0):.0f} s left, needs {step.min_s:.0f})")
            continue
        start = time.monotonic()
        try:
            stages = step.build(ctx)
            rec.status = "ok"
            for stage in stages:
                rec.logs += [c.log for c in stage]
                codes = run_stage(stage, out_dir, deadline, cwd, base_env)
                rec.returncodes += codes
                if any(c is None for c in codes):
                    rec.status = "timeout"
                    rec.notes.append(f"cut at its deadline ({deadline - start:.0f} s): process group killed")
                    break
                bad = [(cmd.log, c) for cmd, c in zip(stage, codes) if c not in cmd.ok_codes]
                if bad:
                    rec.status = "failed"
                    rec.notes += [f"{log}: exit {c}: {last_line(out_dir / log)}" for log, c in bad]
        except StepSkip as e:
            rec.status = "skipped"
            rec.notes.append(str(e))
        except Exception as e:  # a step's own bug: recorded, the next step still runs
            rec.status = "error"
            rec.notes.append(f"{type(e).__name__}: {e}")
        finally:
            if step.after is not None:
                try:
                    step.after(ctx, rec)
                except Exception as e:
                    rec.notes.append(f"reading its output failed: {type(e).__name__}: {e}")
                    if rec.status == "ok":
                        rec.status = "error"
            rec.used_s = time.monotonic() - start
        ctx.setdefault("records", {})[step.name] = rec
    return records
