"""Atomic file writes (readers, and a crash mid-write, see the old file or the new one, never half of one),
the SHA-256 of weight files, and JSON files read with an error naming them."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from typing import IO, Any, Dict, Iterator


def _fsync_dir(d: str) -> None:
    """Makes a rename in ``d`` durable (best effort: some filesystems refuse to fsync a directory)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Yields a file opened on a temporary sibling of ``path``; when the block ends without error the
    file is flushed, fsynced and moved over ``path`` with ``os.replace``; on error it is removed."""
    path = os.path.abspath(os.fspath(path))
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(d)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file at ``path``, read in 1 MiB chunks (what ``sha256sum`` prints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(folder: str | os.PathLike) -> Dict[str, Any]:
    """``{"sha256": hex, "files": {relative name: hex}}`` of the weight files (``*.safetensors``, ``*.bin``,
    ``*.pt``, ``*.pth``, ``*.ckpt``) under ``folder`` (a ``save_pretrained`` folder). With one weights file
    ``sha256`` is that file's digest (``sha256sum`` agrees); with several (sharded weights) it is the digest of
    the ``"<hex>  <name>\\n"`` lines in name order, i.e. of ``sha256sum`` output sorted by name.
    ValueError naming the folder when it holds no weights file."""
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: not a folder")
    names = []
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith(WEIGHT_SUFFIXES) and not name.startswith("."):
                names.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    if not names:
        raise ValueError(f"{folder}: holds no weights file ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")
    digests = {name: sha256_file(os.path.join(folder, name)) for name in sorted(names)}
    if len(digests) == 1:
        total = next(iter(digests.values()))
    else:
        total = hashlib.sha256("".join(f"{h}  {n}\n" for n, h in digests.items()).encode()).hexdigest()
    return {"sha256": total, "files": digests}


def read_json(path: str | os.PathLike, name: str | None = None) -> Any:
    """The JSON value in the UTF-8 file at ``path``; ValueError naming ``name`` (default: the path) when
    the file is not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{name or os.fspath(path)}: not JSON ({e})") from None
