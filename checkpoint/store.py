"""The checkpoints folder of a run: commit, `latest`, retention and discovery.

    checkpoints/step-00000100.partial/   being written (never loaded)
    checkpoints/step-00000100/           committed: manifest.json + data files
    checkpoints/latest                   names the newest committed checkpoint

A save becomes a checkpoint in three atomic steps: the manifest is written
into the `.partial` folder, the folder is renamed, then `latest` is
rewritten. Retention removes a checkpoint only after a newer one is
committed and never the newest valid one. Loading verifies hashes and falls
back, one line per rejected checkpoint, to the newest valid one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

from atoll.checkpoint.manifest import (MANIFEST, CheckpointError, atomic_write_text, fsync_dir,
                                       read_manifest, verify)

LATEST = "latest"
PARTIAL_SUFFIX = ".partial"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def partial_dir(root: Path, step: int) -> Path:
    return Path(root) / (step_dir_name(step) + PARTIAL_SUFFIX)


def commit(root: Path, step: int) -> Path:
    """Publish a `.partial` folder whose manifest is written; returns the final folder."""
    root = Path(root)
    src, dst = partial_dir(root, step), root / step_dir_name(step)
    if not (src / MANIFEST).exists():
        raise CheckpointError(f"cannot commit {src}: it has no {MANIFEST}")
    if dst.exists():  # a stale copy of the same step from an earlier attempt
        shutil.rmtree(dst)
    os.replace(src, dst)
    fsync_dir(root)
    atomic_write_text(root / LATEST, dst.name + "\n")
    return dst


def committed(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every folder that looks committed, oldest first (not verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / MANIFEST).exists():
            found.append((int(match.group(1)), path))
    return sorted(found)


def remove_partials(root: Path) -> list[Path]:
    """Drop `.partial` folders left by a save that never committed (call when none is in flight)."""
    removed = []
    for path in Path(root).glob(f"step-*{PARTIAL_SUFFIX}") if Path(root).is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def apply_retention(root: Path, keep: int, keep_every: int) -> list[Path]:
    """Keep the newest `keep` checkpoints and every `keep_every`-th step; delete the rest."""
    entries = committed(root)
    if not entries or keep <= 0:
        return []
    keep_steps = {step for step, _ in entries[-keep:]}
    if keep_every:
        keep_steps |= {step for step, _ in entries if step % keep_every == 0}
    latest = read_latest(root)
    removed = []
    for step, path in entries[:-1]:  # never the newest, never what `latest` names
        if step not in keep_steps and path != latest:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def read_latest(root: Path) -> Optional[Path]:
    path = Path(root) / LATEST
    if not path.exists():
        return None
    name = path.read_text(encoding="utf-8").strip()
    return Path(root) / name if name else None


def find_resumable(root: Path, warn: Callable[[str], None] = print,
                   skipped: Callable[[Path, str], None] = lambda path, reason: None
                   ) -> Optional[tuple[Path, dict]]:
    """The newest checkpoint that verifies: `latest` first, then older ones by step.

    `skipped(path, reason)` hears of every damaged checkpoint passed over."""
    root = Path(root)
    candidates: list[Path] = []
    latest = read_latest(root)
    if latest is not None:
        candidates.append(latest)
    candidates += [path for _, path in reversed(committed(root)) if path != latest]
    for partial in root.glob(f"step-*{PARTIAL_SUFFIX}") if root.is_dir() else []:
        warn(f"ignoring {partial}: a save that never committed")
    for candidate in candidates:
        try:
            return candidate, verify(candidate, read_manifest(candidate))
        except CheckpointError as exc:
            warn(f"skipping checkpoint: {exc}")
            skipped(candidate, str(exc))
    if candidates:  # starting afresh would silently throw the run away
        raise CheckpointError(f"no valid checkpoint in {root} ({len(candidates)} damaged); "
                              "pass run.overwrite=true to start afresh")
    return None


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder, a checkpoints folder (its `latest`) or a run folder."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    for root in (path, path / "checkpoints"):
        latest = read_latest(root)
        if latest is not None:
            return latest
        entries = committed(root)
        if entries:
            return entries[-1][1]
    if path.name.endswith(PARTIAL_SUFFIX):
        raise CheckpointError(f"{path} is a save that never committed, not a checkpoint")
    raise CheckpointError(f"no checkpoint at {path} (no {MANIFEST}, no {LATEST})")
