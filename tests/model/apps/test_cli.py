"""``latteflow`` command line: end to end on tiny settings, one-line errors for bad input, resume after
a kill, progress bars."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from latteflow.apps.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _one_line_error(capsys, rc, *words):
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("latteflow: error:") and "Traceback" not in err
    assert "error: latteflow" not in lines[0] and "python -m benchmarks" not in lines[0]  # one prefix, our name
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
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(args + ["--steps", "3", "--resume"]) == 0
    (out / "resume_stdout.txt").write_text(printed.getvalue())
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
    printed = (trained / "resume_stdout.txt").read_text()
    assert "trained 1 step (now at step 3)" in printed and "trained 3" not in printed  # this run's steps
    assert manifest["trained_steps"] == 1


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
    (["sample", "--prompt", "digit 7", "--num", "0", "--out", "x.png"], ["--num", "positive"]),
    (["sample", "--prompt", "digit 7", "--num", "-3", "--out", "x.png"], ["--num", "positive", "-3"]),
    (["sample", "--prompt", "digit 7", "--num", "three", "--out", "x.png"], ["--num", "'three'"]),
    (["sample", "--prompt", "digit 7", "--out", "{tmp}"], ["--out", "is a directory"]),
    pytest.param(["sample", "--prompt", "digit 7", "--out", "/proc/g.png"], ["--out", "cannot write"],  # even as root
                 marks=pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")),
    (["sample", "--out", "{tmp}/g.png", "--checkpoint", "{tmp}/missing"], ["missing"]),
    (["sample", "--prompt", "digit 7", "--out", "{tmp}/g.png", "--steps", "0"], ["--steps", "positive"]),
    (["sample", "--prompt", "digit 7", "--out", "{tmp}/g.png", "--guidance", "inf"], ["--guidance", "finite"]),
    (["sample", "--prompt", "digit 7", "--out", "{tmp}/g.png", "--seed", "-1"], ["--seed", "non-negative"]),
    (["sample", "--prompt", "digit 7", "--bogus", "--out", "{tmp}/g.png"], ["--bogus"]),
    (["sample", "--prompt"], ["--prompt"]),
    (["train", "--data", "digits", "--out", "{tmp}/run", "--steps", "2", "--ema", "1.5"], ["--ema"]),
    (["train", "--data", "digits", "--steps", "2"], ["--out"]),
    (["train", "--data", "digits", "--out", "/nonexistent_latteflow_dir/run", "--steps", "2"], ["--out"]),
    (["eval", "--steps", "x"], ["--steps"]),
    (["eval", "--out", "{tmp}"], ["--out", "is a directory"]),
    (["bench", "--batch", "0"], ["--batch", "positive", "latteflow bench --help"]),
    (["bench", "--steps", "many"], ["--steps", "latteflow bench --help"]),
    (["bench", "--modes", "latte-warp-speed"], ["--modes", "latte-warp-speed"]),
    (["bench", "--frobnicate"], ["--frobnicate", "latteflow bench --help"]),
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


def _flip(path, at=None):
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at:at + 64] = bytes(b ^ 0x5A for b in data[at:at + 64])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt, words", [
    (lambda d: _flip(d / "model.safetensors"), ["model.safetensors", "SHA-256"]),
    (lambda d: _flip(d / "model.safetensors", at=0), ["model.safetensors", "SHA-256"]),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
     ["model.safetensors", "truncated"]),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x00garbage, not safetensors"), ["model.safetensors"]),
    (lambda d: (d / "model.safetensors").unlink(), ["model.safetensors", "missing"]),
    (lambda d: (d / "config.json").write_text("[1, 2]"), ["config.json", "list"]),
    (lambda d: (d / "config.json").write_text("{not json"), ["config.json", "JSON"]),
    (lambda d: (d / "config.json").write_text('{"format": 1}'), ["config.json", "latteflow"]),
    (lambda d: (d / "tokenizer.json").write_text("{}"), ["tokenizer.json"]),
    (lambda d: (d / "tokenizer.json").unlink(), ["tokenizer.json"]),
])
def test_corrupt_checkpoint_is_one_line_naming_the_file(trained, tmp_path, capsys, corrupt, words):
    bad = tmp_path / "bad"
    shutil.copytree(trained / "model", bad)
    corrupt(bad)
    rc = main(["sample", "--prompt", "digit 1", "--num", "1", "--steps", "1", "--out", str(tmp_path / "g.png"),
               "--checkpoint", str(bad)])
    line = _one_line_error(capsys, rc, *words)
    assert not (tmp_path / "g.png").exists(), line
    rc = main(["eval", "--checkpoint", str(bad), "--per-class", "2", "--steps", "1"])
    _one_line_error(capsys, rc, *words)


@pytest.mark.parametrize("prompt, words", [
    ("a cat", ["'a cat'", "not among"]), ("digit 12", ["'digit 12'", "not among"]), ("", ["''", "not among"]),
    ("seven", ["'seven'", "not among"]), ("digit 3 ", ["'digit 3 '", "not among"]),
    ("Digit 3", ["'D'", "does not know"]),
])
def test_a_prompt_outside_the_prompt_set_is_refused(prompt, words, tmp_path, capsys):
    rc = main(["sample", "--prompt", "digit 3", "--prompt", prompt, "--num", "1", "--steps", "1",
               "--out", str(tmp_path / "g.png")])
    _one_line_error(capsys, rc, *words, "'digit 0'", "'digit 9'")
    assert not (tmp_path / "g.png").exists()


def test_sample_without_prompt_draws_the_prompt_set(tmp_path, capsys):
    grid = tmp_path / "g.png"
    assert main(["sample", "--out", str(grid), "--num", "2", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "20 images" in out and "10 of the checkpoint's 10 prompts" in out
    assert Image.open(grid).size == (1 + 2 * 65, 1 + 10 * 65)  # one row per digit, --num per row


def test_out_is_checked_before_the_checkpoint_is_loaded(tmp_path, capsys, monkeypatch):
    import latteflow.pipeline

    def no_loading(*a, **k):
        raise AssertionError("loaded the checkpoint before checking --out")

    monkeypatch.setattr(latteflow.pipeline, "load_pipeline", no_loading)
    for out in (str(tmp_path), str(tmp_path / "dir.png")):
        os.makedirs(out, exist_ok=True)
        rc = main(["sample", "--prompt", "digit 3", "--out", out])
        _one_line_error(capsys, rc, "--out", "is a directory")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU: the CUDA-only modes leave nothing to run")
def test_bench_with_nothing_to_run_is_one_line(capsys):
    rc = main(["bench", "--modes", "latte-graphs-fused"])
    _one_line_error(capsys, rc, "leave no mode")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("args, bar", [
    (["sample", "--prompt", "digit 3", "--num", "2", "--steps", "3", "--out", "{tmp}/g.png"], "sampling"),
    (["eval", "--per-class", "2", "--steps", "3"], "sampling"),
    (["train", "--data", "digits", "--out", "{tmp}/run", "--steps", "2", "--eval-per-class", "0"], "train"),
])
def test_progress_bars_on_a_terminal_and_off_with_no_progress(args, bar, tmp_path, monkeypatch, capsys):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    for flags, shown in (([], True), (["--no-progress"], False)):
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        terminal = _Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        assert main(args + flags) == 0, terminal.getvalue()
        assert (f"{bar}:" in terminal.getvalue()) == shown, terminal.getvalue()
    capsys.readouterr()


_KILLED = textwrap.dedent("""
    import os, sys
    real = os.replace
    target = sys.argv[1]

    def replace(src, dst):  # dies like a SIGKILL just before one particular rename
        if os.path.basename(dst) == os.path.basename(target) and (not target.endswith("latest")
                                                                  or open(src).read().strip() == sys.argv[2]):
            os._exit(137)
        return real(src, dst)

    os.replace = replace
    from latteflow.apps.cli import main
    main(sys.argv[3:])
""")


@pytest.mark.parametrize("killed_at, resumed_from", [
    ("ema/step_00000004.safetensors", 2),  # the EMA of step 4 was being written: step 4 never happened
    ("latest", 4),                         # 'latest' was being replaced for step 4: step_4 is complete
])
def test_resume_after_a_kill(killed_at, resumed_from, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", "digits", "--out", str(out), "--checkpoint-every", "2", "--eval-per-class", "0",
            "--no-progress"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _KILLED, killed_at, "step_00000004", *args, "--steps", "4"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 137, r.stderr
    leftovers = [n for d in (out, out / "checkpoints", out / "checkpoints" / "ema") for n in os.listdir(d)
                 if n.startswith(".")]
    assert leftovers, "the kill should have left a temporary behind"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(args + ["--steps", "5", "--resume"]) == 0
    printed = printed.getvalue()
    assert f"resuming from {out / 'checkpoints' / f'step_{resumed_from:08d}'}" in printed, printed
    assert f"trained {5 - resumed_from} step{'s' if 5 - resumed_from != 1 else ''} (now at step 5)" in printed
    steps = [int(line.split(",")[0]) for line in open(out / "losses.csv")]
    assert steps == [1, 2, 3, 4, 5]  # each step once
    for d in (out, out / "checkpoints", out / "checkpoints" / "ema", out / "model"):
        assert not [n for n in os.listdir(d) if n.startswith(".")], os.listdir(d)
    ckpts = sorted(n for n in os.listdir(out / "checkpoints") if n.startswith("step_"))
    assert ckpts == ["step_00000004", "step_00000005"]
    assert sorted(os.listdir(out / "checkpoints" / "ema")) == [n + ".safetensors" for n in ckpts]


def test_resume_keeps_the_run_settings(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    args = ["train", "--data", "digits", "--out", str(run), "--seed", "1", "--resume", "--checkpoint-every", "1",
            "--eval-per-class", "0", "--no-progress"]
    for flag, value in (("--seed", "2"), ("--batch-size", "8"), ("--lr", "0.01"), ("--groups", "2")):
        _one_line_error(capsys, main(args + ["--steps", "4", flag, value]), flag)
    _one_line_error(capsys, main(args + ["--steps", "2"]), "steps=2", "step 3")  # below the step it reached
    assert main(args + ["--steps", "4"]) == 0  # the same settings resume
    assert "trained 1 step (now at step 4)" in capsys.readouterr().out
    assert main(args + ["--steps", "4"]) == 0  # nothing left to train: the model is exported again
    out = capsys.readouterr().out
    assert "trained 0 steps (now at step 4)" in out and "final loss none" not in out


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
    assert r.stderr == ""  # no warning (transformers' past_key_values deprecation), no bar off a terminal
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


def test_sample_distributed_refuses_prompts_outside_the_set(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("digit 3\na cat\n")
    rc = main(["sample", "--distributed", "--checkpoint", "digits", "--out", str(tmp_path / "ddp"), "--prompts",
               str(prompts), "--num-samples", "2", "--steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "'a cat'" in err and "'digit 0'" in err, err
    assert not (tmp_path / "ddp").exists()
