"""``latteflow.evaluation.speed``: the timing primitives behind ``latteflow bench`` and ``benchmarks.e2e``."""
import argparse

import pytest
import torch

from latteflow.evaluation import speed

CPU = torch.device("cpu")


def test_time_runs_calls_once_per_repeat_and_orders_its_quantiles():
    calls = []
    t = speed.time_runs(lambda: calls.append(sum(range(20000))), CPU, 6)
    assert len(calls) == 6
    assert 0 < t["ms_p20"] <= t["ms_p50"] <= t["ms_p80"]
    one = speed.time_runs(lambda: None, CPU, 1)
    assert one["ms_p20"] == one["ms_p50"] == one["ms_p80"]


def _args(**kw):
    base = dict(small=True, steps=1, guidance=5.0, batch=[1], repeats=2, modes=None, no_compile=False)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_time_mode_warms_up_then_times_and_runs_after_once():
    setup = speed.make_setup(_args())
    mode = next(m for m in speed.MODES if m.name == "latte-eager-reference")
    model = speed.build_model(speed.build_backbone_for(setup), setup, mode.variant, mode.backend)
    ids, mask = speed.class_prompts(1, CPU)
    seen = []
    t, compile_s, extra = speed.time_mode(model, mode, ids, mask, setup, lambda run: seen.append(run().shape) or "x")
    assert compile_s is None and extra == "x"
    assert seen == [torch.Size([1, setup.latent_channels, *setup.grid_hw])]
    assert 0 < t["ms_p20"] <= t["ms_p50"] <= t["ms_p80"]


def test_select_modes_refuses_an_empty_choice():
    setup = speed.make_setup(_args())
    with pytest.raises(ValueError, match="no mode"):
        speed.select_modes(_args(modes=["latte-compile-reference"], no_compile=True), setup)
