"""A 2-rank gloo run of ``train --distributed`` and ``sample --distributed`` on a prepare folder with a
save_pretrained Qwen2-VL (SPEC 3.2): the run's checkpoint samples the same images on 1 rank and on 2."""
import os

import numpy as np
import pytest

pytest.importorskip("diffusers")


def test_two_rank_train_and_sample_on_prepared_latents(toy_prepared, toy_qwen2vl_folder, tmp_path):
    import dist_helpers as dh
    import toy_backbone
    from latteflow.core.checkpoint import read_config
    from latteflow.evaluation import sample_ddp

    data, _ = toy_prepared
    dh.run_two_ranks(str(tmp_path), toy_backbone.prepared_job, (data, toy_qwen2vl_folder))
    ckpt = tmp_path / "ddp" / "step_00000002"
    cfg = read_config(str(ckpt))
    assert cfg["includes_backbone"] is False and cfg["metadata"]["backbone"]["folder"] == toy_qwen2vl_folder
    two = np.load(tmp_path / "samples" / "samples_3x16x16x3.npz")["arr_0"]
    assert two.dtype == np.uint8 and two.shape == (3, 16, 16, 3)  # one per class, RGB at the prepared size
    one_dir = tmp_path / "one"
    assert sample_ddp.main(["--checkpoint", str(ckpt), "--out", str(one_dir), "--per-class", "1", "--steps", "2",
                            "--seed", "4", "--batch-size", "3", "--device", "cpu"]) == 0
    np.testing.assert_array_equal(np.load(one_dir / "samples_3x16x16x3.npz")["arr_0"], two)


def test_micro_batches_accumulate_to_the_same_step():
    import torch

    import dist_helpers as dh
    from latteflow.distributed import DistEnv
    from latteflow.training.ddp import train_distributed

    one = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    params, losses = [], []
    for micro in (None, 1, 3):
        model = dh.make_model()
        run = train_distributed(model, dh.make_data(), steps=2, env=one, micro_batch_size=micro, **dh.TRAIN_KW)
        params.append(dh.params_of(model))
        losses.append(run.losses)
    for p, l in zip(params[1:], losses[1:]):
        torch.testing.assert_close(l, losses[0], rtol=1e-5, atol=1e-6)
        for n in params[0]:
            torch.testing.assert_close(p[n], params[0][n], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="micro_batch_size"):
        train_distributed(dh.make_model(), dh.make_data(), steps=1, env=one, micro_batch_size=0, **dh.TRAIN_KW)


def test_two_rank_ema_is_saved_beside_each_checkpoint_and_resumes(tmp_path):
    import torch

    import dist_helpers as dh
    from latteflow.core.checkpoint import file_digest, read_config
    from latteflow.distributed import DistEnv
    from latteflow.training.ddp import train_distributed
    from latteflow.training.loop import EMA

    dh.run_two_ranks(str(tmp_path), dh.ema_job)
    ck = tmp_path / "ema"
    assert sorted(os.listdir(ck / "ema")) == ["step_00000002.safetensors", "step_00000003.safetensors"]  # pruned
    assert (read_config(str(ck / "step_00000003"))["metadata"]["ema"]
            == file_digest(str(ck / "ema" / "step_00000003.safetensors")))
    resumed = torch.load(tmp_path / "ema_shadow.pt")
    # one process, uninterrupted: the same EMA (DDP's reduced gradients up to rounding)
    one = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model = dh.make_model()
    ema = EMA(model, dh.EMA_DECAY)
    train_distributed(model, dh.make_data(), steps=3, env=one, ema=ema, **dh.TRAIN_KW)
    assert resumed.keys() == ema.shadow.keys()
    for n in resumed:
        torch.testing.assert_close(resumed[n], ema.shadow[n], rtol=1e-4, atol=1e-6)
    weights = dict(model.named_parameters())
    assert any(not torch.allclose(ema.shadow[n], weights[n]) for n in ema.names)  # an average, not a copy
    with pytest.raises(ValueError, match="ema decay"):  # a resume keeps the decay
        train_distributed(dh.make_model(), dh.make_data(), steps=4, env=one, checkpoint_dir=str(ck),
                          checkpoint_every=1, ema=EMA(dh.make_model(), 0.5), **dh.TRAIN_KW)
    with pytest.raises(TypeError, match="ema"):
        train_distributed(dh.make_model(), dh.make_data(), steps=1, env=one, ema=0.9, **dh.TRAIN_KW)


def test_distributed_recipe_imagenet256_prints_applies_and_exports_the_ema(toy_prepared, toy_qwen2vl_folder,
                                                                          tmp_path, capsys):
    import torch

    from latteflow import load_pipeline
    from latteflow.core.checkpoint import load_trainer_state, read_config
    from latteflow.training import ddp

    data, _ = toy_prepared
    out = tmp_path / "r"
    # explicit --steps / --global-batch-size / --num-groups win; lr, EMA, weight decay come from the recipe
    assert ddp.main(["--data", data, "--backbone", toy_qwen2vl_folder, "--out", str(out), "--recipe", "imagenet256",
                     "--steps", "1", "--global-batch-size", "2", "--num-groups", "2", "--checkpoint-every", "1",
                     "--backend", "reference", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "recipe imagenet256" in printed and "lr 0.0005" in printed and "global_batch_size 2" in printed
    state = load_trainer_state(str(out / "step_00000001"), map_location="cpu")
    group = state["optimizer"]["param_groups"][0]
    assert group["lr"] == 5e-4 and group["weight_decay"] == 0.0 and state["ema_decay"] == 0.9999
    assert state["global_batch_size"] == 2
    assert read_config(str(out / "model"))["metadata"]["steps"] == 1 and "EMA weights" in printed
    images = load_pipeline(str(out / "model"), device="cpu")(["tench"], steps=2, seed=0)
    assert images.shape == (1, 16, 16, 3)
    assert ddp.main(["--out", str(tmp_path / "d"), "--steps", "1", "--recipe", "imagenet256", "--device", "cpu"]) == 2
    assert "prepare folder" in capsys.readouterr().err
