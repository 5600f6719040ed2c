"""``latteflow``: the command line (SPEC 3.1). Subcommands:

    latteflow sample [--prompt "digit 7" ...] --num 16 --out grid.png [--steps 40 --guidance 5 --seed 0]
                     [--checkpoint digits] (no --prompt: up to 10 of the checkpoint's prompt set)
    latteflow train --data digits --out DIR --steps N --seed S [--resume ...]
    latteflow train --data PREPARED --backbone QWEN2VL --out DIR --steps N [--recipe imagenet256 ...]
    latteflow sample --checkpoint RUN [--backbone DIR --vae DIR]  (a checkpoint trained on a prepare folder)
    latteflow bench --checkpoint RUN [--batch N]   (s/img of a loaded checkpoint: latteflow.evaluation.checkpoint_speed)
    latteflow eval [--checkpoint digits --per-class 50 --steps 40 --guidance 5 --seed 0]
    latteflow bench ...            (latteflow.apps.bench: s/img per mode and batch)
    latteflow prepare --images DIR --vae DIR --out DIR [--resolution 256 ...]   (latteflow.data.prepare)
    latteflow sample --distributed ...   (under torchrun: latteflow.evaluation.sample_ddp)
    latteflow train --distributed ...    (under torchrun: latteflow.training.ddp)
    latteflow eval --fid ...             (torch-fidelity scores: latteflow.evaluation.fid)

Bad input (arguments, paths, checkpoints, prompts) prints one ``latteflow: error: ...`` line on stderr
(a bad argument ends with where its usage is, e.g. ``(see 'latteflow bench --help')``) and exits with
status 2; ``LATTEFLOW_DEBUG=1`` re-raises instead, with the traceback. Loops longer than a
few seconds (training, sampling many images, eval) show tqdm bars on stderr when it is a terminal;
``--no-progress`` turns them off.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from typing import List, Optional, Sequence

from latteflow.apps.argtypes import finite_float, nonneg_int, positive_float, positive_int

PROG = "latteflow"
EXIT_USAGE = 2
DEFAULT_PROMPTS = 10  # sample without --prompt: this many of a class-conditional checkpoint's prompts


class UsageError(ValueError):
    """A bad command line, reported as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage and exits; we want one line and our exit path
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _png_out(path: str, flag: str = "--out") -> str:
    """Checks up front (before any sampling) that ``path`` can become a PNG file."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a directory: name a .png file (e.g. {os.path.join(path, 'grid.png')!r})")
    if not path.lower().endswith(".png"):
        raise ValueError(f"{flag} must name a .png file, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{flag}: folder {folder!r} does not exist")
    try:  # the grid is written atomically through a temporary sibling: try one now, not after sampling
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise PermissionError(f"{flag}: cannot write into folder {folder!r} ({e.strerror or e})") from None
    return path


def _device_words(device) -> str:
    from latteflow.apps.digits_recipe import device_description

    return device_description(device)


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="digits", help="shipped name ('digits') or a checkpoint directory")
    p.add_argument("--steps", type=positive_int, default=40, help="Euler steps (default 40)")
    p.add_argument("--guidance", type=finite_float, default=5.0, help="classifier-free guidance weight (default 5)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="encode an ImageNet-layout image folder into DC-AE latent shards (SPEC 3.2)")
    p.add_argument("--images", required=True, help="folder with one sub-folder of images per class")
    p.add_argument("--vae", required=True, help="AutoencoderDC folder (save_pretrained), e.g. dc-ae-f32c32-in-1.0")
    p.add_argument("--out", required=True, help="output folder: shard_*.safetensors and manifest.json")
    p.add_argument("--resolution", type=positive_int, default=256, help="side of the ADM centre crop (default 256)")
    p.add_argument("--class-names", default=None, help="JSON {folder: prompt} (default: prompts are folder names)")
    p.add_argument("--no-flip", action="store_true", help="no mirrored copy of each image")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per encoder call (default 64)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def _cmd_prepare(a) -> int:
    from latteflow.data.prepare import prepare

    t0 = time.perf_counter()
    m = prepare(a.images, a.vae, a.out, resolution=a.resolution, class_names=a.class_names, flip=not a.no_flip,
                batch_size=a.batch_size, device=a.device, progress=not a.no_progress)
    dt = time.perf_counter() - t0
    c, h, w = m["latent_shape"]
    print(f"{m['num_latents']} latents {c}x{h}x{w} ({'with' if m['flip'] else 'no'} mirrors) of "
          f"{len(m['classes'])} classes in {len(m['shards'])} shards, {dt:.1f} s -> {a.out}")
    if m["skipped"]:
        print(f"skipped {len(m['skipped'])} file{'s' if len(m['skipped']) > 1 else ''}:")
        for path, reason in m["skipped"]:
            print(f"  {path}: {reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="LaTtE-Flow: sample, train, evaluate and benchmark.")
    sub = parser.add_subparsers(dest="command", metavar="{sample,train,eval,bench,prepare}", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("sample", help="generate images for prompts and write a PNG grid")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt, e.g. 'digit 7' (repeat for several; --num images each; default: up to "
                        f"{DEFAULT_PROMPTS} of the checkpoint's prompt set, all ten digits for 'digits')")
    p.add_argument("--num", type=positive_int, default=16, help="images per prompt (default 16)")
    p.add_argument("--out", required=True, help="PNG file to write (its folder must exist)")
    p.add_argument("--distributed", action="store_true",
                   help="sample a global index range across torchrun ranks (latteflow.sample_ddp; see its --help)")
    p.add_argument("--backbone", default=None, help="Qwen2-VL folder replacing the one the checkpoint records")
    p.add_argument("--vae", default=None, help="DC-AE folder replacing the one the checkpoint records")
    _add_sampling(p)

    p = sub.add_parser("train", help="train a model (digits) with periodic checkpoints")
    p.add_argument("--data", required=True,
                   help="'digits' (scikit-learn's 8x8 digits) or a 'latteflow prepare' folder (needs --backbone)")
    p.add_argument("--backbone", default=None, help="Qwen2-VL folder (save_pretrained) for a prepare folder")
    p.add_argument("--recipe", choices=["imagenet256"], default=None,
                   help="the paper's settings (global batch 2048, constant lr 5e-4, 240K steps); printed")
    p.add_argument("--micro-batch-size", type=positive_int, default=None,
                   help="prepare data: latents per forward; --batch-size / this = gradient accumulation steps")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="prepare data: recompute the generation layers in backward (less memory)")
    p.add_argument("--device", default=None, help="prepare data: cuda or cpu (default: cuda when available)")
    p.add_argument("--out", required=True, help="output folder: checkpoints/, losses.csv, model/ (the result)")
    p.add_argument("--steps", type=positive_int, required=True, help="optimizer steps in total")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of init, batches, timesteps and noise")
    p.add_argument("--batch-size", type=positive_int, default=32, help="global batch (default 32)")
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--ema", type=finite_float, default=0.999, help="EMA decay of the exported weights")
    p.add_argument("--checkpoint-every", type=nonneg_int, default=250, help="steps between checkpoints (0: none)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--variant", choices=["couple", "vanilla_couple", "blend", "vanilla_blend"], default="couple",
                   help="digits: couple or vanilla_couple")
    p.add_argument("--groups", type=positive_int, default=4, help="expert groups K (couple)")
    p.add_argument("--no-residual-attention", action="store_true")
    p.add_argument("--backbone-seed", type=nonneg_int, default=0)
    p.add_argument("--eval-per-class", type=nonneg_int, default=50,
                   help="score the result with this many samples per class (0: skip)")
    p.add_argument("--eval-steps", type=positive_int, default=40)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--distributed", action="store_true",
                   help="DDP / FSDP2 training under torchrun (latteflow.train_ddp; see its --help)")

    p = sub.add_parser("eval", help="score a digits checkpoint: accuracy, Frechet distance, spread")
    p.add_argument("--per-class", type=positive_int, default=50, help="samples per class (default 50)")
    p.add_argument("--out", default=None, help="optional PNG grid of the samples (one row per class)")
    p.add_argument("--fid", action="store_true",
                   help="FID / IS / precision-recall of an .npz or PNG folder with local Inception weights (latteflow.evaluation.fid)")
    _add_sampling(p)

    _add_prepare(sub)

    sub.add_parser("bench", help="s/img of sampling per mode and batch (latteflow.apps.bench); every later argument passes through",
                   add_help=False)
    return parser


# ------------------------------------------------------------------------------------------------
def _cmd_sample(a) -> int:
    import torch

    from latteflow.data.images import save_image_grid
    from latteflow.pipeline import load_pipeline, sample_prompts

    _png_out(a.out)
    pipe = load_pipeline(a.checkpoint, device=a.device, backbone=a.backbone, vae=a.vae)
    if a.prompt is None:
        if pipe.prompts is None:
            raise UsageError(f"--prompt is required: checkpoint {a.checkpoint!r} records no prompt set to sample from")
        chosen = sample_prompts(pipe.prompts, DEFAULT_PROMPTS)
        print(f"no --prompt: sampling {len(chosen)} of the checkpoint's {len(pipe.prompts)} prompts, one row each")
    else:
        chosen = pipe.check_prompts(a.prompt)
    prompts = [p for p in chosen for _ in range(a.num)]
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    images = pipe(prompts, steps=a.steps, guidance=a.guidance, seed=a.seed, progress=not a.no_progress)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    save_image_grid(images, a.out, ncols=a.num if len(chosen) > 1 else None)
    print(f"{len(prompts)} images in {dt:.2f} s = {dt / len(prompts):.4f} s/img "
          f"(steps {a.steps}, guidance {a.guidance:g}, seed {a.seed}; {_device_words(pipe.device)}; prompt context "
          f"included, first call) -> {a.out}")
    return 0


def _cmd_train_prepared(a, argv: Sequence[str]) -> int:
    from latteflow.training.prepared import apply_recipe, train_prepared

    if a.backbone is None:
        raise UsageError(f"--data {a.data!r} is a prepare folder: --backbone DIR (a Qwen2-VL folder) is required")
    kw = dict(steps=a.steps, global_batch_size=a.batch_size, lr=a.lr, ema_decay=a.ema, variant=a.variant,
              num_groups=a.groups)
    if a.recipe is not None:
        flags = {"--steps": "steps", "--batch-size": "global_batch_size", "--lr": "lr", "--variant": "variant",
                 "--groups": "num_groups", "--ema": "ema_decay"}
        given = {x.split("=", 1)[0] for x in argv}
        kw, line = apply_recipe(a.recipe, kw, {k for f, k in flags.items() if f in given})
        print(line)
    m = train_prepared(a.data, a.backbone, a.out, micro_batch_size=a.micro_batch_size,
                       checkpoint_every=a.checkpoint_every, resume=a.resume, grad_checkpoint=a.grad_checkpoint,
                       seed=a.seed, residual_attention=not a.no_residual_attention, device=a.device,
                       progress=not a.no_progress, **kw)
    loss = "none" if m["final_loss"] is None else f"{m['final_loss']:.4f}"
    print(f"trained {m['trained_steps']} steps (now at step {m['steps']}) in {m['train_seconds']:.1f} s "
          f"({m['device']}); final loss {loss}; model -> {m['model_dir']}")
    return 0


def _cmd_train(a, argv: Sequence[str]) -> int:
    from latteflow.apps.digits_recipe import DigitsRecipe, train_digits

    if not 0.0 <= a.ema < 1.0:
        raise ValueError(f"--ema must lie in [0, 1), got {a.ema}")
    parent = os.path.dirname(os.path.abspath(a.out))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"--out: folder {parent!r} does not exist")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise ValueError(f"--out {a.out!r} exists and is not a folder")
    if a.data != "digits":
        return _cmd_train_prepared(a, argv)
    if a.backbone is not None or a.recipe is not None:
        raise UsageError("--backbone and --recipe go with a prepare folder, not --data digits")
    recipe = DigitsRecipe(variant=a.variant, num_groups=a.groups, residual_attention=not a.no_residual_attention,
                          backbone_seed=a.backbone_seed)
    command = " ".join(shlex.quote(x) for x in [PROG, *argv])
    m = train_digits(a.out, steps=a.steps, seed=a.seed, recipe=recipe, batch_size=a.batch_size, lr=a.lr,
                     ema_decay=a.ema, checkpoint_every=a.checkpoint_every, resume=a.resume,
                     eval_per_class=a.eval_per_class, eval_steps=a.eval_steps, progress=not a.no_progress,
                     command=command)
    n = m["trained_steps"]
    now = "" if m["resumed_from_step"] is None else f" (now at step {m['steps']})"
    loss = "none" if m["final_loss"] is None else f"{m['final_loss']:.4f}"
    print(f"trained {n} step{'' if n == 1 else 's'}{now} in {m['train_seconds']:.1f} s ({m['device']}); "
          f"final loss {loss}; model -> {m['model_dir']}")
    if "eval" in m:
        _print_scores(m["eval"], m["device"])
    return 0


def _print_scores(r: dict, device: str) -> None:
    print(f"conditional accuracy {r['accuracy']:.3f}  Frechet distance {r['frechet_distance']:.2f}  "
          f"within-class spread {r['spread_generated']:.3f} (real {r['spread_real']:.3f})  "
          f"[{r['num_samples']} samples, {r['steps']} steps, guidance {r['guidance']:g}, seed {r['seed']}; "
          f"{r['seconds_per_image']:.4f} s/img on {device}]")


def _cmd_eval(a) -> int:
    from latteflow.apps.digits_recipe import PromptContexts, evaluate_model

    from latteflow.pipeline import load_pipeline

    if a.out is not None:
        _png_out(a.out)
    pipe = load_pipeline(a.checkpoint, device=a.device)
    contexts = PromptContexts(pipe.model, pipe.tokenizer)
    r = evaluate_model(pipe.model, contexts, per_class=a.per_class, steps=a.steps, guidance=a.guidance, seed=a.seed,
                       progress=not a.no_progress)
    _print_scores(r, _device_words(pipe.device))
    if a.out is not None:
        import torch

        from latteflow.data.digits import NUM_CLASSES
        from latteflow.apps.digits_recipe import sample_labels
        from latteflow.data.images import save_image_grid

        k = min(a.per_class, 10)
        labels = torch.arange(NUM_CLASSES).repeat_interleave(k)
        save_image_grid(sample_labels(pipe.model, contexts, labels, steps=a.steps, guidance=a.guidance, seed=a.seed,
                                      progress=not a.no_progress), a.out, ncols=k)
        print(f"grid of {k} per class -> {a.out}")
    return 0


BENCH_PROG = f"{PROG} bench"


def _cmd_bench(a) -> int:
    from latteflow.apps import bench

    bench.main(list(a.args), parser=bench.build_parser(BENCH_PROG, _Parser))
    return 0


# ``<command> <flag>`` hands every other argument to that module's own command line
DELEGATED = {("sample", "--distributed"): "latteflow.evaluation.sample_ddp", ("train", "--distributed"): "latteflow.training.ddp",
             ("eval", "--fid"): "latteflow.evaluation.fid"}


def _delegated(argv: List[str]) -> Optional[int]:
    """The exit status of a delegated command, or None when ``argv`` is not one."""
    import importlib

    for (command, flag), module in DELEGATED.items():
        if argv[0] == command and flag in argv[1:]:
            rc = importlib.import_module(module).main([a for a in argv[1:] if a != flag])
            return int(rc) if isinstance(rc, int) else 0
    return None


def _known_errors():
    errors = [ValueError, TypeError, FileNotFoundError, OSError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # older safetensors spell it only in the Rust module
        try:
            from safetensors.safetensors_rust import SafetensorError

            errors.append(SafetensorError)
        except ImportError:
            pass
    return tuple(errors)


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the command line; returns the exit status (0 on success, 2 on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("LATTEFLOW_DEBUG", "") not in ("", "0")
    try:
        parser = build_parser()
        if argv in ([], ["-h"], ["--help"]) or (argv and argv[0] == "help"):
            parser.print_help()
            return 0 if argv else EXIT_USAGE
        if argv[0] == "bench" and any(x == "--checkpoint" or x.startswith("--checkpoint=") for x in argv[1:]):
            from latteflow.apps import bench

            return bench.checkpoint_main(argv[1:], prog=f"{BENCH_PROG} --checkpoint", parser_class=_Parser)
        if argv[0] == "bench":  # everything after it belongs to latteflow.apps.bench, flags included
            return _cmd_bench(argparse.Namespace(args=argv[1:]))
        delegated = _delegated(argv)
        if delegated is not None:
            return delegated
        a = parser.parse_args(argv)
        if a.command == "sample":
            return _cmd_sample(a)
        if a.command == "train":
            return _cmd_train(a, argv)
        if a.command == "eval":
            return _cmd_eval(a)
        if a.command == "prepare":
            return _cmd_prepare(a)
        raise UsageError(f"unknown command {a.command!r}")
    except _known_errors() as e:
        if debug:
            raise
        msg = str(e).strip().splitlines()
        text = msg[0] if msg else type(e).__name__
        if isinstance(e, FileNotFoundError) and getattr(e, "filename", None) and e.filename not in text:
            text = f"{text}: {e.filename}"
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
