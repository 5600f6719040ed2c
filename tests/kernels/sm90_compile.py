"""Compiles every residual_attention kernel to an sm_90 (H100) cubin on any machine, no GPU needed.

Run by ``test_residual_attention.test_kernels_compile_for_sm90`` in a process without
TRITON_INTERPRET; usable alone: ``PYTHONPATH=. python tests/kernels/sm90_compile.py``.
"""
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("sm90_compile.py needs TRITON_INTERPRET unset")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile as triton_compile  # noqa: E402

from latte_kernels import _residual_attention_bwd as bwd  # noqa: E402
from latte_kernels import _residual_attention_fwd as fwd  # noqa: E402

F32_POINTERS = {"TG", "LC", "INVF", "LSE", "DELTA", "GROW", "DLSE", "DLC"}
INT_ARGS = {"N", "H", "GW", "GROUP"}
FLOAT_ARGS = {"c_qk", "c_prev", "scale", "prev_scale"}


def compile_sm90(kernel, consts, warps, stages, dtype="bf16"):
    names = kernel.arg_names
    sig = {}
    for name, param in zip(names, kernel.params):
        if name in consts:
            sig[name] = "constexpr"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name.isupper() and name not in INT_ARGS and not param.is_constexpr:
            sig[name] = "*fp32" if name in F32_POINTERS else f"*{dtype}"
        else:
            sig[name] = "i32"
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    compiled = triton_compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    assert compiled.asm["cubin"], f"{kernel.__name__}: no cubin"
    print(f"{kernel.__name__}: {compiled.metadata.shared} B shared", flush=True)


def main():
    d = dict(D=128, DP=128)
    compile_sm90(fwd._fwd_kernel, dict(d, BLOCK_M=128, BLOCK_N=64, HAS_RES=True, HAS_STATE=True, ROPE=True,
                                       DOT_PREC="tf32"), 8, 2)
    compile_sm90(fwd._rope_kernel, dict(d, BLOCK=32, INVERSE=True), 4, 1)
    bw = dict(d, BLOCK_M=64, BLOCK_N=64, HAS_RES=True, DOT_PREC="tf32")
    compile_sm90(bwd._dkdv_kernel, bw, 8, 2)
    compile_sm90(bwd._dq_kernel, bw, 8, 2)
    compile_sm90(bwd._rows_kernel, dict(d, BLOCK_M=64, HAS_STATE=True), 4, 1)
    print("compiled 5 kernels")


if __name__ == "__main__":
    main()
