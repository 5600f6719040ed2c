"""``latteflow`` command line: end to end on tiny settings, and one-line errors for bad input."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from latteflow.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _one_line_error(capsys, rc, *words):
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("latteflow: error:") and "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step digits run with checkpoints every step, resumed to 3 steps."""
    out = tmp_path_factory.mktemp("train") / "run"
    args = ["train", "--data", "digits", "--out", str(out), "--seed", "1", "--checkpoint-every", "1",
            "--eval-per-class", "2", "--eval-steps", "2", "--no-progress"]
    assert main(args + ["--steps", "2"]) == 0
    assert main(args + ["--steps", "3", "--resume"]) == 0
    return out


def test_train_writes_model_manifest_and_resumes(trained, capsys):
    manifest = json.load(open(trained / "model" / "MANIFEST.json"))
    assert manifest["steps"] == 3 and manifest["resumed_from_step"] == 2 and manifest["seed"] == 1
    assert manifest["command"].startswith("latteflow train --data digits")
    assert 0.0 <= manifest["eval"]["accuracy"] <= 1.0 and manifest["eval"]["num_samples"] == 20
    losses = [line.split(",") for line in open(trained / "losses.csv").read().split()]
    assert [int(s) for s, _ in losses] == [1, 2, 3]
    assert sorted(os.listdir(trained / "checkpoints" / "ema")) == [
        f"step_{k:08d}.safetensors" for k in (2, 3)]  # kept beside the two newest checkpoints


def test_train_refuses_to_overwrite_without_resume(trained, capsys):
    rc = main(["train", "--data", "digits", "--out", str(trained), "--steps", "2", "--no-progress"])
    _one_line_error(capsys, rc, "resume")


def test_sample_and_eval(trained, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    assert main(["sample", "--prompt", "digit 7", "--prompt", "digit 1", "--num", "2", "--out", str(grid),
                 "--steps", "2", "--checkpoint", str(trained)]) == 0
    out = capsys.readouterr().out
    assert "s/img" in out and "4 images" in out
    w, h = Image.open(grid).size
    assert (w, h) == (1 + 2 * 65, 1 + 2 * 65)  # 2 per row, 8x8 scaled 8 times, 1 px frames
    assert main(["eval", "--checkpoint", str(trained), "--per-class", "2", "--steps", "2",
                 "--out", str(tmp_path / "eval.png")]) == 0
    out = capsys.readouterr().out
    assert "conditional accuracy" in out and "Frechet distance" in out and "spread" in out
    assert (tmp_path / "eval.png").is_file()


@pytest.mark.parametrize("args, words", [
    (["sample", "--prompt", "digit 7", "--num", "0", "--out", "x.png"], ["--num"]),
    (["sample", "--prompt", "digit 7", "--out", "/nonexistent_latteflow_dir/grid.png"], ["--out", "does not exist"]),
    (["sample", "--prompt", "digit 7", "--out", "grid.jpg"], ["--out", ".png"]),
    (["sample", "--prompt", "digit Ω", "--num", "1", "--steps", "1", "--out", "{tmp}/g.png"], ["'Ω'"]),
    (["sample", "--prompt", "digit 7", "--out", "{tmp}/g.png", "--checkpoint", "{tmp}/missing"], ["missing"]),
    (["train", "--data", "digits", "--out", "{tmp}/run", "--steps", "0"], ["--steps"]),
    (["train", "--data", "cifar", "--out", "{tmp}/run", "--steps", "1"], ["--data"]),
    (["eval", "--per-class", "-3"], ["--per-class"]),
    (["eval", "--device", "toaster"], ["device", "toaster"]),
    (["frobnicate"], ["frobnicate"]),
])
def test_bad_arguments_give_one_line(args, words, tmp_path, capsys):
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in args])
    _one_line_error(capsys, rc, *words)


def test_corrupt_checkpoint(trained, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(trained / "model", bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage, not safetensors")
    rc = main(["sample", "--prompt", "digit 1", "--num", "1", "--steps", "1", "--out", str(tmp_path / "g.png"),
               "--checkpoint", str(bad)])
    _one_line_error(capsys, rc)
    (bad / "config.json").write_text("{not json")
    rc = main(["eval", "--checkpoint", str(bad), "--per-class", "2", "--steps", "1"])
    _one_line_error(capsys, rc)


def test_bench_missing_module_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "benchmarks.e2e", None)  # import of it raises ImportError
    rc = main(["bench", "--batch", "1"])
    _one_line_error(capsys, rc, "benchmarks.e2e")


def test_debug_env_reraises(monkeypatch):
    monkeypatch.setenv("LATTEFLOW_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["sample", "--prompt", "digit 7", "--out", "/nonexistent_latteflow_dir/grid.png"])


def test_python_dash_m(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    grid = tmp_path / "g.png"
    r = subprocess.run([sys.executable, "-m", "latteflow", "sample", "--prompt", "digit 3", "--num", "2",
                        "--steps", "2", "--out", str(grid)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "s/img" in r.stdout and grid.is_file()
    r = subprocess.run([sys.executable, "-m", "latteflow", "sample", "--prompt", "digit 3", "--num", "0",
                        "--out", str(grid)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_sample_distributed_delegates_to_sample_ddp(tmp_path, capsys):
    """``latteflow sample --distributed`` (one process, no torchrun) writes PNGs and the ADM npz."""
    import numpy as np

    rc = main(["sample", "--distributed", "--checkpoint", "digits", "--out", str(tmp_path / "ddp"), "--num-samples", "3",
               "--steps", "3", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert "sampled 3 images on 1 rank(s)" in capsys.readouterr().out
    with np.load(tmp_path / "ddp" / "samples_3x8x8x3.npz") as f:
        assert f["arr_0"].shape == (3, 8, 8, 3) and f["arr_0"].dtype == np.uint8


def test_eval_fid_delegates_and_names_what_is_missing(tmp_path, capsys):
    rc = main(["eval", "--fid", "--samples", str(tmp_path / "none.npz"), "--inception-weights", str(tmp_path / "w.pth"),
               "--reference", str(tmp_path / "ref.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().startswith("latteflow eval --fid: error:") and len(err.strip().splitlines()) == 1
