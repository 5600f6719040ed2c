"""train(): the loss falls, the couple backbone stays frozen, checkpoints resume exactly, and a run
cleans up after a killed one."""
import os

import pytest
import torch

from latteflow.core.checkpoint import load_state
from latteflow.training.loop import EMA, LATEST, latest_checkpoint, train


def _data(tiny, model, n_batches=2, batch=4, seed=0):
    """A callable step -> (x_data, ctx, null_ctx) cycling over fixed batches."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = tiny.prompts([5, 3, 4, 6], seed=seed)
    ctx = model.build_context(ids, mask)
    null = model.build_context(torch.tensor([[1, 2]]))
    xs = [torch.randn(batch, 4, 4, 4, generator=g) * 0.5 + 0.3 for _ in range(n_batches)]
    return lambda step: (xs[step % n_batches], ctx, null)


def _eval_loss(model, batch):
    x, ctx, null = batch
    with torch.no_grad():
        return float(model.training_loss(x, ctx, null, generator=torch.Generator().manual_seed(123)))


def test_loss_falls_and_couple_backbone_stays_frozen(tiny):
    model = tiny.make_model(num_groups=2, num_layers=2, randomize=False)
    data = _data(tiny, model, n_batches=1)
    frozen = tiny.params_of(model.backbone)
    trained_before = tiny.params_of(model.groups)
    before = _eval_loss(model, data(0))
    result = train(model, data, steps=40, lr=3e-3, progress=False)
    after = _eval_loss(model, data(0))
    assert result.step == 40 and len(result.losses) == 40
    assert after < 0.75 * before, (before, after)  # 1.26 -> 0.74 here
    for n, p in model.backbone.named_parameters():
        assert torch.equal(p, frozen[n]), n
        assert p.grad is None
    assert not model.backbone.training
    changed = [n for n, p in model.groups.named_parameters() if not torch.equal(p, trained_before[n])]
    assert len(changed) == len(trained_before)  # every generation parameter (gates, heads too) moved


def test_exact_resume(tiny, tmp_path):
    def fresh():
        m = tiny.make_model(num_groups=2, num_layers=2, randomize=False)
        return m, _data(tiny, m)

    kw = dict(lr=1e-3, progress=False, seed=5)
    full, data = fresh()
    r_full = train(full, data, steps=5, **kw)

    part, data = fresh()
    ckdir = str(tmp_path / "ck")
    r1 = train(part, data, steps=2, checkpoint_dir=ckdir, checkpoint_every=2, **kw)
    assert r1.checkpoint == latest_checkpoint(ckdir) and r1.checkpoint.endswith("step_00000002")
    resumed, data = fresh()
    r2 = train(resumed, data, steps=5, checkpoint_dir=ckdir, checkpoint_every=2, **kw)
    assert r2.step == 5 and len(r2.losses) == 3
    assert r1.losses + r2.losses == r_full.losses
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    # periodic checkpoints: the newest two are kept, 'latest' names the last (the end of training)
    assert sorted(d for d in os.listdir(ckdir) if d.startswith("step_")) == ["step_00000004", "step_00000005"]
    assert latest_checkpoint(ckdir).endswith("step_00000005")
    again, data = fresh()
    load_state(again, latest_checkpoint(ckdir))
    for (n, a), b in zip(full.named_parameters(), again.parameters()):
        assert torch.equal(a, b), n
    # resuming at the end trains nothing
    assert train(again, data, steps=5, checkpoint_dir=ckdir, **kw).losses == []


def test_blend_trains_from_prompt_dicts(tiny):
    model = tiny.make_model("blend", num_groups=2, num_layers=2)
    ids, mask = tiny.prompts([4, 2])
    batch = (torch.randn(2, 4, 4, 4), {"input_ids": ids, "attention_mask": mask}, {"input_ids": torch.tensor([[1]])})
    embed = model.backbone.get_input_embeddings().weight.detach().clone()
    result = train(model, [batch], steps=2, lr=1e-3, progress=False)
    assert len(result.losses) == 2
    assert not torch.equal(model.backbone.get_input_embeddings().weight, embed)  # the context path trained


def test_bf16_autocast_step_with_a_float32_context(tiny):
    model = tiny.make_model(num_groups=2, num_layers=2, randomize=False)
    data = _data(tiny, model)
    assert data(0)[1].dtype == torch.float32
    result = train(model, data, steps=2, lr=1e-3, amp=True, progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert all(p.dtype == torch.float32 for p in model.groups.parameters())  # master weights stay float32


def test_train_rejects_bad_arguments(tiny):
    model = tiny.make_model(num_groups=1, num_layers=1)
    data = _data(tiny, model)
    with pytest.raises(ValueError, match="steps"):
        train(model, data, steps=-1)
    with pytest.raises(ValueError, match="lr"):
        train(model, data, steps=1, lr=0)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train(model, data, steps=1, checkpoint_every=1)
    with pytest.raises(TypeError, match="batch"):
        train(model, lambda s: torch.zeros(1), steps=1, progress=False)


def _listing(ckdir):
    steps = sorted(d for d in os.listdir(ckdir) if d.startswith("step_"))
    emas = sorted(os.listdir(os.path.join(ckdir, "ema")))
    return steps, emas


def test_ema_files_follow_the_kept_checkpoints_at_every_checkpoint(tiny, tmp_path):
    model = tiny.make_model(num_groups=1, num_layers=1, randomize=False)
    ckdir = str(tmp_path / "ck")
    seen = []

    def callback(step, loss):  # runs before step's own checkpoint: the previous one is complete
        if step > 1:
            seen.append(_listing(ckdir))

    train(model, _data(tiny, model), steps=5, checkpoint_dir=ckdir, checkpoint_every=1, progress=False,
          ema=EMA(model, 0.9), callback=callback)
    seen.append(_listing(ckdir))
    for steps, emas in seen:
        assert len(steps) <= 2 and emas == [s + ".safetensors" for s in steps], (steps, emas)
    assert seen[-1][0] == ["step_00000004", "step_00000005"]


def test_resume_takes_the_newest_complete_step_and_cleans_what_a_kill_left(tiny, tmp_path):
    def fresh():
        m = tiny.make_model(num_groups=1, num_layers=1, randomize=False)
        return m, _data(tiny, m), EMA(m, 0.9)

    kw = dict(lr=1e-3, progress=False, seed=5)
    full, data, ema_full = fresh()
    r_full = train(full, data, steps=4, ema=ema_full, **kw)
    kw["checkpoint_every"] = 1

    ckdir = str(tmp_path / "ck")
    part, data, ema = fresh()
    r1 = train(part, data, steps=3, checkpoint_dir=ckdir, ema=ema, **kw)
    # what kills at different points leave: 'latest' still naming the step before (killed while it was
    # replaced for step 3), a half-written step 4 and the EMA file saved before it
    open(os.path.join(ckdir, LATEST), "w").write("step_00000002\n")
    open(os.path.join(ckdir, ".latest.ab3_k9zq.tmp"), "w").write("step_0000")
    os.makedirs(os.path.join(ckdir, ".step_00000004.tmp-q1w2e3r4"))
    open(os.path.join(ckdir, ".step_00000004.tmp-q1w2e3r4", "model.safetensors"), "wb").write(b"half")
    ema.save(os.path.join(ckdir, "ema", "step_00000004.safetensors"))
    open(os.path.join(ckdir, "ema", ".step_00000004.safetensors.x8y7z6w5.tmp"), "wb").write(b"half")
    os.makedirs(os.path.join(ckdir, "step_00000009"))  # no config: not a complete checkpoint
    assert latest_checkpoint(ckdir).endswith("step_00000003")

    resumed, data, ema2 = fresh()
    r2 = train(resumed, data, steps=4, checkpoint_dir=ckdir, ema=ema2, **kw)
    assert r2.checkpoint.endswith("step_00000004") and len(r2.losses) == 1  # from step 3, not 2
    assert r1.losses + r2.losses == r_full.losses
    for n in ema_full.names:
        assert torch.equal(ema_full.shadow[n], ema2.shadow[n]), n  # the EMA resumed exactly too
    assert sorted(os.listdir(ckdir)) == ["ema", LATEST, "step_00000004", "step_00000009"]
    assert os.listdir(os.path.join(ckdir, "ema")) == ["step_00000004.safetensors"]


def test_resume_refuses_a_corrupt_ema_or_only_incomplete_checkpoints(tiny, tmp_path):
    model = tiny.make_model(num_groups=1, num_layers=1, randomize=False)
    ckdir = str(tmp_path / "ck")
    train(model, _data(tiny, model), steps=1, checkpoint_dir=ckdir, checkpoint_every=1, progress=False,
          ema=EMA(model, 0.9))
    ema_file = os.path.join(ckdir, "ema", "step_00000001.safetensors")
    data = bytearray(open(ema_file, "rb").read())
    data[-8:] = b"\xff" * 8
    open(ema_file, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="step_00000001.safetensors.*SHA-256"):
        train(model, _data(tiny, model), steps=2, checkpoint_dir=ckdir, progress=False, ema=EMA(model, 0.9))
    os.unlink(os.path.join(ckdir, "step_00000001", "trainer.pt"))
    with pytest.raises(ValueError, match="no complete checkpoint.*trainer.pt"):
        train(model, _data(tiny, model), steps=2, checkpoint_dir=ckdir, progress=False)
