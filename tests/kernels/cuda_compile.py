"""Compiles every CUDA kernel of ``csrc/`` for sm_80 and sm_90 with the CUTLASS headers, on any machine
(no GPU), and reports per kernel: registers, stack, spills (ptxas -v), and the instruction counts that
show the kernel is built the intended way: LDSM (ldmatrix), LDGSTS (cp.async), HMMA (mma.sync) from the
SASS (cuobjdump), and ``wmma`` in the PTX (must be none).

Fails (exit 1) on a compile error, on any spill, on any WMMA instruction, and on a fp16/bf16 CuTe
kernel (``fwd_kernel``, ``bwd_dkdv_kernel``) missing HMMA, LDSM or LDGSTS. Run by ``.ci/run``:

    python tests/kernels/cuda_compile.py                  # every csrc/*.cu, sm_80 and sm_90
    python tests/kernels/cuda_compile.py --arch 90 --only context_attention_fwd.cu --markdown

cuobjdump comes from the CUDA toolkit or the ``nvidia-cuda-cuobjdump`` wheel; without it the SASS
counts are skipped (said so) and the PTX counts stand in.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"


def _ext():
    spec = importlib.util.spec_from_file_location("_latte_ext_build", ROOT / "latte_kernels" / "_ext.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        for cand in sorted(glob.glob(str(Path(base) / "*" / "bin" / "cuobjdump"))):
            return cand
    return None


def short_name(mangled: str) -> str:
    """A readable kernel name: function, element type and the tile numbers of its traits."""
    fn = re.search(r"(fwd_kernel|bwd_dkdv_kernel|bwd_convert_dq_kernel|fwd_f32_kernel|bwd_dq_f32_kernel|"
                   r"bwd_dkdv_f32_kernel|delta_kernel)", mangled)
    name = fn.group(1) if fn else mangled
    dtype = "bf16" if "bfloat16" in mangled else "fp16" if ("half" in mangled or "__half" in mangled) else ""
    if name == "delta_kernel" and not dtype:
        dtype = "f32" if "IfE" in mangled else ""
    nums = re.findall(r"Li(\d+)E", mangled)
    tile = ""
    if name == "fwd_kernel" and len(nums) >= 5:
        tile = f"D{nums[0]} {nums[1]}x{nums[2]} w{nums[3]} s{nums[4]}"
    elif name == "bwd_dkdv_kernel" and len(nums) >= 8:
        tile = f"D{nums[0]} {nums[1]}x{nums[2]} w{nums[3]} s{nums[7]}"
    return " ".join(x for x in (name, dtype, tile) if x)


def ptxas_report(log: str):
    """{mangled name: dict(regs, stack, spill_st, spill_ld)} from ptxas -v output."""
    out, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            cur = m.group(1)
            out[cur] = dict(regs=0, stack=0, spill_st=0, spill_ld=0)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[cur]["regs"] = int(m.group(1))
    return out


def sass_counts(cuobjdump: str, cubin: Path):
    """{mangled name: dict(LDSM, LDGSTS, HMMA)} from the cubin's SASS."""
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    out, cur = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1)
            out[cur] = dict(LDSM=0, LDGSTS=0, HMMA=0)
            continue
        if cur is None:
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            op = m.group(1)
            for key in out[cur]:
                if op == key:
                    out[cur][key] += 1
    return out


def ptx_counts(ptx: str):
    return dict(ldmatrix=len(re.findall(r"\bldmatrix\.", ptx)), cp_async=len(re.findall(r"\bcp\.async\.c[ag]\b", ptx)),
                mma=len(re.findall(r"\bmma\.sync\.", ptx)), wmma=len(re.findall(r"\bwmma\.", ptx)))


def compile_one(cu: Path, arch: int, flags, cuobjdump):
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / (cu.stem + ".cubin")
        cmd = ["nvcc", f"-arch=sm_{arch}", *flags, "-Xptxas", "-v", "-keep", f"-keep-dir={tmp}", "-cubin",
               str(cu), "-o", str(cubin)]
        t0 = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.time() - t0
        if done.returncode != 0:
            return None, done.stdout + done.stderr, seconds
        report = ptxas_report(done.stdout + done.stderr)
        ptx = "".join(p.read_text() for p in Path(tmp).glob("*.ptx"))
        sass = sass_counts(cuobjdump, cubin) if cuobjdump else {}
        return dict(kernels=report, sass=sass, ptx=ptx_counts(ptx)), "", seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--only", nargs="*", help="file names under csrc/ (default: every .cu)")
    parser.add_argument("--markdown", action="store_true", help="print the report as a markdown table")
    args = parser.parse_args(argv)
    if shutil.which("nvcc") is None:
        print("nvcc not found: nothing compiled")
        return 1
    ext = _ext()
    flags = [f for f in ext.nvcc_flags(ext.cutlass_include()) if not f.startswith("-gencode")]
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        print("cuobjdump not found (CUDA toolkit or `pip install nvidia-cuda-cuobjdump`): SASS counts skipped")
    files = sorted(CSRC.glob("*.cu"))
    if args.only:
        files = [f for f in files if f.name in args.only]
    failures, rows = [], []
    for arch in args.arch:
        for cu in files:
            result, log, seconds = compile_one(cu, arch, flags, cuobjdump)
            print(f"nvcc -arch=sm_{arch} {cu.name}: {'ok' if result else 'FAILED'} in {seconds:.0f} s", flush=True)
            if result is None:
                print(log[-6000:])
                failures.append(f"{cu.name} sm_{arch}: compile error")
                continue
            if result["ptx"]["wmma"]:
                failures.append(f"{cu.name} sm_{arch}: {result['ptx']['wmma']} wmma instructions in the PTX")
            for mangled, k in sorted(result["kernels"].items(), key=lambda kv: short_name(kv[0])):
                s = result["sass"].get(mangled, {})
                name = short_name(mangled)
                rows.append((arch, cu.name, name, k, s))
                if k["spill_st"] or k["spill_ld"]:
                    failures.append(f"{name} sm_{arch}: spills {k['spill_st']} B stores / {k['spill_ld']} B loads")
                if name.startswith(("fwd_kernel", "bwd_dkdv_kernel")) and s:
                    missing = [op for op in ("HMMA", "LDSM", "LDGSTS") if s.get(op, 0) == 0]
                    if missing:
                        failures.append(f"{name} sm_{arch}: no {', '.join(missing)} in the SASS")
            p = result["ptx"]
            print(f"  PTX: {p['mma']} mma.sync, {p['ldmatrix']} ldmatrix, {p['cp_async']} cp.async, {p['wmma']} wmma")
    if args.markdown:
        print("\n| arch | kernel | registers | stack (B) | spill st/ld (B) | LDSM | LDGSTS | HMMA |")
        print("|---|---|---|---|---|---|---|---|")
    for arch, fname, name, k, s in rows:
        counts = [s.get(op, "-") for op in ("LDSM", "LDGSTS", "HMMA")]
        if args.markdown:
            print(f"| sm_{arch} | {name} | {k['regs']} | {k['stack']} | {k['spill_st']}/{k['spill_ld']} | "
                  f"{counts[0]} | {counts[1]} | {counts[2]} |")
        else:
            print(f"sm_{arch} {name:42s} regs {k['regs']:3d} stack {k['stack']:4d} spill {k['spill_st']}/{k['spill_ld']} "
                  f"LDSM {counts[0]} LDGSTS {counts[1]} HMMA {counts[2]}")
    for f in failures:
        print("FAIL", f)
    print(f"compiled {len(files)} files x {len(args.arch)} archs: {len(rows)} kernels, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
