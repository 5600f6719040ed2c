"""``latteflow eval --fid``: FID, Inception Score, precision and recall through ``torch-fidelity``.

Everything comes from local files the user points at; nothing is ever downloaded:
- ``inception_weights``: torch-fidelity's InceptionV3 weights in PyTorch format (the file its
  ``feature_extractor_weights_path`` takes, ``weights-inception-2015-12-05-6726825d.pth``);
- ``reference``: an ADM-format reference batch ``.npz`` holding ``mu`` and ``sigma`` (statistics of the
  2048-d pool features, for FID) and, for precision / recall, the reference images ``arr_0``
  (uint8 ``N x H x W x 3``);
- ``samples``: an ADM ``.npz`` (``arr_0``, as ``latteflow.evaluation.sample_ddp`` writes), a directory of PNGs, or a
  uint8 array ``(N, H, W, C)``, C in {1, 3} (grey is replicated to RGB).

torch-fidelity is imported only here and only when scoring; when the package (or torchvision, which it
needs), the weights or the statistics are missing, the error names exactly what is missing.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from typing import Dict, Optional, Sequence

import numpy as np
import torch

__all__ = ["compute_metrics", "load_images", "main"]

INSTALL_HINT = "pip install torch-fidelity (it needs torchvision too)"


def _check_available(inception_weights, reference) -> None:
    for name, value in (("inception_weights", inception_weights), ("reference", reference)):
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            raise TypeError(f"{name} must be a path to a local file, got {value!r}")
    missing = [pkg for pkg in ("torch_fidelity", "torchvision") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise ImportError(f"FID / IS / precision-recall need the package(s) {', '.join(missing)}, not installed: "
                          f"{INSTALL_HINT}")
    files = [f"{name} file {os.fspath(p)!r}" for name, p in (("inception_weights", inception_weights),
                                                             ("reference", reference)) if not os.path.isfile(p)]
    if files:
        raise FileNotFoundError(f"missing {' and '.join(files)} (nothing is downloaded: point at local files)")


def load_images(samples) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` from an ADM ``.npz`` path (``arr_0``), a directory of PNGs (sorted by name)
    or a uint8 array ``(N, H, W, C)`` with C in {1, 3}."""
    if isinstance(samples, (str, os.PathLike)):
        path = os.fspath(samples)
        if os.path.isdir(path):
            from PIL import Image

            names = sorted(n for n in os.listdir(path) if n.lower().endswith(".png"))
            if not names:
                raise ValueError(f"samples directory {path!r} holds no PNG")
            arrs = []
            for n in names:
                with Image.open(os.path.join(path, n)) as img:
                    arrs.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
            samples = np.stack(arrs)
        elif os.path.isfile(path):
            with np.load(path) as f:
                if "arr_0" not in f:
                    raise ValueError(f"samples file {path!r} holds no 'arr_0' images (keys {sorted(f.keys())})")
                samples = f["arr_0"]
        else:
            raise FileNotFoundError(f"samples {path!r} is neither an .npz file nor a directory")
    arr = np.asarray(samples)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] not in (1, 3):
        raise ValueError(f"samples must be uint8 (N, H, W, C) with C in (1, 3), got {arr.dtype} {arr.shape}")
    if arr.shape[0] < 2:
        raise ValueError(f"samples must hold at least 2 images, got {arr.shape[0]}")
    return np.repeat(arr, 3, axis=3) if arr.shape[3] == 1 else arr


@torch.no_grad()
def _features(extractor, images: np.ndarray, batch_size: int, device) -> tuple:
    outs = []
    for i in range(0, images.shape[0], batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).contiguous().to(device)
        outs.append([f.cpu() for f in extractor(x)])
    return tuple(torch.cat(col) for col in zip(*outs))


def compute_metrics(samples, *, inception_weights: str, reference: str, fid: bool = True, isc: bool = True,
                    prc: bool = True, batch_size: int = 64, device: Optional[str] = None, isc_splits: int = 10,
                    prc_neighborhood: int = 3) -> Dict[str, float]:
    """``{"fid", "inception_score_mean", "inception_score_std", "precision", "recall", "num_samples"}``
    (the requested ones) of ``samples`` against ``reference`` (see the module docstring)."""
    _check_available(inception_weights, reference)
    if not (fid or isc or prc):
        raise ValueError("ask for at least one of fid, isc, prc")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    images = load_images(samples)
    with np.load(os.fspath(reference)) as ref:
        keys = set(ref.keys())
        need = ({"mu", "sigma"} if fid else set()) | ({"arr_0"} if prc else set())
        if need - keys:
            raise ValueError(f"reference file {os.fspath(reference)!r} lacks {sorted(need - keys)} "
                             f"(has {sorted(keys)}); FID needs mu and sigma, precision/recall need arr_0")
        ref_stats = {"mu": ref["mu"].astype(np.float64), "sigma": ref["sigma"].astype(np.float64)} if fid else None
        ref_images = load_images(ref["arr_0"]) if prc else None

    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
        from torch_fidelity.metric_isc import isc_features_to_metric
        from torch_fidelity.metric_prc import prc_features_to_metric
    except Exception as e:  # e.g. a torchvision built for another torch
        raise ImportError(f"torch-fidelity is installed but does not import with this torch "
                          f"({type(e).__name__}: {e}); {INSTALL_HINT}") from None

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                            feature_extractor_weights_path=os.fspath(inception_weights)).to(dev)
    pool, logits = _features(extractor, images, batch_size, dev)
    out: Dict[str, float] = {"num_samples": int(images.shape[0])}
    if fid:
        stats = fid_features_to_statistics(pool.double())
        if stats["mu"].shape != ref_stats["mu"].shape or ref_stats["sigma"].shape != stats["sigma"].shape:
            raise ValueError(f"reference mu/sigma shapes {ref_stats['mu'].shape}/{ref_stats['sigma'].shape} do not "
                             f"match the 2048-d Inception pool features")
        stats = {k: np.asarray(v, dtype=np.float64) for k, v in stats.items()}
        out["fid"] = float(fid_statistics_to_metric(stats, ref_stats, False)["frechet_inception_distance"])
    if isc:
        r = isc_features_to_metric(logits, splits=isc_splits, shuffle=True, rng_seed=2020)
        out["inception_score_mean"] = r["inception_score_mean"]
        out["inception_score_std"] = r["inception_score_std"]
    if prc:
        ref_pool, _ = _features(extractor, ref_images, batch_size, dev)
        r = prc_features_to_metric(pool, ref_pool, prc_neighborhood=prc_neighborhood, verbose=False)
        out["precision"], out["recall"] = float(r["precision"]), float(r["recall"])
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog: str = "latteflow eval --fid") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="FID, Inception Score, precision and recall (torch-fidelity) of a sample "
                                       "set against an ADM reference batch; local files only, no download.")
    p.add_argument("--samples", required=True, help="ADM .npz (arr_0) or a directory of PNGs")
    p.add_argument("--inception-weights", required=True, help="torch-fidelity InceptionV3 weights (.pth)")
    p.add_argument("--reference", required=True, help="ADM reference .npz: mu, sigma (FID) and arr_0 (precision/recall)")
    p.add_argument("--no-isc", action="store_true", help="skip the Inception Score")
    p.add_argument("--no-prc", action="store_true", help="skip precision / recall")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--json", help="also write the scores to this JSON file")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        scores = compute_metrics(args.samples, inception_weights=args.inception_weights, reference=args.reference,
                                 isc=not args.no_isc, prc=not args.no_prc, batch_size=args.batch_size,
                                 device=args.device)
    except (ImportError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    for k, v in scores.items():
        print(f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(scores, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
