"""The manifest: what makes a folder of files a checkpoint, and how it is checked.

`manifest.json` is written last, via tmp + fsync + rename, and lists every
other file of the checkpoint with its size and SHA-256, the tensor index
(global names, shapes and dtypes), the non-tensor state as JSON, the step,
the samples consumed, the layout it was saved with and the recipe. Anything
without a valid manifest is not a checkpoint; `verify` re-hashes every file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_HASH_CHUNK = 8 * 1024 * 1024


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or does not fit; one line naming it."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)  # hashlib drops the GIL on large buffers
    return digest.hexdigest()


def data_files(ckpt_dir: Path) -> list[Path]:
    """Every file of a checkpoint except the manifest, sorted by relative path."""
    return sorted(p for p in ckpt_dir.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"))


def write_manifest(ckpt_dir: Path, *, step: int, samples: int, layout: dict, recipe: dict,
                   tensors: dict[str, dict], state: dict[str, Any], extra: Optional[dict] = None,
                   known_hashes: Optional[dict[str, tuple[int, str]]] = None) -> dict:
    """List every data file with its size and hash, then write the manifest last, atomically.

    `known_hashes` (relative path -> (size, SHA-256)) are the writers' own, computed as they
    wrote: a file of that size is not read again; any other file is hashed here."""
    files = {}
    known_hashes = known_hashes or {}
    for path in data_files(ckpt_dir):
        name, size = path.relative_to(ckpt_dir).as_posix(), path.stat().st_size
        known = known_hashes.get(name)
        files[name] = {"size": size, "sha256": known[1] if known is not None and known[0] == size
                       else hash_file(path)}
    manifest = {"format_version": FORMAT_VERSION, "step": step, "samples": samples,
                "created": time.time(), "layout": layout, "recipe": recipe,
                "tensors": tensors, "state": state, "files": files, **(extra or {})}
    # One line: json's C encoder only serves indent=None, and the Python one costs the commit
    # tens of milliseconds of GIL beside training. `atoll ckpt inspect` summarises it for people.
    atomic_write_text(ckpt_dir / MANIFEST, json.dumps(manifest, sort_keys=True))
    return manifest


def read_manifest(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / MANIFEST
    if not Path(ckpt_dir).is_dir():
        raise CheckpointError(f"checkpoint {ckpt_dir} does not exist")
    if not path.exists():
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {MANIFEST} (not committed)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {MANIFEST} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {ckpt_dir}: unsupported format version {version!r}")
    for key in ("step", "files", "tensors", "state"):
        if key not in manifest:
            raise CheckpointError(f"checkpoint {ckpt_dir}: {MANIFEST} lacks '{key}'")
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {MANIFEST} lists no files")
    for name, info in files.items():
        if not (isinstance(info, dict) and isinstance(info.get("size"), int)
                and isinstance(info.get("sha256"), str)):
            raise CheckpointError(f"checkpoint {ckpt_dir}: {MANIFEST} has a malformed entry "
                                  f"for file {name!r}")
    if not isinstance(manifest["step"], int):
        raise CheckpointError(f"checkpoint {ckpt_dir}: {MANIFEST} has a malformed step")
    return manifest


def verify(ckpt_dir: Path, manifest: Optional[dict] = None) -> dict:
    """Check every listed file's size and hash; raise naming the first bad file."""
    ckpt_dir = Path(ckpt_dir)
    manifest = manifest or read_manifest(ckpt_dir)
    for name, info in sorted(manifest["files"].items()):
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt_dir}: file {name} is missing")
        size = path.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"checkpoint {ckpt_dir}: file {name} has {size} bytes, "
                                  f"the manifest says {info['size']} (truncated or overwritten)")
        if hash_file(path) != info["sha256"]:
            raise CheckpointError(f"checkpoint {ckpt_dir}: file {name} does not match its hash "
                                  "(corrupt)")
    return manifest
