"""Latent shards: what ``latteflow prepare`` writes and what training reads (SPEC 3.2).

A prepare folder holds ``shard_00000.safetensors``, ``shard_00001.safetensors``, ... and ``manifest.json``.
Each shard holds ``latents`` ``(n, C, h, w)`` (dtype ``manifest["dtype"]``, float32 as written by prepare)
and ``labels`` int64 ``(n,)`` (indices into ``manifest["classes"]``). The manifest::

    {"format": "latteflow-latents/1", "resolution": 256, "latent_shape": [C, h, w], "scaling_factor": 0.3189,
     "flip": true, "dtype": "float32", "classes": [...sorted folder names], "prompts": [... one per class],
     "counts": [... latents per class, mirrored copies included], "num_latents": n,
     "shards": [{"file": "shard_00000.safetensors", "count": n0, "sha256": hex}, ...],
     "vae": {"folder": absolute path, "sha256": hex of its weights}, "skipped": [[path, reason], ...]}

Why float32: the latents are the VAE's outputs exactly, training consumes float32, and the reader below keeps
only a few shards in memory, so the size on disk (ImageNet 256: ~2.56 M latents x 32x8x8 x 4 B ~ 21 GB with
mirrors, arithmetic) costs disk, never memory. bfloat16 shards (``write_shard(..., dtype=torch.bfloat16)``,
manifest ``"dtype": "bfloat16"``) are read too, and handed out as float32.

Reading: ``LatentShards`` opens only shard headers at construction (counts and shapes are checked there) and
loads a shard whole on first use. When the whole data set fits in ``cache_bytes`` (default: a quarter of the
machine's available memory, at most 8 GiB) every shard stays loaded after first use; otherwise an LRU keeps
as many shards as fit (at least one). ``ShardAwareSampler`` visits the shards a window at a time so that
this LRU is hit, and splits every window between DDP ranks.
"""
from __future__ import annotations

import bisect
import json
import math
import operator
import os
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, Sampler

from latteflow.core.files import atomic_write, read_json, sha256_file

__all__ = ["FORMAT", "MANIFEST_NAME", "LatentShards", "ShardAwareSampler", "load_manifest", "shard_metadata", "shard_name",
           "write_manifest", "write_shard"]

MANIFEST_NAME = "manifest.json"
FORMAT = "latteflow-latents/1"
MANIFEST_KEYS = ("format", "resolution", "latent_shape", "scaling_factor", "flip", "classes", "prompts", "counts",
                 "num_latents", "shards", "vae", "skipped")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16"}
_META_KEY = "latteflow"


def shard_name(index: int) -> str:
    """``shard_00000.safetensors`` for ``index`` 0."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be an int >= 0, got {index!r}")
    return f"shard_{index:05d}.safetensors"


# ------------------------------------------------------------------------------------------------
# writing
def write_shard(folder: str | os.PathLike, index: int, latents: torch.Tensor, labels: torch.Tensor, *,
                dtype: torch.dtype = torch.float32, metadata: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Writes ``latents`` ``(n, C, h, w)`` (stored as ``dtype``: float32 or bfloat16) and ``labels`` ``(n,)``
    (stored as int64) atomically as shard ``index`` under ``folder``; ``metadata`` (str -> str) goes into the
    safetensors header as one JSON string with sorted keys (safetensors writes several header entries in
    a random order, and the same shard must be the same bytes), read back by ``shard_metadata``.
    Returns the manifest entry ``{"file", "count", "sha256"}``."""
    from safetensors.torch import save

    name = shard_name(index)
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or not latents.dtype.is_floating_point:
        raise ValueError(f"latents must be a floating (n, C, h, w) tensor, got {getattr(latents, 'shape', type(latents).__name__)}")
    if (not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point
            or labels.dtype == torch.bool or labels.shape[0] != latents.shape[0]):
        raise ValueError(f"labels must be an integer ({latents.shape[0]},) tensor, got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype!r}")
    if metadata is not None and (not isinstance(metadata, dict)
                                 or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise TypeError(f"metadata must be a dict of str to str, got {metadata!r}")
    if latents.shape[0] and not torch.isfinite(latents).all():
        raise ValueError(f"latents of {name} hold NaN or inf")
    tensors = {"latents": latents.detach().to("cpu", dtype).contiguous(),
               "labels": labels.detach().to("cpu", torch.int64).contiguous()}
    data = save(tensors, metadata=None if metadata is None else {_META_KEY: json.dumps(metadata, sort_keys=True)})
    path = os.path.join(os.fspath(folder), name)
    with atomic_write(path) as f:
        f.write(data)
    return {"file": name, "count": int(latents.shape[0]), "sha256": sha256_file(path)}


def write_manifest(folder: str | os.PathLike, manifest: Dict[str, Any]) -> str:
    """Checks ``manifest`` and writes it atomically as ``folder/manifest.json``; returns the path."""
    path = os.path.join(os.fspath(folder), MANIFEST_NAME)
    _check_manifest(manifest, "manifest")
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    return path


# ------------------------------------------------------------------------------------------------
# the manifest
def _is_int(v, lo: int = 0) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= lo


def _check_manifest(m, where: str) -> Dict[str, Any]:
    """Raises ValueError starting with ``where`` unless ``m`` is a well-formed manifest."""
    if not isinstance(m, dict):
        raise ValueError(f"{where}: must be a JSON object, got {type(m).__name__}")
    missing = [k for k in MANIFEST_KEYS if k not in m]
    if missing:
        raise ValueError(f"{where}: lacks the keys {missing}")
    if m["format"] != FORMAT:
        raise ValueError(f"{where}: format must be {FORMAT!r}, got {m['format']!r}")
    if m.get("dtype", "float32") not in _DTYPES:
        raise ValueError(f"{where}: dtype must be one of {sorted(_DTYPES)}, got {m.get('dtype')!r}")
    if not _is_int(m["resolution"], 1):
        raise ValueError(f"{where}: resolution must be a positive int, got {m['resolution']!r}")
    shape = m["latent_shape"]
    if not isinstance(shape, list) or len(shape) != 3 or not all(_is_int(v, 1) for v in shape):
        raise ValueError(f"{where}: latent_shape must be [C, h, w] of positive ints, got {shape!r}")
    sf = m["scaling_factor"]
    if isinstance(sf, bool) or not isinstance(sf, (int, float)) or not sf > 0 or not math.isfinite(sf):
        raise ValueError(f"{where}: scaling_factor must be a positive number, got {sf!r}")
    if not isinstance(m["flip"], bool):
        raise ValueError(f"{where}: flip must be true or false, got {m['flip']!r}")
    classes, prompts, counts = m["classes"], m["prompts"], m["counts"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{where}: classes must be a non-empty list of folder names, got {classes!r}")
    if classes != sorted(classes) or len(set(classes)) != len(classes):
        raise ValueError(f"{where}: classes must be sorted and distinct")
    if not isinstance(prompts, list) or len(prompts) != len(classes) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{where}: prompts must be a list of {len(classes)} strings, one per class")
    if not isinstance(counts, list) or len(counts) != len(classes) or not all(_is_int(c) for c in counts):
        raise ValueError(f"{where}: counts must be a list of {len(classes)} ints >= 0, one per class")
    shards = m["shards"]
    if not isinstance(shards, list):
        raise ValueError(f"{where}: shards must be a list, got {type(shards).__name__}")
    for i, s in enumerate(shards):
        if (not isinstance(s, dict) or not isinstance(s.get("file"), str) or os.path.basename(s["file"]) != s["file"]
                or not _is_int(s.get("count")) or not isinstance(s.get("sha256"), str) or len(s["sha256"]) != 64):
            raise ValueError(f"{where}: shards[{i}] must be {{'file': a plain file name, 'count': int, "
                             f"'sha256': hex}}, got {s!r}")
    n = m["num_latents"]
    if not _is_int(n) or n != sum(s["count"] for s in shards) or n != sum(counts):
        raise ValueError(f"{where}: num_latents {n!r} must equal the sum of the shard counts "
                         f"({sum(s['count'] for s in shards)}) and of the class counts ({sum(counts)})")
    vae = m["vae"]
    if not isinstance(vae, dict) or not isinstance(vae.get("folder"), str) or not isinstance(vae.get("sha256"), str):
        raise ValueError(f"{where}: vae must be {{'folder': path, 'sha256': hex}}, got {vae!r}")
    if not isinstance(m["skipped"], list) or not all(isinstance(s, list) and len(s) == 2 for s in m["skipped"]):
        raise ValueError(f"{where}: skipped must be a list of [path, reason] pairs")
    return m


def load_manifest(folder: str | os.PathLike) -> Dict[str, Any]:
    """The manifest of a prepare folder; ValueError naming the file when it is missing, not JSON, not an
    object or malformed (lacking keys, inconsistent counts)."""
    path = os.path.join(os.path.abspath(os.fspath(folder)), MANIFEST_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing (is {os.fspath(folder)!r} a folder written by `latteflow prepare`?)")
    return _check_manifest(read_json(path), path)


# ------------------------------------------------------------------------------------------------
# reading
def _default_cache_bytes() -> int:
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 8 << 30
    return int(min(avail // 4, 8 << 30))


def _shard_header(path: str) -> Tuple[Dict[str, Tuple[str, List[int]]], Dict[str, str]]:
    """``({name: (safetensors dtype, shape)}, metadata)`` from the header alone (no tensor data read)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            info = {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}
            return info, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types on a malformed file
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def shard_metadata(path: str) -> Dict[str, str]:
    """The ``metadata`` a shard was written with (``write_shard``), ``{}`` when none; ValueError naming the
    file when it is not a readable shard."""
    _, meta = _shard_header(path)
    if _META_KEY not in meta:
        return {}
    try:
        value = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed metadata ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: malformed metadata (not an object)")
    return value


class LatentShards(Dataset):
    """The latents of a prepare folder as a map-style dataset: ``ds[i] -> (latent float32 (C, h, w), label)``.

    Construction reads the manifest and every shard's header: a missing shard, or one whose count, latent
    shape or dtype disagrees with the manifest, is a ValueError naming the file. ``verify=True`` also checks
    each shard's SHA-256 (reads every byte once). Shards are loaded whole on first use and cached as the
    module docstring says (``cache_bytes`` overrides the budget)."""

    def __init__(self, folder: str | os.PathLike, *, verify: bool = False, cache_bytes: Optional[int] = None):
        if cache_bytes is not None and not _is_int(cache_bytes):
            raise ValueError(f"cache_bytes must be an int >= 0 or None, got {cache_bytes!r}")
        self.folder = os.path.abspath(os.fspath(folder))
        self.manifest = load_manifest(self.folder)
        m = self.manifest
        self.classes: List[str] = list(m["classes"])
        self.prompts: List[str] = list(m["prompts"])
        self.latent_shape: Tuple[int, int, int] = tuple(m["latent_shape"])
        self.resolution: int = m["resolution"]
        self.scaling_factor: float = float(m["scaling_factor"])
        dtype_name = m.get("dtype", "float32")
        self.dtype = _DTYPES[dtype_name]
        self._paths: List[str] = []
        self._counts: List[int] = []
        for entry in m["shards"]:
            path = os.path.join(self.folder, entry["file"])
            self._check_header(path, entry["count"], dtype_name)
            if verify:
                got = sha256_file(path)
                if got != entry["sha256"]:
                    raise ValueError(f"{path}: SHA-256 {got[:16]}... does not match the {entry['sha256'][:16]}... "
                                     f"recorded in {MANIFEST_NAME} (corrupt or modified)")
            if entry["count"]:
                self._paths.append(path)
                self._counts.append(entry["count"])
        self._starts = [0]
        for c in self._counts:
            self._starts.append(self._starts[-1] + c)
        per_latent = math.prod(self.latent_shape) * torch.empty((), dtype=self.dtype).element_size() + 8
        budget = _default_cache_bytes() if cache_bytes is None else cache_bytes
        biggest = max(self._counts, default=0) * per_latent
        if len(self) * per_latent <= budget:
            self.cached_shards = len(self._paths)
        else:
            self.cached_shards = max(1, budget // max(biggest, 1))
        self._cache: "OrderedDict[int, Tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()

    def _check_header(self, path: str, count: int, dtype_name: str) -> None:
        if not os.path.isfile(path):
            raise ValueError(f"{path}: missing (listed in {MANIFEST_NAME})")
        info, _ = _shard_header(path)
        if set(info) != {"latents", "labels"}:
            raise ValueError(f"{path}: must hold exactly 'latents' and 'labels', holds {sorted(info)}")
        (ldt, lshape), (bdt, bshape) = info["latents"], info["labels"]
        if lshape[1:] != list(self.latent_shape) or _ST_DTYPES.get(ldt) != dtype_name:
            raise ValueError(f"{path}: latents are {ldt} {lshape}, the manifest says {dtype_name} "
                             f"[n, {', '.join(map(str, self.latent_shape))}]")
        if bdt != "I64" or len(bshape) != 1 or bshape[0] != lshape[0]:
            raise ValueError(f"{path}: labels are {bdt} {bshape}, expected I64 [{lshape[0]}]")
        if lshape[0] != count:
            raise ValueError(f"{path}: holds {lshape[0]} latents, {MANIFEST_NAME} says {count}")

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def shard_ranges(self) -> List[Tuple[int, int]]:
        """``[(start, stop), ...]``: the dataset indices each non-empty shard holds, in file order."""
        return list(zip(self._starts[:-1], self._starts[1:]))

    def labels(self) -> torch.Tensor:
        """All labels, int64 ``(len(self),)``, in dataset order, reading only the ``labels`` tensor of each
        shard (8 bytes per latent: ~20 MB for ImageNet with mirrors; no latent is loaded)."""
        from safetensors import safe_open

        parts = []
        for path, count in zip(self._paths, self._counts):
            with safe_open(path, framework="pt") as f:
                labels = f.get_tensor("labels")
            if labels.shape != (count,):
                raise ValueError(f"{path}: holds {labels.shape[0]} labels, {MANIFEST_NAME} says {count}")
            parts.append(labels)
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def _shard(self, s: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        from safetensors.torch import load_file

        t = load_file(self._paths[s])
        latents, labels = t["latents"], t["labels"]
        if latents.shape[0] != self._counts[s]:  # replaced since construction
            raise ValueError(f"{self._paths[s]}: holds {latents.shape[0]} latents, {MANIFEST_NAME} says {self._counts[s]}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(self.classes)):
            raise ValueError(f"{self._paths[s]}: labels outside 0..{len(self.classes) - 1}")
        while len(self._cache) >= self.cached_shards:
            self._cache.popitem(last=False)
        self._cache[s] = (latents, labels)
        return latents, labels

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        if isinstance(i, bool) or not isinstance(i, int):
            try:
                i = operator.index(i)  # numpy / torch integer scalars
            except TypeError:
                raise TypeError(f"index must be an int, got {type(i).__name__}") from None
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} latents")
        s = bisect.bisect_right(self._starts, i) - 1
        latents, labels = self._shard(s)
        j = i - self._starts[s]
        return latents[j].to(torch.float32), int(labels[j])

    def __getstate__(self):  # DataLoader workers start with an empty cache
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state


# ------------------------------------------------------------------------------------------------
# sampling
class ShardAwareSampler(Sampler[int]):
    """Indices for one rank, an epoch at a time, reading shards a window at a time.

    Per epoch (``set_epoch``), with a generator seeded by ``seed + epoch``: the shards are put in a random
    order, cut into windows of ``window`` shards, and the indices of each window are shuffled together
    (``shuffle=False``: file order, no shuffling). The concatenated order is padded by repeating its start
    to a multiple of ``num_replicas`` (or cut down to one, ``drop_last=True``) and rank ``r`` takes every
    ``num_replicas``-th index from ``r``: the ranks' slices are disjoint (up to the padding), cover the data
    set, and every rank works through the same window of shards at the same time, so a ``LatentShards``
    that caches ``window`` shards reads each shard once per epoch. Same seed and epoch, same indices.

    ``data``: a ``LatentShards`` or a list of ``(start, stop)`` shard ranges. ``num_replicas`` and ``rank``
    default to the initialised ``torch.distributed`` group (else 1 and 0)."""

    def __init__(self, data, *, num_replicas: Optional[int] = None, rank: Optional[int] = None, shuffle: bool = True,
                 seed: int = 0, window: int = 4, drop_last: bool = False):
        ranges = data.shard_ranges if isinstance(data, LatentShards) else data
        if not isinstance(ranges, Sequence) or not all(
                isinstance(r, (tuple, list)) and len(r) == 2 and _is_int(r[0]) and _is_int(r[1]) and r[0] <= r[1]
                for r in ranges):
            raise TypeError(f"data must be a LatentShards or a list of (start, stop) ranges, got {type(data).__name__}")
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if dist else 1
        if rank is None:
            rank = torch.distributed.get_rank() if dist else 0
        if not _is_int(num_replicas, 1):
            raise ValueError(f"num_replicas must be a positive int, got {num_replicas!r}")
        if not _is_int(rank) or rank >= num_replicas:
            raise ValueError(f"rank must be an int in 0..{num_replicas - 1}, got {rank!r}")
        if not _is_int(window, 1):
            raise ValueError(f"window must be a positive int, got {window!r}")
        if not _is_int(seed):
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.ranges = [tuple(r) for r in ranges]
        self.num_replicas, self.rank, self.shuffle = num_replicas, rank, bool(shuffle)
        self.seed, self.window, self.drop_last, self.epoch = seed, window, bool(drop_last), 0
        n = sum(b - a for a, b in self.ranges)
        self.total_size = (n // num_replicas if drop_last else -(-n // num_replicas)) * num_replicas
        self.num_samples = self.total_size // num_replicas

    def set_epoch(self, epoch: int) -> None:
        if not _is_int(epoch):
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        k = len(self.ranges)
        order = torch.randperm(k, generator=g).tolist() if self.shuffle else list(range(k))
        parts = []
        for w in range(0, k, self.window):
            block = [torch.arange(*self.ranges[s]) for s in order[w:w + self.window]]
            block = torch.cat(block) if block else torch.empty(0, dtype=torch.int64)
            if self.shuffle:
                block = block[torch.randperm(len(block), generator=g)]
            parts.append(block)
        idx = torch.cat(parts).tolist() if parts else []
        if len(idx) < self.total_size:  # pad by repeating the start (more than once if the data set is tiny)
            idx = (idx * -(-self.total_size // max(len(idx), 1)))[:self.total_size]
        idx = idx[:self.total_size]
        return iter(idx[self.rank:self.total_size:self.num_replicas])
