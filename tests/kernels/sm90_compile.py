"""Compiles the Triton kernels of ``latte_kernels`` for sm_90 (H100/H200) the way the JIT compiles them
for a real call, on any machine (no GPU), and reports per kernel and autotune config: registers, stack
and shared memory, and which matrix instructions (wgmma / mma.sync), TMA and cp.async the code uses.

JIT-faithful: each op's launcher (``forward`` / ``backward`` of the residual-attention modules, and the
RoPE / merge launchers) runs on ``meta`` tensors of the call's shape with ``JITFunction.run`` and
``Autotuner.run`` replaced by a recorder, so the recorded arguments are the launcher's own (strides,
sizes, scales, constexprs, and on the 16-bit calls the tensor descriptors of the Hopper path, which
``_tma.enabled`` is made to take: the target is sm_90). Each recorded launch is then specialised by the
installed Triton's own binder (``create_function_from_signature`` + ``JITFunction._pack_args``, the code
``JITFunction.run`` runs): integers equal to 1 become constants, 16-divisible integers and
16-byte-aligned pointers get ``tt.divisibility = 16`` (meta tensors have address 0, as aligned as a
fresh CUDA allocation). Triton 3.6 (the GPU machine) and 3.9 both express this through that binder;
the compile then goes through ``triton.compile`` with target ``cuda:90``. Spills come from ptxas' own
``-v`` log of that compile (spill stores + loads; the stack frame is reported apart: libdevice's
sin/cos keep a 28-byte array there, which is not a spill), registers and stack from the cubin
(``cuobjdump -res-usage`` from Triton's bundled tools), shared memory from Triton's metadata, and the
instruction classes from the PTX. CI runs it with the installed Triton and with Triton 3.6.

    PYTHONPATH=. python tests/kernels/sm90_compile.py                 # the default config of every kernel
    PYTHONPATH=. python tests/kernels/sm90_compile.py --all           # every autotune config
    PYTHONPATH=. python tests/kernels/sm90_compile.py --all --check   # + exit 1 on a SPEC 5 violation
    ... --markdown                                                    # the table NOTES.md holds
    ... --arch 80                                                     # the A100's pointer path instead

``--check`` (run by ``test_sm90_compile.py``) fails when any 16-bit config at D = 64 or 128 exceeds
227 KiB of shared memory, spills or has no wgmma, or a D = 256 config exceeds 227 KiB. Needs
``TRITON_INTERPRET`` unset.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("sm90_compile.py needs TRITON_INTERPRET unset")

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns without it; 1 is 3.6's behaviour
# spills are read from ptxas' own -v log, which Triton prints when asked, and only when it runs ptxas
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ["TRITON_ALWAYS_COMPILE"] = "1"
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile as triton_compile, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from latte_kernels import _residual_attention_bwd as rbwd  # noqa: E402
from latte_kernels import _residual_attention_fwd as rfwd  # noqa: E402
from latte_kernels import _tma  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # --arch 80: the A100, whose calls take the pointer path
SHARED_LIMITS = {90: 227 * 1024, 80: 163 * 1024}  # per-block opt-in maximum: H100/H200, A100
SPEC5 = dict(b=4, n=4096, hq=12, hkv=2)


@dataclass
class Launch:
    """One recorded launch: the kernel, its autotune configs (None: a plain launch) and the call."""
    case: str
    kernel: JITFunction
    configs: list | None
    args: tuple
    kwargs: dict


_RECORDED: list[Launch] = []
_CASE = [""]


def _record_jit(self, *args, grid, warmup, **kwargs):
    _RECORDED.append(Launch(_CASE[0], self, None, args, kwargs))


def _record_tuned(self, *args, **kwargs):
    kwargs.pop("grid", None)
    kwargs.pop("warmup", None)
    _RECORDED.append(Launch(_CASE[0], self.fn, list(self.configs), args, kwargs))


def record(case, fn, *a, **kw):
    """Runs the launcher ``fn`` with every Triton launch replaced by the recorder."""
    saved = JITFunction.run, Autotuner.run, _tma.enabled
    JITFunction.run, Autotuner.run = _record_jit, _record_tuned
    _tma.enabled = lambda t: _tma.supported(t.dtype, TARGET.arch // 10)  # as on the target GPU
    _CASE[0] = case
    try:
        with torch.no_grad():
            fn(*a, **kw)
    finally:
        JITFunction.run, Autotuner.run, _tma.enabled = saved


def _t(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def record_residual_attention(d, dtype, *, res, state, rope, backward, deterministic=False, shape=SPEC5):
    """Records the forward (and with ``backward`` the backward) launches of one residual-attention call."""
    b, n, hq, hkv = shape["b"], shape["n"], shape["hq"], shape["hkv"]
    q, k, v = _t(b, n, hq, d, dtype=dtype), _t(b, n, hkv, d, dtype=dtype), _t(b, n, hkv, d, dtype=dtype)
    qp, kp = (_t(b, n, hq, d, dtype=dtype), _t(b, n, hkv, d, dtype=dtype)) if res else (None, None)
    gate = _t(b, hq, dtype=torch.float32) if res else None
    oc, lc = (_t(b, n, hq, d, dtype=dtype), _t(b, hq, n, dtype=torch.float32)) if state else (None, None)
    grid = (64, 64) if rope else None
    scale = d ** -0.5
    name = f"D={d} {str(dtype).split('.')[-1]} res={int(res)} state={int(state)} rope={int(rope)}"
    if deterministic:  # the backward's separate dq pass; the forward is the same as without
        name += " det"
        torch.use_deterministic_algorithms(True)
        try:
            out, lse = _t(b, n, hq, d, dtype=dtype), _t(b, hq, n, dtype=torch.float32)
            record(name, rbwd.backward, _t(b, n, hq, d, dtype=dtype), _t(b, hq, n, dtype=torch.float32), q, k, v, qp,
                   kp, gate, gate, oc, lc, out, lse, scale, scale, grid, 10000.0)
        finally:
            torch.use_deterministic_algorithms(False)
        return
    record(name, rfwd.forward, q, k, v, qp, kp, gate, oc, lc, scale, scale, grid, 10000.0, torch.float32)
    if backward:
        out, lse = _t(b, n, hq, d, dtype=dtype), _t(b, hq, n, dtype=torch.float32)
        record(name, rbwd.backward, _t(b, n, hq, d, dtype=dtype), _t(b, hq, n, dtype=torch.float32), q, k, v, qp, kp,
               gate, gate, oc, lc, out, lse, scale, scale, grid, 10000.0)


def record_small_ops(dtype, shape=SPEC5, d=128):
    """Records the RoPE (2D from the grid, M-RoPE from positions) and merge launchers at the SPEC 5 shape."""
    from latte_kernels import merge, rope

    b, n, h = shape["b"], shape["n"], shape["hq"]
    x, out = _t(b, n, h, d, dtype=dtype), _t(b, n, h, d, dtype=dtype)
    name = f"D={d} {str(dtype).split('.')[-1]} small ops"
    inv = _t(d // 2, dtype=torch.float32)
    record(name, rope._launch, out, x, None, inv, gw=64, bound1=d // 4, bound2=d // 2, freq_mod=d // 4, num_axes=2,
           inverse=False)
    record(name, rope._launch, out, x, _t(3, b, n, dtype=torch.int64), inv, gw=0, bound1=16, bound2=40,
           freq_mod=d // 2, num_axes=3, inverse=True)
    lse = [_t(b, h, n, dtype=torch.float32) for _ in range(4)]
    record(name, merge._launch_fwd, out, lse[0], x, lse[1], x, lse[2])
    record(name, merge._launch_bwd, out, lse[0], out, lse[1], x, lse[2], x, lse[3], x, lse[3])


def specialise(launch: Launch, config):
    """(ASTSource, options) exactly as ``JITFunction.run`` builds them for this launch and config."""
    kwargs = dict(launch.kwargs)
    if config is not None:
        kwargs.update(config.kwargs)
        kwargs.update(num_warps=config.num_warps, num_stages=config.num_stages)
    kernel = launch.kernel
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options


def _tool(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def res_usage(cubin: bytes) -> dict:
    """REG, STACK, SHARED (static) and LOCAL of the cubin's kernel, from ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


@dataclass
class Row:
    case: str
    kernel: str
    config: str
    d: int
    dtype: str
    regs: int
    stack: int
    spill: int
    shared: int
    wgmma: int
    mma_sync: int
    tma: int
    cp_async: int
    error: str = ""

    def problems(self) -> list[str]:
        """SPEC 5's conditions this config violates (D=64/128 16-bit: all; D=256: shared memory)."""
        if self.error:
            return [self.error]
        out = []
        limit = SHARED_LIMITS[TARGET.arch]
        if self.shared > limit:
            out.append(f"{self.shared} B shared > {limit}")
        if self.d <= 128 and self.dtype != "fp32" and self.kernel in MATRIX_KERNELS:
            if self.spill:
                out.append(f"{self.spill} B of spill stores + loads")
            if not self.wgmma and TARGET.arch >= 90:
                out.append(f"no wgmma (mma.sync x{self.mma_sync})")
        return out


# the kernels with matrix products (the rows/RoPE kernels have none)
MATRIX_KERNELS = {"_fwd_kernel", "_dkdv_kernel", "_dq_kernel"}


def _describe(config):
    if config is None:
        return "-"
    kw = config.kwargs
    return f"{kw.get('BLOCK_M', '-')}x{kw.get('BLOCK_N', '-')}/{config.num_warps}w/{config.num_stages}s"


_JOBS: list = []  # set before the pool forks: workers get indices, the launches need no pickling


def compile_one(index) -> Row:
    launch, config = _JOBS[index]
    name = launch.kernel.fn.__name__
    d = int(launch.kwargs.get("D", 0))
    first = getattr(launch.args[0], "base", launch.args[0])  # a tensor, or a tensor descriptor's base
    dtype = str(first.dtype).split(".")[-1].replace("bfloat16", "bf16").replace("float16", "fp16") \
        .replace("float32", "fp32")
    log = io.StringIO()
    try:
        src, options = specialise(launch, config)
        with contextlib.redirect_stdout(log):  # Triton prints ptxas' -v log (TRITON_DUMP_PTXAS_LOG, above)
            compiled = triton_compile(src, target=TARGET, options=options.__dict__)
    except Exception as e:  # reported as a row, fails --check
        return Row(launch.case, name, _describe(config), d, dtype, 0, 0, 0, 0, 0, 0, 0, 0, f"compile error: {e!r}"[:300])
    usage = res_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    if not spills:
        return Row(launch.case, name, _describe(config), d, dtype, 0, 0, 0, 0, 0, 0, 0, 0, "no ptxas log to read spills from")
    return Row(launch.case, name, _describe(config), d, dtype, usage.get("REG", -1), usage.get("STACK", 0),
               sum(int(n) for pair in spills for n in pair), compiled.metadata.shared + usage.get("SHARED", 0),
               len(re.findall(r"\bwgmma\.mma_async", ptx)), len(re.findall(r"\bmma\.sync", ptx)),
               len(re.findall(r"cp\.async\.bulk\.tensor", ptx)), len(re.findall(r"cp\.async\.(?:ca|cg)", ptx)))


def collect(report_all: bool, dtypes=(torch.bfloat16,)):
    """Records the SPEC 5 calls and returns the (launch, config) jobs to compile."""
    _RECORDED.clear()
    for dtype in dtypes:
        for d in (64, 128, 256):
            record_residual_attention(d, dtype, res=True, state=False, rope=False, backward=True)
            record_residual_attention(d, dtype, res=False, state=False, rope=False, backward=True)
            if d <= 128:
                record_residual_attention(d, dtype, res=True, state=True, rope=True, backward=False)
                record_residual_attention(d, dtype, res=True, state=False, rope=False, backward=True,
                                          deterministic=True)
    record_residual_attention(128, torch.float32, res=True, state=True, rope=True, backward=True)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        record_small_ops(dtype)
    jobs, seen = [], set()
    for launch in _RECORDED:
        configs = [None] if launch.configs is None else (launch.configs if report_all else launch.configs[:1])
        for config in configs:
            key = (launch.case, launch.kernel.fn.__name__, _describe(config), launch.kwargs.get("NUM_AXES"))
            if key not in seen:  # the backward's RoPE rotations repeat the forward's
                seen.add(key)
                jobs.append((launch, config))
    return jobs


def markdown(rows) -> str:
    lines = ["| call | kernel | config | regs | spill B | stack B | shared KiB | wgmma | mma.sync | TMA | cp.async | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = "; ".join(r.problems()) or "yes"
        lines.append(f"| {r.case} | {r.kernel} | {r.config} | {r.regs} | {r.spill} | {r.stack} | {r.shared / 1024:.0f} | "
                     f"{r.wgmma} | {r.mma_sync} | {r.tma} | {r.cp_async} | {ok} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="every autotune config (default: each list's first)")
    parser.add_argument("--check", action="store_true", help="exit 1 on any SPEC 5 violation")
    parser.add_argument("--markdown", action="store_true", help="print the NOTES.md table")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--only", default="", help="compile only the jobs whose 'call kernel' contains this")
    parser.add_argument("--arch", type=int, choices=sorted(SHARED_LIMITS), default=90,
                        help="90 (default): H100/H200, descriptor path; 80: A100, pointer path, mma.sync")
    args = parser.parse_args(argv)
    global TARGET
    TARGET = GPUTarget("cuda", args.arch, 32)
    _JOBS[:] = [j for j in collect(args.all) if args.only in f"{j[0].case} {j[0].kernel.fn.__name__}"]
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety
        def tqdm(it, **_):
            return it
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        rows = list(tqdm(pool.imap(compile_one, range(len(_JOBS))), total=len(_JOBS), desc="sm_90 compiles", file=sys.stderr))
    bad = 0
    for r in rows:
        problems = r.problems()
        bad += bool(problems)
        print(f"{r.case:<36} {r.kernel:<13} {r.config:<14} regs {r.regs:>3} spill {r.spill:>4} stack {r.stack:>4} "
              f"shared {r.shared:>6} wgmma {r.wgmma:>3} mma.sync {r.mma_sync:>3} tma {r.tma} cp.async {r.cp_async:>3}"
              + (f"  VIOLATES: {'; '.join(problems)}" if problems else ""), flush=True)
    if args.markdown:
        print(markdown(rows))
    print(f"compiled {len(rows)} kernels, {bad} violating SPEC 5")
    if args.check and bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
