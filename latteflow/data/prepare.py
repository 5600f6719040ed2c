"""``latteflow prepare``: an ImageNet-layout image folder -> DC-AE latent shards plus a manifest (SPEC 3.2).

The images are taken in one deterministic order (every file under the class folders, sorted by path,
then permuted with a fixed seed so that each shard mixes the classes) and cut into shards of
``images_per_shard`` images. Each image is ADM-cropped to ``resolution``, mapped to [-1, 1] and encoded
(times the VAE's scaling factor); its mirror image too unless ``flip=False`` (the mirror follows its
original in the shard). A shard's safetensors header records a fingerprint of what went into it (the
files, their sizes and modification times, the settings, the VAE's SHA-256), so a second run keeps every
shard whose fingerprint still matches and encodes only the rest: an interrupted run resumes, a changed
image folder or VAE re-encodes. Unreadable files are skipped, recorded in their shard and listed in the
manifest. The manifest is written last (atomically): a folder with a manifest is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

import torch

from latteflow.core.files import read_json, sha256_file, weights_sha256
from latteflow.data.image_folder import adm_center_crop, load_image, scan_image_folder, to_model_pixels
from latteflow.data.shards import FORMAT, _shard_header, shard_metadata, shard_name, write_manifest, write_shard

__all__ = ["IMAGES_PER_SHARD", "ORDER_SEED", "load_class_names", "prepare"]

IMAGES_PER_SHARD = 1024  # 2048 latents with mirrors: 16 MiB of float32 32x8x8 latents per shard
ORDER_SEED = 0
_SHARD_FILE = re.compile(r"^shard_\d{5}\.safetensors$")
_TEMPORARY = re.compile(r"^\.(shard_\d{5}\.safetensors|manifest\.json)\..*\.tmp$")  # core.files.atomic_write's


def load_class_names(path: Optional[str], classes: List[str]) -> List[str]:
    """One prompt per class: its entry in the JSON ``{folder: prompt}`` at ``path``, else the folder name.
    ValueError naming ``--class-names`` when the file is missing, not JSON, not such an object, or has an
    empty prompt."""
    if path is None:
        return list(classes)
    if not os.path.isfile(path):
        raise ValueError(f"--class-names {path!r}: no such file")
    names = read_json(path, f"--class-names {path!r}")
    if not isinstance(names, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
        raise ValueError(f"--class-names {path!r}: must be a JSON object {{folder: prompt}} of strings")
    empty = [k for k, v in names.items() if not v.strip()]
    if empty:
        raise ValueError(f"--class-names {path!r}: empty prompt for {empty[:5]}")
    return [names.get(c, c) for c in classes]


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


def _open_vae(vae: str, device: torch.device):
    from latteflow.data.vae import DCAutoencoder

    folder = os.path.abspath(os.fspath(vae))
    if not os.path.isdir(folder):
        raise ValueError(f"--vae {os.fspath(vae)!r} is not a folder (an AutoencoderDC save_pretrained folder)")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"--vae {os.fspath(vae)!r} has no config.json (an AutoencoderDC save_pretrained folder)")
    digest = weights_sha256(folder)
    try:  # low_cpu_mem_usage=False: diffusers otherwise wants accelerate (and warns without it)
        ae = DCAutoencoder.from_pretrained(folder, torch_dtype=torch.float32, low_cpu_mem_usage=False).to(device)
    except (OSError, EnvironmentError) as e:
        raise ValueError(f"--vae {os.fspath(vae)!r}: not loadable as diffusers AutoencoderDC ({e})") from None
    return ae.requires_grad_(False), {"folder": folder, "sha256": digest["sha256"]}


def _fingerprint(settings: Dict[str, Any], index: int, chunk: List[Tuple[str, int]], root: str) -> str:
    files = []
    for rel, label in chunk:
        try:
            st = os.stat(os.path.join(root, rel))
            files.append([rel, label, st.st_size, st.st_mtime_ns])
        except OSError as e:
            files.append([rel, label, None, str(e)])
    blob = json.dumps({"settings": settings, "index": index, "files": files}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _finished(path: str, fingerprint: str, num_classes: int) -> Optional[Dict[str, Any]]:
    """The recorded state of a shard whose fingerprint matches, else None (absent, other, unreadable)."""
    if not os.path.isfile(path):
        return None
    try:
        meta = shard_metadata(path)
    except ValueError:
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    try:
        counts = json.loads(meta["counts"])
        skipped = json.loads(meta["skipped"])
    except (KeyError, json.JSONDecodeError):
        return None
    if not isinstance(counts, list) or len(counts) != num_classes:
        return None
    return {"counts": counts, "skipped": skipped}


def _read(root: str, rel: str, resolution: int):
    """``(pixels (3, R, R), None)`` or ``(None, reason)``."""
    try:
        return to_model_pixels(adm_center_crop(load_image(os.path.join(root, rel)), resolution)), None
    except Exception as e:  # any failure to read one file skips that file, never the run
        text = str(e).strip().splitlines()
        return None, f"{type(e).__name__}: {text[0] if text else 'unreadable'}"


def _encode_shard(ae, pool, root: str, chunk: List[Tuple[str, int]], *, resolution: int, flip: bool, per_call: int,
                  latent_shape: List[int], bar) -> Tuple[torch.Tensor, List[int], List[List[str]]]:
    """``(latents, labels, skipped)`` of one shard's images, ``per_call`` images (and their mirrors) per
    encoder call, decoded by the threads of ``pool``."""
    device = next(ae.parameters()).device
    latents, labels, skipped = [], [], []
    for b in range(0, len(chunk), per_call):
        part = chunk[b:b + per_call]
        read = list(pool.map(lambda item: _read(root, item[0], resolution), part))
        pixels = []
        for (rel, label), (x, reason) in zip(part, read):
            if x is None:
                skipped.append([os.path.join(root, rel), reason])
                continue
            pixels += [x, x.flip(-1)] if flip else [x]
            labels += [label, label] if flip else [label]
        if pixels:
            with torch.inference_mode():
                z = ae.encode(torch.stack(pixels).to(device)).float().cpu()
            if list(z.shape[1:]) != latent_shape:
                raise ValueError(f"--vae: encodes {resolution}x{resolution} images to {list(z.shape[1:])}, "
                                 f"expected {latent_shape}")
            latents.append(z)
        bar.update(len(part))
    return (torch.cat(latents) if latents else torch.empty(0, *latent_shape)), labels, skipped


def _clean_temporaries(out: str) -> None:
    """Removes the temporary files of atomic writes a killed run left behind."""
    for name in os.listdir(out):
        if _TEMPORARY.match(name):
            os.unlink(os.path.join(out, name))


def prepare(images: str, vae: str, out: str, *, resolution: int = 256, class_names: Optional[str] = None,
            flip: bool = True, batch_size: int = 64, device=None, progress: bool = True,
            images_per_shard: int = IMAGES_PER_SHARD, workers: Optional[int] = None) -> Dict[str, Any]:
    """Encodes the ImageNet-layout folder ``images`` with the DC-AE folder ``vae`` into shards under ``out``
    and returns the manifest it wrote (module docstring; SPEC 3.2). ``batch_size``: images per encoder call
    (mirrors included). ``workers``: threads decoding images (default: up to 8)."""
    from tqdm.auto import tqdm

    _check_int("--resolution", resolution, 1)
    _check_int("--batch-size", batch_size, 1)
    _check_int("images_per_shard", images_per_shard, 1)
    if not isinstance(flip, bool):
        raise TypeError(f"flip must be a bool, got {type(flip).__name__}")
    root = os.path.abspath(os.fspath(images))
    out = os.path.abspath(os.fspath(out))
    classes, files, ignored = scan_image_folder(images)
    if out == root or out.startswith(root + os.sep):
        raise ValueError(f"--out {out!r} lies inside --images {root!r}: its shards would be read as images")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} exists and is not a folder")
    prompts = load_class_names(class_names, classes)
    if workers is not None:
        _check_int("workers", workers, 1)
    try:
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {device!r} is not a device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (use --device cpu)")
    ae, vae_record = _open_vae(vae, device)
    d = ae.downsample
    if resolution % d:
        raise ValueError(f"--resolution must be a multiple of the VAE's downsampling factor {d}, got {resolution}")
    latent_shape = [ae.latent_channels, resolution // d, resolution // d]
    settings = {"format": FORMAT, "resolution": resolution, "flip": flip, "vae_sha256": vae_record["sha256"],
                "scaling_factor": ae.scaling_factor, "images_per_shard": images_per_shard, "order_seed": ORDER_SEED,
                "num_files": len(files)}
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(ORDER_SEED)).tolist()
    ordered = [files[i] for i in order]
    chunks = [ordered[i:i + images_per_shard] for i in range(0, len(ordered), images_per_shard)]
    os.makedirs(out, exist_ok=True)
    _clean_temporaries(out)
    per_call = max(1, batch_size // 2) if flip else batch_size
    entries, counts, skipped = [], [0] * len(classes), list(ignored)
    reused = 0
    bar = tqdm(total=len(files), desc="prepare", unit="img", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for index, chunk in enumerate(chunks):
            path = os.path.join(out, shard_name(index))
            fingerprint = _fingerprint(settings, index, chunk, root)
            done = _finished(path, fingerprint, len(classes))
            if done is not None:
                header, _ = _shard_header(path)
                entries.append({"file": shard_name(index), "count": header["latents"][1][0], "sha256": sha256_file(path)})
                counts = [a + b for a, b in zip(counts, done["counts"])]
                skipped += done["skipped"]
                reused += 1
                bar.update(len(chunk))
                continue
            lat, labels, shard_skipped = _encode_shard(ae, pool, root, chunk, resolution=resolution, flip=flip,
                                                       per_call=per_call, latent_shape=latent_shape, bar=bar)
            lab = torch.tensor(labels, dtype=torch.int64)
            shard_counts = torch.bincount(lab, minlength=len(classes)).tolist()
            meta = {"fingerprint": fingerprint, "counts": json.dumps(shard_counts), "skipped": json.dumps(shard_skipped)}
            entries.append(write_shard(out, index, lat, lab, metadata=meta))
            counts = [a + b for a, b in zip(counts, shard_counts)]
            skipped += shard_skipped
    bar.close()
    if progress and reused:
        print(f"prepare: kept {reused} finished shard{'s' if reused > 1 else ''} of {len(chunks)} "
              f"(same images, settings and VAE)", file=sys.stderr)
    for name in os.listdir(out):  # shards of an earlier run over more images
        if _SHARD_FILE.match(name) and int(name[6:11]) >= len(chunks):
            os.unlink(os.path.join(out, name))
    manifest = {"format": FORMAT, "resolution": resolution, "latent_shape": latent_shape,
                "scaling_factor": ae.scaling_factor, "flip": flip, "dtype": "float32", "classes": classes,
                "prompts": prompts, "counts": counts, "num_latents": sum(counts), "shards": entries,
                "vae": vae_record, "skipped": skipped, "images_per_shard": images_per_shard}
    if manifest["num_latents"] == 0:
        raise ValueError(f"--images {os.fspath(images)!r}: not one readable image ({len(skipped)} skipped)")
    write_manifest(out, manifest)
    return manifest
