"""Tiny models and a 2-process gloo job for the distributed tests (``test_distributed.py``).

``run_two_ranks(out_dir)`` starts 2 processes with ``torch.multiprocessing`` on a free TCP port; each
joins the process group through ``latteflow.distributed.init_distributed`` (the torchrun environment
variables) and runs ``job``: distributed sampling, DDP training of couple with a checkpoint, FSDP2
training of blend with a checkpoint. Results land in files under ``out_dir`` for the parent to compare
with 1-process runs.
"""
import os
import socket
import time

import torch

from latteflow import LatteFlowConfig, LatteFlowModel
from latteflow.text.backbones import build_backbone, tiny_qwen2vl_config
from latteflow.text.tokenizer import CharTokenizer
from model_helpers import randomize_zero_inits

PROMPTS = ["digit 0", "digit 1", "digit 2"]
SAMPLE_KW = dict(per_class=3, seed=11, steps=4, guidance=3.0)   # 9 samples
TRAIN_KW = dict(global_batch_size=4, lr=3e-3, seed=5, data_seed=2, max_grad_norm=1.0)
TIMEOUT_S = 150


def tokenizer():
    return CharTokenizer()


def make_model(variant="couple", seed=0):
    """hidden 32, 4 layers, 2 heads (1 KV), head_dim 16, 2 groups, 1-channel 4x4 latents, float32;
    the zero-initialised heads and gates get random values so every path moves the output."""
    bcfg = tiny_qwen2vl_config(tokenizer(), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                               num_key_value_heads=1, intermediate_size=64, mrope_section=[2, 3, 3])
    cfg = LatteFlowConfig(variant=variant, num_groups=2, latent_channels=1, grid_hw=(4, 4), backend="reference",
                          timestep_dim=32, extra={"prompts": PROMPTS})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LatteFlowModel(build_backbone(bcfg, seed=seed), cfg)
    randomize_zero_inits(model, seed)
    return model


def make_data(n=22, seed=3):
    from latteflow.training.ddp import LabeledLatents

    g = torch.Generator().manual_seed(seed)
    return LabeledLatents(torch.randn(n, 1, 4, 4, generator=g) * 0.5, torch.randint(0, len(PROMPTS), (n,), generator=g),
                          PROMPTS, tokenizer())


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(rank, world_size, out_dir):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    from latteflow.distributed import init_distributed, shutdown_distributed
    from latteflow.evaluation.sample_ddp import sample_to_dir
    from latteflow.training.ddp import fsdp_available, train_distributed

    env = init_distributed("cpu", timeout_s=TIMEOUT_S)
    assert env.world_size == world_size and env.distributed
    try:
        sample_to_dir(make_model(), tokenizer(), PROMPTS, os.path.join(out_dir, "samples"), batch_size=2, env=env,
                      **SAMPLE_KW)
        model = make_model()
        train_distributed(model, make_data(), steps=3, checkpoint_dir=os.path.join(out_dir, "ddp"),
                          checkpoint_every=2, env=env, **TRAIN_KW)
        if rank == 0:
            torch.save(params_of(model), os.path.join(out_dir, "ddp_params.pt"))
        if fsdp_available():
            model = make_model("blend")
            run = train_distributed(model, make_data(), steps=2, checkpoint_dir=os.path.join(out_dir, "fsdp"),
                                    checkpoint_every=2, fsdp=True, env=env, **TRAIN_KW)
            if rank == 0:
                torch.save(run.losses, os.path.join(out_dir, "fsdp_losses.pt"))
    finally:
        shutdown_distributed(env)


def run_two_ranks(out_dir, fn=None, extra_args=()):
    """Runs ``fn(rank, 2, out_dir, *extra_args)`` (default: ``job``) on 2 gloo ranks."""
    import torch.multiprocessing as mp

    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        ctx = mp.start_processes(fn or job, args=(2, out_dir, *extra_args), nprocs=2, join=False, start_method="spawn")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"2-rank job did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


EMA_DECAY = 0.8


def ema_job(rank, world_size, out_dir):
    """One rank of the EMA test: DDP training with an EMA to step 2 (a checkpoint each step), then a
    fresh model and EMA resuming from that checkpoint to step 3; rank 0 saves the final EMA shadow."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    from latteflow.distributed import init_distributed, shutdown_distributed
    from latteflow.training.ddp import train_distributed
    from latteflow.training.loop import EMA

    env = init_distributed("cpu", timeout_s=TIMEOUT_S)
    try:
        ck = os.path.join(out_dir, "ema")
        for steps in (2, 3):
            model = make_model()
            ema = EMA(model, EMA_DECAY)
            run = train_distributed(model, make_data(), steps=steps, checkpoint_dir=ck, checkpoint_every=1,
                                    env=env, ema=ema, **TRAIN_KW)
            assert run.ema is ema and ema.updates == steps
        if rank == 0:
            torch.save({n: t.clone() for n, t in ema.shadow.items()}, os.path.join(out_dir, "ema_shadow.pt"))
    finally:
        shutdown_distributed(env)
