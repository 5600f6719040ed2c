"""The paper's three claims at digits scale, measured (``python -m latteflow.apps.experiments --steps N``).

(a) LaTtE-Flow Couple (K=4 groups, residual attention) vs Vanilla Couple (one group of all layers, no
    residual attention) at equal training steps: conditional accuracy and Frechet distance against
    training steps (the paper's Figure 3, at this scale);
(b) sampling seconds per image of each (LaTtE-Flow runs L/K layers per step, Vanilla all L);
(c) LaTtE-Flow with and without residual attention at equal steps.

Every model uses the digits recipe of the shipped checkpoint (``latteflow.apps.digits_recipe``: same backbone,
batch, lr, EMA, seed); scores use the EMA weights, ``--per-class`` samples per class, 40 Euler steps,
guidance 5. Sampling times are medians over ``--timing-repeats`` interleaved rounds (A, B, C, A, B, C,
...) so that load from other processes on a shared machine hits every model alike.
Writes ``<out>/digits_claims.csv`` and ``<out>/digits_claims.png``; trained models go to ``--work``
and a model whose results are already there is not retrained.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from typing import Dict, List

import torch

from latteflow.apps.digits_recipe import DigitsRecipe, PromptContexts, git_commit, device_description, train_digits

MODELS = {
    "latte_couple": DigitsRecipe(variant="couple", num_groups=4, residual_attention=True),
    "vanilla_couple": DigitsRecipe(variant="vanilla_couple", num_groups=1, residual_attention=False),
    "latte_couple_no_residual": DigitsRecipe(variant="couple", num_groups=4, residual_attention=False),
}
FIELDS = ["model", "seed", "variant", "groups", "residual_attention", "train_step", "accuracy", "frechet_distance",
          "spread_generated", "spread_real", "num_samples", "train_seconds", "sample_s_per_img",
          "layer_calls_per_step", "batch", "device", "commit"]


def _train_one(name: str, recipe: DigitsRecipe, work: str, steps: int, eval_at: List[int], per_class: int,
               seed: int) -> dict:
    folder = os.path.join(work, f"{name}_seed{seed}")
    done = os.path.join(folder, "claims_result.json")
    if os.path.isfile(done):
        with open(done) as f:
            r = json.load(f)
        if r.get("steps") == steps and r.get("eval_at") == eval_at and r.get("per_class") == per_class:
            print(f"{name}: reusing {done}")
            return r
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    print(f"{name}: training {steps} steps ({recipe})", flush=True)
    t0 = time.perf_counter()
    m = train_digits(folder, steps=steps, seed=seed, recipe=recipe, eval_at=eval_at, eval_per_class=per_class,
                     checkpoint_every=0, progress=False, command=f"latteflow.apps.experiments {name}",
                     log=lambda s: print(f"{name}: {s}", flush=True))
    r = {"steps": steps, "eval_at": eval_at, "per_class": per_class, "evals": m["evals"],
         "wall_seconds": time.perf_counter() - t0, "train_seconds": m["train_seconds"], "device": m["device"],
         "commit": m["commit"], "model_dir": m["model_dir"]}
    with open(done, "w") as f:
        json.dump(r, f, indent=1)
    return r


def _time_sampling(work: str, names: List[str], repeats: int, batch: int, steps: int, guidance: float) -> Dict[str, dict]:
    from latteflow.pipeline import load_pipeline
    from latteflow.core.sampler import group_step_counts, sample

    pipes = {n: load_pipeline(os.path.join(work, n)) for n in names}  # n: a trained model's folder
    runs = {}
    for n, p in pipes.items():
        ctx = PromptContexts(p.model, p.tokenizer)
        labels = torch.arange(batch) % 10
        noise = torch.randn((batch, 1, 8, 8), generator=torch.Generator().manual_seed(0))
        runs[n] = (p.model, ctx.for_labels(labels), ctx.null, noise)
    times = {n: [] for n in names}
    for r in range(repeats + 1):
        for n in names:
            model, c, null, noise = runs[n]
            t0 = time.perf_counter()
            sample(model, c, null, steps=steps, guidance=guidance, noise=noise)
            if r:  # round 0 warms up
                times[n].append((time.perf_counter() - t0) / batch)
    out = {}
    for n in names:
        model = runs[n][0]
        counts = group_step_counts(model.cfg, steps)
        calls = sum(c * model.layers_per_group for c in counts) / steps
        out[n] = {"sample_s_per_img": statistics.median(times[n]), "layer_calls_per_step": calls}
    return out


def plot(rows: List[dict], path: str, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in rows))
    seeds = sorted({int(r["seed"]) for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for n in names:
        pts = [r for r in rows if r["model"] == n and r["train_step"] != ""]
        steps = sorted({int(r["train_step"]) for r in pts})
        for ax, key in ((axes[0], "accuracy"), (axes[1], "frechet_distance")):
            vals = [[float(r[key]) for r in pts if int(r["train_step"]) == st] for st in steps]
            mean = [statistics.fmean(v) for v in vals]
            err = [[m - min(v) for m, v in zip(mean, vals)], [max(v) - m for m, v in zip(mean, vals)]]
            ax.errorbar(steps, mean, yerr=err, marker="o", capsize=3, label=n)
    what = f"mean of seeds {seeds}, bars: min-max" if len(seeds) > 1 else f"seed {seeds[0]}"
    axes[0].set(xlabel="training steps", ylabel="conditional accuracy", title="accuracy (higher is better)")
    axes[1].set(xlabel="training steps", ylabel="Frechet distance", title="Frechet distance (lower is better)")
    timing = {r["model"]: float(r["sample_s_per_img"]) for r in rows if r["sample_s_per_img"] != ""}
    axes[2].bar(list(timing), [v * 1000 for v in timing.values()], color=["C0", "C1", "C2"][:len(timing)])
    axes[2].set(ylabel="ms / image (40 steps, CFG 5)", title="sampling time")
    axes[2].tick_params(axis="x", labelrotation=15)
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"LaTtE-Flow vs Vanilla Couple on 8x8 digits, {what}; 40 steps, guidance 5 ({device})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m latteflow.apps.experiments", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000, help="training steps per model")
    ap.add_argument("--evals", type=int, default=4, help="evaluation points, evenly spaced up to --steps")
    ap.add_argument("--per-class", type=int, default=30, help="samples per class at each evaluation")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds (each model is trained once per seed)")
    ap.add_argument("--work", default="runs/digits_claims", help="folder for the trained models")
    ap.add_argument("--out", default="docs", help="folder for digits_claims.csv and .png")
    ap.add_argument("--timing-repeats", type=int, default=5)
    ap.add_argument("--timing-batch", type=int, default=10)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    a = ap.parse_args(argv)
    names = [n for n in a.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        ap.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    if a.steps < 1 or a.evals < 1 or a.per_class < 2:
        ap.error("--steps and --evals must be >= 1, --per-class >= 2")
    try:
        seeds = sorted({int(x) for x in a.seeds.split(",") if x.strip()})
    except ValueError:
        ap.error(f"--seeds must be comma-separated ints, got {a.seeds!r}")
    if not seeds or min(seeds) < 0:
        ap.error("--seeds must hold non-negative ints")
    eval_at = sorted({max(1, round(a.steps * (i + 1) / a.evals)) for i in range(a.evals)})
    os.makedirs(a.work, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    results = {(n, sd): _train_one(n, MODELS[n], a.work, a.steps, eval_at, a.per_class, sd)
               for sd in seeds for n in names}
    timed = _time_sampling(a.work, [f"{n}_seed{seeds[0]}" for n in names], a.timing_repeats, a.timing_batch, 40, 5.0)
    timing = {n: timed[f"{n}_seed{seeds[0]}"] for n in names}
    device = device_description("cpu" if not torch.cuda.is_available() else "cuda")
    rows = []
    for (n, sd), res in results.items():
        rec = MODELS[n]
        base = {"model": n, "seed": sd, "variant": rec.variant, "groups": rec.num_groups,
                "residual_attention": rec.residual_attention, "device": res["device"], "commit": res["commit"],
                "train_seconds": round(res["train_seconds"], 1), "batch": "", "sample_s_per_img": "",
                "layer_calls_per_step": "", "spread_real": ""}
        for e in res["evals"]:
            rows.append(dict(base, train_step=e["step"], accuracy=round(e["accuracy"], 4),
                             frechet_distance=round(e["frechet_distance"], 3),
                             spread_generated=round(e["spread_generated"], 4),
                             spread_real=round(e["spread_real"], 4), num_samples=e["num_samples"]))
    for n in names:
        res = results[(n, seeds[0])]
        rec = MODELS[n]
        base = {"model": n, "seed": seeds[0], "variant": rec.variant, "groups": rec.num_groups,
                "residual_attention": rec.residual_attention, "commit": res["commit"],
                "train_seconds": round(res["train_seconds"], 1), "spread_real": ""}
        rows.append(dict(base, train_step="", accuracy="", frechet_distance="", spread_generated="",
                         num_samples="", batch=a.timing_batch, device=device,
                         sample_s_per_img=round(timing[n]["sample_s_per_img"], 5),
                         layer_calls_per_step=timing[n]["layer_calls_per_step"]))
    csv_path = os.path.join(a.out, "digits_claims.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    plot(rows, os.path.join(a.out, "digits_claims.png"), device)
    for r in rows:
        print({k: r[k] for k in FIELDS if r[k] != ""})
    print(f"wrote {csv_path} and digits_claims.png (commit {git_commit()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
