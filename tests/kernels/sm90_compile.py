"""Compiles every Triton kernel of ``latte_kernels`` to an sm_90 (H100/H200) cubin on any machine, no GPU
needed, and reports ptxas register and spill counts per block configuration.

The Triton interpreter (how CI runs the kernels on CPU) accepts code the GPU compiler rejects, so this
is the check that a kernel will build on the user's GPU at all; the spill report is what the block-size
lists in the kernel modules are tuned against when no GPU is at hand.

    PYTHONPATH=. python tests/kernels/sm90_compile.py            # every kernel, the default configs
    PYTHONPATH=. python tests/kernels/sm90_compile.py --all      # every autotune config, with ptxas -v

Needs ``TRITON_INTERPRET`` unset. Run by ``test_sm90_compile.py``.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("sm90_compile.py needs TRITON_INTERPRET unset")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile as triton_compile  # noqa: E402

from latte_kernels import _residual_attention_bwd as rbwd  # noqa: E402
from latte_kernels import _residual_attention_fwd as rfwd  # noqa: E402
from latte_kernels import merge, rope  # noqa: E402

FLOATS = {"c_qk", "c_prev", "scale", "prev_scale"}


def signature(kernel, consts, pointers, dtype):
    """Triton signature: constexprs from ``consts``, pointer element types from ``pointers`` (default:
    the activation ``dtype``), float scalars by name, every other argument i32."""
    sig = {}
    for name, param in zip(kernel.arg_names, kernel.params):
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name].replace("DT", dtype)
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def ptxas_stats(ptx: str):
    """(registers, spill bytes) of the first kernel in ``ptx`` from ptxas -v."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(90)  # triton >= 3.5 picks the binary per architecture
    except TypeError:
        ptxas = get_ptxas()
    path = ptxas.path if hasattr(ptxas, "path") else ptxas[0]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([path, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", out.stderr)]
    return (int(regs.group(1)) if regs else -1), max(spills, default=0)


def compile_sm90(kernel, consts, pointers, warps, stages, dtype="bf16", report=False):
    names = kernel.arg_names
    src = ASTSource(fn=kernel, signature=signature(kernel, consts, pointers, dtype),
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    compiled = triton_compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    assert compiled.asm["cubin"], f"{kernel.fn.__name__}: no cubin"
    line = f"{kernel.fn.__name__:<18} {dtype:<5} {warps} warps {stages} stages {consts}: {compiled.metadata.shared} B shared"
    if report:
        regs, spill = ptxas_stats(compiled.asm["ptx"])
        line += f", {regs} registers, {spill} B spill"
    print(line, flush=True)
    return compiled


# pointer element types per kernel ("DT" = the activation dtype)
RES_FWD_PTRS = dict(Q="*DT", K="*DT", V="*DT", QP="*DT", KP="*DT", TG="*fp32", OC="*DT", LC="*fp32", INVF="*fp32",
                    O="*DT", LSE="*fp32")
RES_BWD_PTRS = dict(Q="*DT", K="*DT", V="*DT", QP="*DT", KP="*DT", TG="*fp32", DO="*DT", LSE="*fp32", DELTA="*fp32",
                    DK="*DT", DV="*DT", DKP="*DT", DQ="*DT", DQP="*DT", GROW="*fp32")
ROWS_PTRS = dict(DO="*DT", O="*DT", LSE="*fp32", DLSE="*fp32", OC="*DT", LC="*fp32", DELTA="*fp32", DOC="*DT",
                 DLC="*fp32")
ROPE_PTRS = dict(X="*DT", OUT="*DT", POS="*i64", INV_FREQ="*fp32", Y="*DT", INVF="*fp32")
MERGE_PTRS = dict(OA="*DT", LA="*fp32", OB="*DT", LB="*fp32", OUT="*DT", LSE="*fp32", G="*DT", GL="*fp32",
                  DOA="*DT", DLA="*fp32", DOB="*DT", DLB="*fp32")


def _configs(configs, report_all):
    """The autotune configs to compile: all with ``--all``, else the first (the fast path's default)."""
    return configs if report_all else configs[:1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="every autotune config, with ptxas register/spill counts")
    args = parser.parse_args(argv)
    n = 0

    def run(*a, **kw):
        nonlocal n
        compile_sm90(*a, report=args.all, **kw)
        n += 1

    for d in (64, 128):
        for res in (True, False):
            fwd = dict(D=d, DP=d, HAS_RES=res, HAS_STATE=res, ROPE=res, DOT_PREC="tf32")
            for cfg in _configs(rfwd.FWD_CONFIGS[d], args.all):
                run(rfwd._fwd_kernel, dict(fwd, **cfg.kwargs), RES_FWD_PTRS, cfg.num_warps, cfg.num_stages)
            bwd = dict(D=d, DP=d, HAS_RES=res, DOT_PREC="tf32")
            for cfg in _configs(rbwd.DKDV_CONFIGS[d], args.all):
                run(rbwd._dkdv_kernel, dict(bwd, **cfg.kwargs), RES_BWD_PTRS, cfg.num_warps, cfg.num_stages)
            for cfg in _configs(rbwd.DQ_CONFIGS[d], args.all):
                run(rbwd._dq_kernel, dict(bwd, **cfg.kwargs), RES_BWD_PTRS, cfg.num_warps, cfg.num_stages)
    f32 = dict(D=128, DP=128, HAS_RES=True, HAS_STATE=True, ROPE=True, DOT_PREC="ieee")
    cfg = rfwd.FWD_CONFIGS["fp32"][0]
    run(rfwd._fwd_kernel, dict(f32, **cfg.kwargs), RES_FWD_PTRS, cfg.num_warps, cfg.num_stages, dtype="fp32")
    run(rfwd._rope_kernel, dict(D=128, DP=128, BLOCK=32, INVERSE=True), ROPE_PTRS, 4, 1)
    run(rbwd._rows_kernel, dict(D=128, DP=128, BLOCK_M=64, HAS_STATE=True), ROWS_PTRS, 4, 1)

    for dtype in ("bf16", "fp16", "fp32"):
        for from_grid, axes in ((True, 2), (False, 2), (False, 3)):
            run(rope._rope_kernel, dict(SIN_SIGN=-1.0, FROM_GRID=from_grid, NUM_AXES=axes, HALF=64, HALF_P=64,
                                        BLOCK_N=32, HEADS_PER_PROG=4), ROPE_PTRS, 4, 1, dtype=dtype)
        run(merge._merge_fwd_kernel, dict(BLOCK_R=8, BLOCK_D=128), MERGE_PTRS, 4, 1, dtype=dtype)
        run(merge._merge_bwd_kernel, dict(BLOCK_R=8, BLOCK_D=128), MERGE_PTRS, 4, 1, dtype=dtype)
    print(f"compiled {n} kernels")


if __name__ == "__main__":
    main()
