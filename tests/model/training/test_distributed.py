"""Distributed sampling and training on CPU with gloo: 2 ranks give what 1 rank gives.

One 2-process job (``dist_helpers.run_two_ranks``, module-scoped) samples, trains couple with DDP and
blend with FSDP2, and writes checkpoints; the tests compare each result with a 1-process run."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import dist_helpers as dh
from latteflow.core.checkpoint import load_state, save_checkpoint
from latteflow.distributed import DistEnv, derive_seed
from latteflow.evaluation.sample_ddp import PromptContexts, class_balanced, sample_indices, sample_to_dir, shard_indices
from latteflow.training.loop import latest_checkpoint
from latteflow.training.ddp import (fsdp_available, global_batch_indices, main as train_main, rank_slice,
                                 train_distributed)

ONE = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("two_ranks"))
    dh.run_two_ranks(out)
    return out


def _assert_params_close(a, b, atol=2e-5):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=atol, msg=n)


# ------------------------------------------------------------------------------------------------
# sampling
def test_shards_and_seeds_do_not_depend_on_world_size():
    assert sorted(shard_indices(10, 0, 3) + shard_indices(10, 1, 3) + shard_indices(10, 2, 3)) == list(range(10))
    assert derive_seed(3, 7) == derive_seed(3, 7) != derive_seed(3, 8)
    assert class_balanced(10, per_class=5) == 50 and class_balanced(3, num_samples=7) == 7
    with pytest.raises(ValueError, match="per_class"):
        class_balanced(10, per_class=0)
    with pytest.raises(ValueError, match="exactly one"):
        class_balanced(10, per_class=2, num_samples=3)


def test_latents_do_not_depend_on_batching():
    model, tok = dh.make_model(), dh.tokenizer()
    contexts = PromptContexts(model, tok, dh.PROMPTS)
    kw = dict(seed=4, steps=3, guidance=3.0)
    whole = sample_indices(model, contexts, list(range(7)), batch_size=7, **kw)
    even = sample_indices(model, contexts, [0, 2, 4, 6], batch_size=3, **kw)
    odd = sample_indices(model, contexts, [1, 3, 5], batch_size=1, **kw)
    torch.testing.assert_close(whole[0::2], even, rtol=0, atol=1e-5)
    torch.testing.assert_close(whole[1::2], odd, rtol=0, atol=1e-5)
    other_seed = sample_indices(model, contexts, [0, 1], batch_size=2, seed=5, steps=3, guidance=3.0)
    assert (other_seed - whole[:2]).abs().max() > 0.1


def test_two_rank_images_equal_one_rank(two_ranks, tmp_path):
    run = sample_to_dir(dh.make_model(), dh.tokenizer(), dh.PROMPTS, str(tmp_path), batch_size=4, env=ONE,
                        **dh.SAMPLE_KW)
    one = np.load(run.npz)
    two = np.load(os.path.join(two_ranks, "samples", os.path.basename(run.npz)))
    assert one["arr_0"].shape == (9, 4, 4, 3) and one["arr_0"].dtype == np.uint8
    assert (one["arr_0"][..., 0] == one["arr_0"][..., 2]).all()  # grey replicated to RGB
    assert one["arr_1"].tolist() == [i % 3 for i in range(9)]
    assert np.array_equal(one["arr_1"], two["arr_1"])
    diff = np.abs(one["arr_0"].astype(int) - two["arr_0"].astype(int))
    # the same images; float rounding of differently sized batched matmuls may flip a pixel by one level
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, diff.max()
    assert len(os.listdir(os.path.join(two_ranks, "samples", "images"))) == 9
    assert one["arr_0"].std() > 10  # not a blank or constant set


# ------------------------------------------------------------------------------------------------
# training
def test_global_batches_split_over_ranks():
    g = global_batch_indices(5, 22, 8, data_seed=1)
    assert g.shape == (8,) and torch.equal(g, global_batch_indices(5, 22, 8, data_seed=1))
    assert torch.cat([g[rank_slice(8, r, 4)] for r in range(4)]).tolist() == g.tolist()
    assert sorted(torch.cat([global_batch_indices(s, 22, 11, 1) for s in (0, 1)]).tolist()) == list(range(22))
    with pytest.raises(ValueError, match="global_batch_size"):
        rank_slice(6, 0, 4)


def _train_one_rank(variant, steps, **kw):
    model = dh.make_model(variant)
    run = train_distributed(model, dh.make_data(), steps=steps, env=ONE, **dh.TRAIN_KW, **kw)
    return model, run


def test_ddp_two_ranks_equal_one_rank(two_ranks):
    model, run = _train_one_rank("couple", 3)
    before = dh.params_of(dh.make_model())
    two = torch.load(os.path.join(two_ranks, "ddp_params.pt"))
    _assert_params_close(dh.params_of(model), two)
    moved = [n for n, p in model.groups.named_parameters() if not torch.equal(p, before["groups." + n])]
    assert moved  # training changed the generation path
    for n, p in model.backbone.named_parameters():
        assert torch.equal(p, before["backbone." + n]), n  # frozen backbone untouched


def test_two_rank_checkpoint_resumes_on_one_rank(two_ranks, tmp_path):
    ck = str(tmp_path / "ck")
    shutil.copytree(os.path.join(two_ranks, "ddp"), ck)
    assert latest_checkpoint(ck).endswith("step_00000003")
    model = dh.make_model()
    run = train_distributed(model, dh.make_data(), steps=3, resume=os.path.join(ck, "step_00000002"), env=ONE,
                            **dh.TRAIN_KW)
    assert run.step == 3 and len(run.losses) == 1
    _assert_params_close(dh.params_of(model), torch.load(os.path.join(two_ranks, "ddp_params.pt")))
    with pytest.raises(ValueError, match="seed"):
        train_distributed(dh.make_model(), dh.make_data(), steps=4, resume=os.path.join(ck, "step_00000002"),
                          env=ONE, **dict(dh.TRAIN_KW, seed=6))


@pytest.mark.skipif(not fsdp_available(), reason="torch.distributed.fsdp.fully_shard (FSDP2) missing")
def test_fsdp2_blend_equals_one_rank_and_saves_full_state(two_ranks):
    model, run = _train_one_rank("blend", 2)
    two_losses = torch.load(os.path.join(two_ranks, "fsdp_losses.pt"))
    np.testing.assert_allclose(run.losses, two_losses, rtol=0, atol=1e-5)
    saved = dh.make_model("blend")
    load_state(saved, os.path.join(two_ranks, "fsdp", "step_00000002"))  # full, unsharded weights
    _assert_params_close(dh.params_of(saved), dh.params_of(model))
    # and it resumes on 1 rank exactly like an uninterrupted 1-rank run
    resumed = dh.make_model("blend")
    train_distributed(resumed, dh.make_data(), steps=3, resume=os.path.join(two_ranks, "fsdp", "step_00000002"),
                      env=ONE, **dh.TRAIN_KW)
    straight, _ = _train_one_rank("blend", 3)
    _assert_params_close(dh.params_of(resumed), dh.params_of(straight))


def test_training_rejects_bad_input():
    with pytest.raises(ValueError, match="fsdp"):
        train_distributed(dh.make_model(), dh.make_data(), steps=1, global_batch_size=4, fsdp=True, env=ONE)
    with pytest.raises(ValueError, match="global_batch_size"):
        train_distributed(dh.make_model(), dh.make_data(), steps=1, global_batch_size=0, env=ONE)
    with pytest.raises(ValueError, match="checkpoint_every"):
        train_distributed(dh.make_model(), dh.make_data(), steps=1, global_batch_size=2, checkpoint_every=1, env=ONE)


# ------------------------------------------------------------------------------------------------
# command lines
def _tiny_checkpoint(path):
    return save_checkpoint(dh.make_model(), str(path), include_backbone=True,
                           metadata={"tokenizer": dh.tokenizer().to_dict()})


def test_sample_cli_under_torchrun_matches_the_library(two_ranks, tmp_path):
    ck = _tiny_checkpoint(tmp_path / "ck")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(dh.free_port()), "-m", "latteflow.evaluation.sample_ddp", "--checkpoint", ck, "--out", str(out),
           "--per-class", "3", "--seed", "11", "--steps", "4", "--guidance", "3", "--batch-size", "3",
           "--backend", "reference", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=dh.TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "s/img" in proc.stdout and proc.stdout.count("sampled 9 images on 2 rank(s)") == 1
    cli = np.load(out / "samples_9x4x4x3.npz")["arr_0"].astype(int)
    lib = np.load(os.path.join(two_ranks, "samples", "samples_9x4x4x3.npz"))["arr_0"].astype(int)
    assert np.abs(cli - lib).max() <= 1


def test_train_cli_then_sample_cli_one_process(tmp_path, capsys):
    from latteflow.evaluation.sample_ddp import main as sample_main

    ck = tmp_path / "ck"
    argv = ["--out", str(ck), "--steps", "2", "--global-batch-size", "4", "--checkpoint-every", "2", "--hidden", "32",
            "--layers", "2", "--heads", "2", "--kv-heads", "1", "--mlp", "32", "--num-groups", "2",
            "--backend", "reference", "--device", "cpu"]
    assert train_main(argv) == 0
    assert "trained to step 2 on 1 rank(s)" in capsys.readouterr().out
    assert train_main(argv) == 0  # resumes at the end: nothing to train
    assert "nothing to train" in capsys.readouterr().out
    out = tmp_path / "samples"
    assert sample_main(["--checkpoint", latest_checkpoint(str(ck)), "--out", str(out), "--num-samples", "4",
                        "--steps", "2", "--device", "cpu"]) == 0
    arr = np.load(out / "samples_4x8x8x3.npz")["arr_0"]
    assert arr.shape == (4, 8, 8, 3) and (out / "grid.png").is_file()


def test_cli_misuse_gives_one_error_line(tmp_path, capsys):
    from latteflow.evaluation.sample_ddp import main as sample_main

    with pytest.raises(SystemExit) as e:
        sample_main(["--checkpoint", "digits"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err
    assert sample_main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err
    ck = _tiny_checkpoint(tmp_path / "ck")
    assert sample_main(["--checkpoint", ck, "--out", str(tmp_path / "o"), "--prompts", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert train_main(["--out", str(tmp_path / "t"), "--steps", "1", "--global-batch-size", "3", "--variant", "couple",
                       "--fsdp", "--device", "cpu"]) == 2
    assert "fsdp" in capsys.readouterr().err


def test_digits_checkpoint_needs_the_pipeline(tmp_path, capsys):
    try:
        import latteflow.pipeline  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("latteflow.pipeline is installed: 'digits' resolves through it")
    from latteflow.evaluation.sample_ddp import main as sample_main

    assert sample_main(["--checkpoint", "digits", "--out", str(tmp_path)]) == 2
    assert "latteflow.pipeline" in capsys.readouterr().err
