"""The Euler / CFG sampler: strict partition, guidance, seeding, and CUDA-graph replay (gpu)."""
import pytest
import torch

from latteflow import Context
from latteflow.core.sampler import group_step_counts, sample, timestep_schedule


def _setup(tiny, device="cpu", **kw):
    model = tiny.make_model(**kw).to(device)
    ids, mask = tiny.prompts([6, 3], pad="right")
    ctx = model.build_context(ids.to(device), mask.to(device))
    null = model.build_context(torch.tensor([[1]], device=device))  # shorter than both rows
    return model, ctx, null


def test_strict_partition_runs_12_10_10_8_steps_per_group(tiny, monkeypatch):
    model, ctx, null = _setup(tiny, num_groups=4, num_layers=4)
    assert model.cfg.boundaries == [1000, 700, 450, 200, 0]
    calls = []
    orig = model.group_velocity

    def spy(k, x, sigma, c):
        calls.append((k, round(float(sigma[0]) * 1000, 3)))
        assert torch.all(sigma == sigma[0])
        return orig(k, x, sigma, c)

    monkeypatch.setattr(model, "group_velocity", spy)
    model.sample(ctx, null, steps=40, guidance=5.0)
    assert [sum(1 for k, _ in calls if k == g) for g in range(4)] == [12, 10, 10, 8]
    assert calls[0] == (0, 1000.0) and calls[11] == (0, 725.0) and calls[12] == (1, 700.0) and calls[-1] == (3, 25.0)
    assert group_step_counts(model.cfg, 40) == [12, 10, 10, 8]
    sched = timestep_schedule(model.cfg, 40)
    assert sched[0][:2] == (1.0, 39 / 40) and sched[-1][1] == 0.0


def _euler(model, ctx, null, x, steps, guidance):
    """The sampler written out: separate, unbatched cond and null velocity calls."""
    x = x.clone()
    for i in range(steps):
        s, n = (steps - i) / steps, (steps - i - 1) / steps
        sig = torch.full((x.shape[0],), s)
        v_c = model.velocity(x, sig, ctx)
        if null is None:
            v = v_c
        else:
            v_u = model.velocity(x, sig, null.expand_to(x.shape[0]))
            v = v_u + guidance * (v_c - v_u)
        x = x + (n - s) * v
    return x


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_cfg_batch_matches_separate_calls(tiny, guidance):
    model, ctx, null = _setup(tiny)
    noise = torch.randn(2, 4, 4, 4)
    out = sample(model, ctx, null, steps=6, guidance=guidance, noise=noise)
    with torch.no_grad():
        ref = _euler(model, ctx, null, noise, 6, guidance)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        if guidance == 1.0:  # guidance 1 is the conditional path
            torch.testing.assert_close(out, _euler(model, ctx, None, noise, 6, 1.0), atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(out, sample(model, ctx, None, steps=6, noise=noise), atol=2e-5, rtol=2e-5)
        else:
            assert not torch.allclose(out, _euler(model, ctx, None, noise, 6, 1.0), atol=1e-3)


def test_seeded_generator_reproduces(tiny):
    model, ctx, null = _setup(tiny)
    a = model.sample(ctx, null, steps=4, guidance=2.0, generator=torch.Generator().manual_seed(7))
    b = model.sample(ctx, null, steps=4, guidance=2.0, generator=torch.Generator().manual_seed(7))
    c = model.sample(ctx, null, steps=4, guidance=2.0, generator=torch.Generator().manual_seed(8))
    assert a.shape == (2, 4, 4, 4) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)


def test_sampler_rejects_bad_input(tiny):
    model, ctx, null = _setup(tiny)
    with pytest.raises(ValueError, match="steps"):
        model.sample(ctx, null, steps=0)
    with pytest.raises(TypeError, match="guidance"):
        model.sample(ctx, null, guidance="5")
    with pytest.raises(TypeError, match="null_ctx"):
        model.sample(ctx, null.keys)
    with pytest.raises(ValueError, match="noise"):
        sample(model, ctx, null, steps=2, noise=torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match="rows"):
        model.sample(ctx, Context.cat([null, null, null]), steps=2)


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager(tiny):
    model, ctx, null = _setup(tiny, device="cuda", num_groups=4, num_layers=4)
    noise = torch.randn(2, 4, 4, 4, device="cuda")
    eager = sample(model, ctx, null, steps=12, guidance=4.0, noise=noise, cuda_graphs=False)
    graphed = sample(model, ctx, null, steps=12, guidance=4.0, noise=noise, cuda_graphs=True)
    torch.testing.assert_close(graphed, eager, atol=1e-5, rtol=1e-5)
    # replay really reads the static buffers: another noise gives another (still eager-equal) result
    noise2 = torch.randn(2, 4, 4, 4, device="cuda")
    graphed2 = sample(model, ctx, null, steps=12, guidance=4.0, noise=noise2, cuda_graphs=True)
    torch.testing.assert_close(graphed2, sample(model, ctx, null, steps=12, guidance=4.0, noise=noise2, cuda_graphs=False),
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(graphed, graphed2)
    # later calls reuse the captured graphs: a new prompt batch and guidance are copied into the
    # static buffers, and the result still equals eager
    (cached,) = model._step_graphs.values()
    captured = dict(cached.graphs)
    swapped = sample(model, null.expand_to(2), ctx.index_select(torch.tensor([1, 0], device="cuda")), steps=12,
                     guidance=2.0, noise=noise, cuda_graphs=True)
    assert len(model._step_graphs) == 1 and cached.graphs == captured
    torch.testing.assert_close(swapped, sample(model, null.expand_to(2), ctx.index_select(torch.tensor([1, 0], device="cuda")),
                                               steps=12, guidance=2.0, noise=noise, cuda_graphs=False), atol=1e-5, rtol=1e-5)


def test_sampling_checks_ctx_lens_once_per_context_not_per_layer(tiny, monkeypatch):
    """On CUDA each ctx_lens value check is a host sync: the sampling loop must not do any."""
    from latte_kernels import _validate

    model, ctx, null = _setup(tiny, num_groups=2, num_layers=2, backend="fused")
    calls = []
    original = _validate.check_ctx_lens_values
    monkeypatch.setattr(_validate, "check_ctx_lens_values", lambda *a: calls.append(1) or original(*a))
    sample(model, ctx, null, steps=5, guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2  # the conditional and the null context, once each


def test_out_of_range_ctx_lens_is_a_value_error(tiny):
    model, ctx, null = _setup(tiny, num_groups=2, num_layers=2)
    bad = Context(ctx.keys, ctx.values, torch.full_like(ctx.ctx_lens, ctx.max_len + 1))
    with pytest.raises(ValueError, match="ctx_lens values"):
        sample(model, bad, null, steps=2)
    with pytest.raises(ValueError, match="ctx_lens values"):
        model.velocity(torch.zeros(bad.batch_size, model.cfg.latent_channels, *model.cfg.latent_hw), 0.5, bad)
