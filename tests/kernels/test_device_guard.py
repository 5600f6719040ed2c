"""Triton launches run on their tensors' device, not on the current one (SPEC 1).

On CPU: ``_backend.device_guard`` enters ``torch.cuda.device`` of a CUDA tensor's device (checked with a
stand-in for ``torch.cuda.device``), and every Triton kernel launch of every op, forward and backward,
happens inside a guard entered with the device of the launch's tensors (checked by recording guards
and launches under the interpreter). On a machine with two GPUs: tensors on cuda:1 with cuda:0
current give the reference's results."""
import contextlib
from types import SimpleNamespace

import pytest
import torch

import latte_kernels as lk
from latte_kernels import _backend
from latte_kernels import reference as ref

needs_interpreter = pytest.mark.skipif(not (_backend.INTERPRET and _backend.HAS_TRITON),
                                       reason="launches are recorded through the Triton interpreter")


def test_guard_enters_the_cuda_device_of_the_tensor(monkeypatch):
    events = []

    class StandIn:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            events.append(("enter", self.device))

        def __exit__(self, *exc):
            events.append(("exit", self.device))
            return False

    monkeypatch.setattr(torch.cuda, "device", StandIn)
    with _backend.device_guard(SimpleNamespace(device=torch.device("cuda", 1))):
        events.append("launch")
    assert events == [("enter", torch.device("cuda", 1)), "launch", ("exit", torch.device("cuda", 1))]
    events.clear()
    with _backend.device_guard(torch.empty(1)):  # CPU tensors (the interpreter) need no guard
        pass
    assert events == []


def _all_ops_forward_and_backward():
    """One call of each public op with gradients through every output (small shapes)."""
    t = lambda *s: torch.randn(*s, requires_grad=True)  # noqa: E731
    q, k, v, qp, kp = t(2, 12, 4, 16), t(2, 12, 2, 16), t(2, 12, 2, 16), t(2, 12, 4, 16), t(2, 12, 2, 16)
    gate, out_c, lse_c = t(2, 4), t(2, 12, 4, 16), t(2, 4, 12)
    kc, vc = t(2, 5, 2, 16), t(2, 5, 2, 16)
    outs = [lk.rope_2d(q, (3, 4)), lk.mrope(q, torch.zeros(3, 2, 12, dtype=torch.long), mrope_section=(2, 3, 3)),
            *lk.merge_attention_states(q, lse_c, out_c, lse_c),
            *lk.residual_attention(q, k, v, q_prev=qp, k_prev=kp, gate=gate, state=(out_c, lse_c), rope_grid=(3, 4)),
            lk.latte_attention(q, k, v, (3, 4), k_ctx=kc, v_ctx=vc, q_prev=qp, k_prev=kp, gate=gate)]
    sum(o.sum() for o in outs).backward()
    x = torch.randn(2, 12, 3, 16)
    lk.rope_2d(x, (3, 4), inplace=True)
    lk.mrope(x, torch.zeros(3, 2, 12, dtype=torch.long), mrope_section=(2, 3, 3), inplace=True)


@needs_interpreter
def test_every_triton_launch_runs_inside_its_tensors_guard(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    guards = []

    @contextlib.contextmanager
    def recording_guard(t):
        guards.append(t.device)
        try:
            yield
        finally:
            guards.pop()

    launches = []
    original_run = InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        devices = {a.device for a in args if isinstance(a, torch.Tensor)}
        launches.append((self.fn.__name__, list(guards), devices))
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(_backend, "device_guard", recording_guard)
    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    _all_ops_forward_and_backward()
    torch.use_deterministic_algorithms(True)  # residual attention's separate dq pass runs only then
    try:
        _all_ops_forward_and_backward()
    finally:
        torch.use_deterministic_algorithms(False)
    kernels = {name for name, _, _ in launches}
    assert {"_rope_kernel", "_merge_fwd_kernel", "_merge_bwd_kernel", "_fwd_kernel", "_rows_kernel", "_dkdv_kernel",
            "_dq_kernel"} <= kernels, kernels
    for name, active, devices in launches:
        assert active, f"{name} launched outside a device guard"
        assert devices == {active[-1]}, f"{name}: guard for {active[-1]}, tensors on {devices}"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_run_on_the_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    t = lambda *s: torch.randn(*s, device=dev, requires_grad=True)  # noqa: E731
    q, k, v, qp, kp = t(2, 64, 4, 64), t(2, 64, 2, 64), t(2, 64, 2, 64), t(2, 64, 4, 64), t(2, 64, 2, 64)
    gate, kc, vc = t(2, 4), t(2, 33, 2, 64), t(2, 33, 2, 64)
    lens = torch.tensor([33, 7], device=dev)
    kw = dict(k_ctx=kc, v_ctx=vc, ctx_lens=lens, q_prev=qp, k_prev=kp, gate=gate)
    for fn, want_fn in (
        (lambda: lk.latte_attention(q, k, v, (8, 8), **kw), lambda: ref.latte_attention(q, k, v, (8, 8), **kw)),
        (lambda: lk.rope_2d(q, (8, 8)), lambda: ref.rope_2d(q, (8, 8))),
        (lambda: lk.merge_attention_states(q, gate[:, :, None].expand(2, 4, 64).contiguous(), qp,
                                           torch.zeros(2, 4, 64, device=dev))[0],
         lambda: ref.merge_attention_states(q, gate[:, :, None].expand(2, 4, 64).contiguous(), qp,
                                            torch.zeros(2, 4, 64, device=dev))[0]),
    ):
        got = fn()
        grads = torch.autograd.grad(got.sum(), (q, qp), allow_unused=True)
        want = want_fn()
        want_grads = torch.autograd.grad(want.sum(), (q, qp), allow_unused=True)
        assert got.device == dev and torch.cuda.current_device() == 0
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        for g, w in zip(grads, want_grads):
            assert (g is None) == (w is None)
            if g is not None:
                torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
