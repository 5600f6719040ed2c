"""The structure SPEC 5 asks of the residual-attention kernels, read from their source: products per
(query tile, key tile) pair (backward <= 8, the forward 3), the logits as one product over the
concatenated head dim, tile sizes for wgmma; the ``LATTE_KERNELS_AUTOTUNE_MAX`` knob; and the
gate-folding edge cases (``scale`` zero or negative) against the float64 reference."""
import ast
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import latte_kernels as lk
from latte_kernels import _autotune
from latte_kernels import _residual_attention_bwd as bwd
from latte_kernels import _residual_attention_fwd as fwd
from latte_kernels import reference as ref
from test_residual_attention import as_f64, assert_close, case, grads, names_of, needs_kernel

f64 = torch.float64


def _loop_dots(kernel):
    """The ``tl.dot`` calls in the innermost loop of ``kernel``'s source, with their argument count."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(kernel.fn)))
    loops = [n for n in ast.walk(tree) if isinstance(n, ast.For)]
    inner = [lp for lp in loops if not any(isinstance(c, ast.For) for c in ast.walk(lp) if c is not lp)]
    assert len(inner) == 1, f"{kernel.fn.__name__}: expected one innermost loop"
    return [len(c.args) for c in ast.walk(inner[0])
            if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and c.func.attr == "dot"]


def test_backward_does_at_most_8_products_per_tile_pair():
    dots = _loop_dots(bwd._dkdv_kernel)
    assert len(dots) == 8, dots  # logits x2 (concatenated head dim), dv, dP, dk, dk_prev, dq, dq_prev
    assert dots.count(3) == 1, "the residual half of the logits accumulates into the first half's result"
    # the default path launches only the key-major pass (dq/dq_prev added by atomics / TMA reductions)
    src = inspect.getsource(bwd._dkdv_kernel.fn)
    assert src.count("add_rows(") == 2
    assert all(f"# product {i}" in src for i in range(1, 9))


def test_forward_logits_are_one_product():
    dots = _loop_dots(fwd._fwd_kernel)
    assert len(dots) == 3 and dots.count(3) == 1, dots  # [q, r q_prev] . [k, k_prev]^T, then p v


def test_16_bit_tiles_have_64_rows_for_wgmma():
    """wgmma needs >= 64 rows on the M side: every product's M is BLOCK_M or BLOCK_N."""
    for name, table, sides in (("fwd", fwd.FWD_CONFIGS, ("BLOCK_M",)),
                               ("dkdv", bwd.DKDV_CONFIGS, ("BLOCK_M", "BLOCK_N")),
                               ("dq", bwd.DQ_CONFIGS, ("BLOCK_M", "BLOCK_N"))):
        for d in (64, 128):
            for cfg in table[d]:
                assert all(cfg.kwargs[s] >= 64 for s in sides), f"{name} D={d}: {cfg}"
    for table in (fwd.FWD_CONFIGS, bwd.DKDV_CONFIGS, bwd.DQ_CONFIGS, fwd.FWD_TMA_CONFIGS):
        assert all(1 <= len(cfgs) <= 4 for cfgs in table.values())  # autotuning is paid on every first call
    for d in (64, 128):  # Hopper's descriptor path
        assert all(c.kwargs["BLOCK_M"] >= 64 for c in fwd.FWD_TMA_CONFIGS[d]), d
        assert min(bwd.DKDV_TMA_CONFIGS[d].kwargs.values()) >= 64, d
    for dp, cfgs in fwd.FWD_TMA_CONFIGS.items():  # one descriptor block per list
        assert {c.kwargs["BLOCK_N"] for c in cfgs} == {fwd.FWD_TMA_BLOCK_N[dp]}, dp


def test_autotune_max_knob(monkeypatch):
    monkeypatch.delenv(_autotune.ENV, raising=False)
    assert _autotune.limit([1, 2, 3]) == [1, 2, 3]
    monkeypatch.setenv(_autotune.ENV, "2")
    assert _autotune.limit([1, 2, 3]) == [1, 2]
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv(_autotune.ENV, bad)
        with pytest.raises(ValueError, match=_autotune.ENV):
            _autotune.limit([1])


def test_autotune_max_knob_reaches_every_autotuner():
    """Set before import, the knob cuts every residual-attention autotuner's list to its first config."""
    root = Path(__file__).resolve().parents[2]
    code = ("import torch; from latte_kernels import _residual_attention_fwd as f, _residual_attention_bwd as b\n"
            "for t in (f._fwd_tuned, b._dkdv_tuned, b._dq_tuned):\n"
            "    for dp in (64, 128, 256):\n"
            "        for dt in (torch.bfloat16, torch.float32):\n"
            "            assert len(t(dp, dt).configs) == 1, (dp, dt)\n"
            "assert f._fwd_tuned(128, torch.bfloat16).configs[0].kwargs == f.FWD_CONFIGS[128][0].kwargs\n"
            "assert all(len(f._fwd_tma_tuned(dp, torch.bfloat16).configs) == 1 for dp in (64, 128, 256))\n"
            "print('ok')")
    env = dict(os.environ, LATTE_KERNELS_AUTOTUNE_MAX="1", PYTHONPATH=str(root))
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


@needs_kernel
@pytest.mark.parametrize("scale,prev_scale", [(0.0, 0.3), (-0.4, 0.25), (0.37, 0.0)])
def test_unusual_scales_forward_and_gradients(scale, prev_scale):
    """The folded factors (c_qk, ratio) for scale == 0 (QK_ZERO), negative, and prev_scale == 0."""
    args, kw = case(1, 70, 66, 4, 2, 32, state=True)
    kw.update(scale=scale, prev_scale=prev_scale)
    d_out, d_lse = torch.randn(1, 70, 4, 32, dtype=f64), torch.randn(1, 4, 70, dtype=f64)
    out, lse, got = grads(lk.residual_attention, args, kw, d_out, d_lse)
    want_out, want_lse, want = grads(ref.residual_attention, *as_f64(args, kw), d_out, d_lse)
    assert_close(out, want_out, torch.float32, "out")
    assert_close(lse, want_lse, torch.float32, "lse")
    for name, g, w in zip(names_of(kw), got, want):
        assert_close(g, w, torch.float32, f"d{name}")
