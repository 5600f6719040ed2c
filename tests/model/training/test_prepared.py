"""The real-scale path at toy size, offline, on CPU (SPEC 3.2): train on a prepare folder with a
save_pretrained Qwen2-VL, resume, sample RGB through the recorded DC-AE, refuse a changed backbone."""
import os
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from latteflow.apps.cli import main  # noqa: E402

TRAIN = ["--batch-size", "4", "--micro-batch-size", "2", "--checkpoint-every", "1", "--lr", "1e-3",
         "--groups", "2", "--no-progress", "--device", "cpu", "--seed", "3"]


def _train(data, backbone, out, steps, *extra):
    return main(["train", "--data", data, "--backbone", backbone, "--out", str(out), "--steps", str(steps),
                 *TRAIN, *extra])


@pytest.fixture(scope="module")
def run(toy_prepared, toy_qwen2vl_folder, tmp_path_factory):
    data, _ = toy_prepared
    out = tmp_path_factory.mktemp("run")
    assert _train(data, toy_qwen2vl_folder, out, 2) == 0
    assert _train(data, toy_qwen2vl_folder, out, 3, "--resume") == 0
    return out


def test_resumed_training_equals_an_uninterrupted_run(run, toy_prepared, toy_qwen2vl_folder, tmp_path):
    from safetensors.torch import load_file

    data, _ = toy_prepared
    assert _train(data, toy_qwen2vl_folder, tmp_path / "straight", 3) == 0
    a = load_file(os.path.join(run, "model", "model.safetensors"))
    b = load_file(os.path.join(tmp_path / "straight", "model", "model.safetensors"))
    assert set(a) == set(b) and not any(k.startswith("backbone.") for k in a)  # couple: trainable weights only
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_checkpoint_records_backbone_vae_and_classes(run, toy_prepared, toy_qwen2vl_folder):
    from latteflow.core.checkpoint import read_config
    from latteflow.core.files import weights_sha256

    data, vae = toy_prepared
    cfg = read_config(os.path.join(run, "model"))
    meta = cfg["metadata"]
    assert meta["backbone"] == {"folder": os.path.abspath(toy_qwen2vl_folder),
                                "sha256": weights_sha256(toy_qwen2vl_folder)["sha256"]}
    assert meta["vae"]["folder"] == os.path.abspath(vae) and meta["resolution"] == 16
    assert cfg["latteflow"]["extra"]["prompts"] == ["tench", "goldfish", "great white shark"]
    assert cfg["latteflow"]["latent_channels"] == 4 and cfg["latteflow"]["grid_hw"] == [4, 4]
    assert cfg["includes_backbone"] is False


def test_load_pipeline_gives_seeded_uint8_rgb_of_the_prepared_resolution(run):
    from latteflow import load_pipeline

    pipe = load_pipeline(str(run), device="cpu")
    a = pipe(["tench", "goldfish"], steps=3, seed=7)
    b = pipe(["tench", "goldfish"], steps=3, seed=7)
    c = pipe(["tench", "goldfish"], steps=3, seed=8)
    assert a.dtype == np.uint8 and a.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="tench"):
        pipe(["a zebra"], steps=2)


def test_every_step_checkpoint_opens_with_load_pipeline(run):
    from latteflow import load_pipeline
    from latteflow.core.checkpoint import read_config
    from latteflow.training.loop import checkpoint_steps

    steps = checkpoint_steps(os.path.join(run, "checkpoints"))
    assert [k for k, _ in steps] == [2, 3]  # --checkpoint-every 1, two kept; step 2 from before the resume
    model_meta = read_config(os.path.join(run, "model"))["metadata"]
    for _, path in steps:
        meta = read_config(path)["metadata"]
        for key in ("backbone", "vae", "tokenizer", "autoencoder", "resolution", "classes"):
            assert meta[key] == model_meta[key], key
        assert "ema" in meta  # the trainer's own entry stays
        pipe = load_pipeline(path, device="cpu")
        images = pipe(["goldfish"], steps=2, seed=1)
        assert images.dtype == np.uint8 and images.shape == (1, 16, 16, 3)


def test_sample_command_writes_a_grid_without_prompts(run, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(run), "--num", "2", "--steps", "2", "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    assert "3 of the checkpoint's 3 prompts" in capsys.readouterr().out
    assert Image.open(out).mode == "RGB"


def test_a_backbone_with_other_weights_is_refused(run, toy_qwen2vl_folder, tmp_path):
    import toy_backbone
    from latteflow import load_pipeline

    other = toy_backbone.write_toy_qwen2vl(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match=str(other)):
        load_pipeline(str(run), device="cpu", backbone=str(other))
    same = tmp_path / "copy"
    shutil.copytree(toy_qwen2vl_folder, same)  # another folder with the same weights is fine
    assert load_pipeline(str(run), device="cpu", backbone=str(same)).prompts[0] == "tench"


def test_bench_checkpoint_times_the_pipeline(run, capsys):
    from latteflow import load_pipeline
    from latteflow.evaluation.checkpoint_speed import time_pipeline

    r = time_pipeline(load_pipeline(str(run), device="cpu"), batch=2, steps=2, repeats=1)
    assert r["batch"] == 2 and r["s_per_img"] > 0 and r["decode_s_per_img"] > 0
    assert main(["bench", "--checkpoint", str(run), "--batch", "2", "--steps", "2", "--repeats", "1",
                 "--device", "cpu"]) == 0
    assert "s/img at batch 2" in capsys.readouterr().out


def test_recipe_imagenet256_prints_and_applies_the_paper_settings(toy_prepared, toy_qwen2vl_folder, tmp_path,
                                                                 capsys):
    data, _ = toy_prepared
    # explicit --steps / --batch-size win over the recipe; lr 5e-4 and the EMA come from it
    assert main(["train", "--data", data, "--backbone", toy_qwen2vl_folder, "--out", str(tmp_path / "r"),
                 "--recipe", "imagenet256", "--steps", "1", "--batch-size", "2", "--groups", "2",
                 "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "global_batch_size 2048" in out and "lr 0.0005" in out and "steps 240000" in out
    import json
    run_json = json.load(open(tmp_path / "r" / "run.json"))
    assert run_json["lr"] == 5e-4 and run_json["ema_decay"] == 0.9999 and run_json["global_batch_size"] == 2


def test_grad_checkpointing_keeps_the_loss_and_gradients(toy_prepared, toy_qwen2vl_folder):
    from latteflow.data.shards import load_manifest
    from latteflow.training.prepared import build_prepared_model, enable_grad_checkpointing

    data, _ = toy_prepared
    grads = []
    for wrap in (False, True):
        model, tok, _ = build_prepared_model(load_manifest(data), toy_qwen2vl_folder, num_groups=2,
                                             backend="reference")
        with torch.no_grad():  # non-zero heads so every layer's gradient is non-zero
            for g in model.groups:
                g.proj_out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        if wrap:
            assert enable_grad_checkpointing(model) == 4
        ctx = model.build_context(*tok.encode(["tench", "goldfish"]))
        x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        loss = model.training_loss(x, ctx, None, generator=torch.Generator().manual_seed(2))
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert grads[0][1].keys() == grads[1][1].keys() and len(grads[0][1]) > 0
    for n in grads[0][1]:
        torch.testing.assert_close(grads[0][1][n], grads[1][1][n])


def test_resume_with_a_backbone_of_other_weights_is_refused(run, toy_prepared, tmp_path, capsys):
    import toy_backbone

    data, _ = toy_prepared
    other = toy_backbone.write_toy_qwen2vl(tmp_path / "other", seed=2)
    assert _train(data, other, run, 4, "--resume") == 2
    err = capsys.readouterr().err
    assert str(other) in err and "SHA-256" in err


def test_train_on_a_prepare_folder_needs_a_backbone(toy_prepared, tmp_path, capsys):
    data, _ = toy_prepared
    assert main(["train", "--data", data, "--out", str(tmp_path / "x"), "--steps", "1"]) == 2
    assert "--backbone" in capsys.readouterr().err
