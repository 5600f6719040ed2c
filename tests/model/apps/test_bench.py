"""``latteflow bench``: the s/img measurement runs from latteflow alone, with the flags of benchmarks.e2e."""
import csv
import math
import sys

import pytest
import torch

from latteflow.apps import bench
from latteflow.apps.cli import main

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: CUDA runs the paper configuration")

ARGS = ["--small", "--batch", "1", "--steps", "1", "--repeats", "1", "--no-decode"]


def test_bench_runs_without_the_benchmarks_package(tmp_path, monkeypatch, capsys):
    for name in ("benchmarks", "benchmarks.e2e", "benchmarks.common"):
        monkeypatch.setitem(sys.modules, name, None)  # any import of them raises ImportError
    out = tmp_path / "speed.csv"
    assert main(["bench", *ARGS, "--modes", "latte-eager-reference", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "latte-eager-reference" in printed and "s/img p50" in printed
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["mode"] for r in rows] == ["latte-eager-reference"]
    assert list(rows[0]) == bench.CSV_COLUMNS
    r = rows[0]
    assert r["batch"] == "1" and r["steps"] == "1" and r["device"] == "cpu" and r["compile_s"] == ""
    assert 0 < float(r["s_per_img_p20"]) <= float(r["s_per_img_p50"]) <= float(r["s_per_img_p80"])


def test_speedup_is_over_the_vanilla_baseline_of_the_same_batch(capsys):
    results = bench.main([*ARGS, "--modes", "vanilla_couple-eager-reference", "latte-eager-fused"])
    base, latte = results
    assert base["mode"] == "vanilla_couple-eager-reference" and latte["mode"] == "latte-eager-fused"
    assert math.isclose(latte["speedup_vs_vanilla"], base["s_per_img"] / latte["s_per_img"])
    assert "speedup over vanilla_couple-eager-reference at B=1: latte-eager-fused x" in capsys.readouterr().out


def test_profile_goes_beside_out(tmp_path):
    out = tmp_path / "speed.csv"
    bench.main([*ARGS, "--modes", "latte-eager-reference", "--out", str(out), "--profile"])
    assert "=== latte-eager-reference B=1,T=1 ===" in (tmp_path / "bench_profile.txt").read_text()


def test_the_flags_are_those_of_benchmarks_e2e():
    e2e = pytest.importorskip("benchmarks.e2e")

    def flags(parser):
        return sorted(o for a in parser._actions for o in a.option_strings)

    assert flags(bench.build_parser()) == flags(e2e.build_parser())
