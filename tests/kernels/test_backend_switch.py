"""LATTE_KERNELS_BACKEND=reference: every op takes the plain-PyTorch reference (no Triton launch, the
extension never loaded), with the same results and gradients; a bad value is one clear error. Runs in
subprocesses, since the switch is read when latte_kernels is imported."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import torch
    import triton
    import latte_kernels as lk
    from latte_kernels import _backend, _ext, reference as ref

    from triton.runtime.interpreter import InterpretedFunction  # what @triton.jit makes under TRITON_INTERPRET=1

    launched = []
    real_run = InterpretedFunction.run
    def spy(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        return real_run(self, *args, **kwargs)
    InterpretedFunction.run = spy

    assert _backend.REFERENCE_ONLY and _backend.INTERPRET
    torch.manual_seed(0)
    q = torch.randn(2, 16, 4, 32, requires_grad=True)
    k = torch.randn(2, 16, 2, 32, requires_grad=True)
    v = torch.randn(2, 16, 2, 32, requires_grad=True)
    kc, vc = torch.randn(2, 9, 2, 32), torch.randn(2, 9, 2, 32)
    lens = torch.tensor([9, 4])
    gate = torch.randn(2, 4)
    q_prev, k_prev = torch.randn_like(q), torch.randn_like(k)
    pos = torch.randint(0, 5, (3, 2, 16))

    eq = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0)
    eq(lk.rope_2d(q, (4, 4)), ref.rope_2d(q, (4, 4)))
    eq(lk.mrope(q, pos, mrope_section=(4, 6, 6)), ref.mrope(q, pos, mrope_section=(4, 6, 6)))
    out_c, lse_c = lk.context_attention(q, kc, vc, lens)
    r_out, r_lse = ref.context_attention(q, kc, vc, lens)
    eq(out_c, r_out); eq(lse_c, r_lse)
    o2, l2 = torch.randn_like(out_c), torch.randn_like(lse_c)
    for a, b in zip(lk.merge_attention_states(out_c, lse_c, o2, l2), ref.merge_attention_states(out_c, lse_c, o2, l2)):
        eq(a, b)
    kw = dict(q_prev=q_prev, k_prev=k_prev, gate=gate, state=(out_c, lse_c))
    for a, b in zip(lk.residual_attention(q, k, v, **kw), ref.residual_attention(q, k, v, **kw)):
        eq(a, b)
    lw = dict(k_ctx=kc, v_ctx=vc, ctx_lens=lens, q_prev=q_prev, k_prev=k_prev, gate=gate)
    out = lk.latte_attention(q, k, v, (4, 4), **lw)
    eq(out, ref.latte_attention(q, k, v, (4, 4), **lw))
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    r_grads = torch.autograd.grad(ref.latte_attention(q, k, v, (4, 4), **lw).square().sum(), (q, k, v))
    for g, r in zip(grads, r_grads):
        torch.testing.assert_close(g, r)
    assert launched == [], launched
    assert not _ext._LOADED, "the extension was loaded"
    print("reference backend ok")
""")


def _run(env_value, script):
    env = {k: v for k, v in os.environ.items() if k != "LATTE_KERNELS_BACKEND"}
    env.update(LATTE_KERNELS_BACKEND=env_value, TRITON_INTERPRET="1", LATTE_NO_JIT="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)


def test_reference_backend_runs_every_op_through_the_reference():
    done = _run("reference", SCRIPT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "reference backend ok" in done.stdout


def test_default_backend_still_runs_the_kernels():
    # the same spies see a Triton launch and the extension load without the switch: the check is not vacuous
    head = SCRIPT[:SCRIPT.index("assert _backend.REFERENCE_ONLY")]
    script = head + textwrap.dedent("""
        assert not _backend.REFERENCE_ONLY
        lk.rope_2d(torch.randn(1, 16, 2, 32), (4, 4))
        lk.context_attention(torch.randn(1, 4, 2, 32), torch.randn(1, 5, 1, 32), torch.randn(1, 5, 1, 32))
        assert launched and _ext._LOADED, (launched, _ext._LOADED)
        print("kernels ran", launched)
    """)
    done = _run("auto", script)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "kernels ran" in done.stdout


def test_bad_value_is_one_clear_error():
    done = _run("cuda", "import latte_kernels")
    assert done.returncode != 0
    assert "LATTE_KERNELS_BACKEND must be 'auto' or 'reference', got 'cuda'" in done.stderr
