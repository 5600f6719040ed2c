"""The end-to-end benchmark: its small configuration runs on CPU, its roofline arithmetic, its plot."""
import csv
import math

import pytest
import torch

from benchmarks import e2e, plot
from benchmarks.common import RESULTS_DIR, write_row

CPU_MODES = ("vanilla_couple-eager-reference", "latte-eager-reference", "latte-eager-fused")


def _results_dir_listing():
    return sorted(p.name for p in RESULTS_DIR.glob("*")) if RESULTS_DIR.exists() else []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU smoke path (CUDA runs the paper config)")
def test_small_configuration_runs_every_cpu_mode_end_to_end(tmp_path, capsys):
    before = _results_dir_listing()
    out = tmp_path / "e2e.csv"
    results = e2e.main(["--small", "--repeats", "1", "--out", str(out), "--profile"])
    printed = capsys.readouterr().out

    assert "CPU SMOKE RUN" in printed
    assert [r["mode"] for r in results] == list(CPU_MODES)  # graphs/compile need CUDA
    for r in results:
        line = next(line for line in printed.splitlines() if line.startswith(r["mode"] + " "))
        assert "B=2" in line and "s/img p50" in line and "% of floor" in line
        assert r["s_per_img"] > 0 and r["floor_s_per_img"] > 0
        assert r["s_per_img_p20"] <= r["s_per_img"] <= r["s_per_img_p80"]
        assert math.isclose(r["fraction_of_floor"], r["floor_s_per_img"] / r["s_per_img"])
        assert math.isclose(r["speedup_vs_vanilla"], results[0]["s_per_img"] / r["s_per_img"])
    # the baseline runs all 8 layers per step, LaTtE-Flow 2: its floor is the larger one
    assert results[0]["floor_s_per_img"] > results[1]["floor_s_per_img"] == results[2]["floor_s_per_img"]

    with out.open() as f:
        rows = list(csv.DictReader(f))
    samples = {r["provider"]: r for r in rows if r["op"] == "e2e" and r["mode"] == "sample"}
    assert set(samples) == set(CPU_MODES)
    for r in samples.values():
        assert r["shape"] == "B=2,T=4" and float(r["ms_p50"]) > 0 and r["gpu"].startswith("cpu")
    floors = {r["provider"] for r in rows if r["mode"] == "floor"}
    assert floors == {"vanilla-roofline", "latte-roofline"}
    try:
        import diffusers  # noqa: F401

        assert any(r["mode"] == "decode" for r in rows) and "-> (2, 3, 128, 128)" in printed
    except ImportError:
        assert "DC-AE decode skipped" in printed
    profile = out.with_name("e2e_e2e_profile.txt").read_text()
    assert all(f"=== {m} B=2,T=4 ===" in profile for m in CPU_MODES)
    assert _results_dir_listing() == before  # CPU numbers never land in benchmarks/results/


def test_default_outputs_of_a_cpu_or_small_run_stay_out_of_results(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    args = e2e.parse_args(["--small"])
    setup = e2e.make_setup(args)
    csv_path, profile_path = e2e._out_paths(args, setup)
    assert RESULTS_DIR not in csv_path.parents and RESULTS_DIR not in profile_path.parents
    # a folder of its own per run, never a fixed shared /tmp name
    again, _ = e2e._out_paths(args, setup)
    assert csv_path.parent != again.parent and csv_path.parent.parent == tmp_path
    assert profile_path.parent == csv_path.parent
    assert setup.small and setup.dtype == torch.float32 and setup.batches == (2,) and setup.steps == 4
    assert setup.grid_hw == (4, 4) and setup.num_groups == 4
    assert all(not m.needs_cuda for m in e2e.select_modes(args, setup))


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--batch", "two"], ["--steps", "-3"], ["--repeats", "0"],
                                  ["--guidance", "nan"], ["--modes", "latte-warp-speed"]])
def test_bad_arguments_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        e2e.main(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_forward_cost_and_floor_on_a_hand_computed_case():
    flops, nbytes = e2e.forward_cost(token_params=1000, row_params=10, weight_params=1010, rows=2, tokens=4,
                                     ctx_keys=2, layers=1, residual_layers=1, num_heads=1, head_dim=8,
                                     bytes_per_param=2, extra_bytes=20)
    # 2*1000*2*4 (linear) + 2*10*2 (per-row) + 4*2*1*4*(4+2)*8 (QK, PV) + 2*2*1*4*4*8 (residual logits)
    assert flops == 16000 + 40 + 1536 + 512
    assert nbytes == 2 * 1010 + 20
    # 1000 FLOP/s and 1000 B/s: compute bound, 18.088 s; 1e6 FLOP/s and 1000 B/s: memory bound, 2.04 s
    assert e2e.roofline_floor_s(flops, nbytes, 1e-9, 1e-6) == pytest.approx(18.088)
    assert e2e.roofline_floor_s(flops, nbytes, 1e-6, 1e-6) == pytest.approx(2.04)
    # causal prefill: each of 3 queries sees (3 + 1) / 2 = 2 keys on average
    flops_c, _ = e2e.forward_cost(token_params=0, row_params=0, weight_params=0, rows=1, tokens=3, ctx_keys=0,
                                  layers=2, residual_layers=0, num_heads=2, head_dim=4, bytes_per_param=2, causal=True)
    assert flops_c == 2 * 4 * 1 * 2 * 3 * 2 * 4
    with pytest.raises(ValueError):
        e2e.roofline_floor_s(1.0, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError):
        e2e.forward_cost(token_params=1, row_params=0, weight_params=1, rows=0, tokens=1, ctx_keys=0, layers=1,
                         residual_layers=0, num_heads=1, head_dim=8, bytes_per_param=2)


def test_sample_cost_counts_the_group_that_runs_each_step():
    setup = e2e.make_setup(e2e.parse_args(["--small"]))
    backbone = e2e.build_backbone_for(setup)
    latte = e2e.build_model(backbone, setup, "couple", "reference")
    vanilla = e2e.build_model(backbone, setup, "vanilla_couple", "reference")
    pre_f, pre_b, steps = e2e.sample_cost(latte, batch=3, prompt_len=11, steps=4)
    assert len(steps) == 4
    layers = sum(p.numel() for g in vanilla.groups for layer in g.layers for p in layer.parameters())
    assert pre_b > 0 and pre_f > 0
    _, _, vsteps = e2e.sample_cost(vanilla, batch=3, prompt_len=11, steps=4)
    # bytes per step: the group's weights + the shared timestep MLP (float32) + the context K/V it reads
    group = latte.groups[0]
    own = sum(p.numel() for p in group.parameters()) + sum(p.numel() for p in latte.time_embed.parameters())
    kv = len(group.layers) * 2 * (2 * 3) * 11 * 2 * 32 * 4  # M layers, K and V, 2B rows, 11 keys, 2 heads, D 32
    assert steps[0][1] == own * 4 + kv
    assert vsteps[0][1] > 3.5 * steps[0][1]  # 8 layers against 2 (plus the small per-group heads)
    assert layers * 4 < vsteps[0][1]


def test_dc_ae_config_has_f32c32_shape():
    cfg = e2e.dc_ae_config(small=False)
    assert cfg["latent_channels"] == 32
    assert 2 ** (len(cfg["decoder_block_out_channels"]) - 1) == 32  # 256x256 -> 8x8
    assert cfg["decoder_block_out_channels"] == (128, 256, 512, 512, 1024, 1024)


def test_plot_renders_e2e_rows(tmp_path):
    path = tmp_path / "gpu.csv"
    for provider, ms in (("vanilla_couple-eager-reference", 5000.0), ("latte-graphs-fused", 400.0)):
        for b in (1, 50):
            write_row(dict(op="e2e", provider=provider, mode="sample", shape=f"B={b},T=40", ms_p50=ms * b,
                           ms_p20=ms * b, ms_p80=ms * b), path=path)
    write_row(dict(op="e2e", provider="latte-roofline", mode="floor", shape="B=50,T=40", ms_p50=150.0,
                   ms_p20=150.0, ms_p80=150.0), path=path)
    plot.main([str(path)])
    png = tmp_path / "gpu_e2e.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot._batch("B=50,T=40") == 50  # plot_e2e divides a row's ms (the whole batch) by this
