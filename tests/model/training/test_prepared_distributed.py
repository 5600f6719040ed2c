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
