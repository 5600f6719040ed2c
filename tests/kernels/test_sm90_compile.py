"""Every Triton kernel compiles for sm_90 (H100/H200) the way the JIT compiles it for the SPEC 5 call, on
this machine, GPU or not (``sm90_compile.py --all --check``): the interpreter that runs the kernels on CPU
accepts code the GPU compiler rejects, and SPEC 5 asks every 16-bit autotune config at D = 64 / 128 to
use wgmma, spill nothing and fit 227 KiB of shared memory (D = 256: fit shared memory)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile for the real device")
def test_every_autotune_config_compiles_for_sm90_within_spec5():
    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LATTE_KERNELS_AUTOTUNE_MAX")}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    script = Path(__file__).with_name("sm90_compile.py")
    done = subprocess.run([sys.executable, str(script), "--all", "--check", "--jobs", "2"], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"sm_90 compile failed:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert ", 0 violating SPEC 5" in done.stdout
    for kernel in ("_fwd_kernel", "_dkdv_kernel", "_rows_kernel", "_rope_kernel", "_merge_fwd_kernel",
                   "_merge_bwd_kernel"):
        assert kernel in done.stdout, f"{kernel} was not compiled"
