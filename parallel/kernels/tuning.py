"""Kernel tile configs chosen once per shape and shared through a JSON file.

The fastest tiles of a Triton kernel depend on the GPU and the shape. Timed on
each rank separately, ranks may pick different tiles, and a restart may pick
others; different tiles sum in a different order, so results would no longer
be bitwise equal across ranks or across a restart. Here the first process
that meets a shape times the candidates while it holds an exclusive lock on
the file, and writes its choice there; every other process, and every later
run on the same file, reads that choice instead of timing.

Without a file the choices live in this process only. This file knows no run
directory: the trainer says which file to use (`use_config_file`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

Config = dict  # meta-parameters and launch options, e.g. {"BLOCK_M": 64, ..., "num_warps": 4}
FORMAT_VERSION = 1


class TileConfigTable:
    """The config of every (kernel, shape) key this process has met; `tuned` counts the keys
    it timed itself, `read` those it took from the file."""

    def __init__(self, path: Optional[Path] = None):
        self.path = path
        self.chosen: dict[str, Config] = {}
        self.tuned = 0
        self.read = 0

    def choose(self, key: str, candidates: list[Config], time_config: Callable[[Config], float]) -> Config:
        """The file's config for `key` if it has one of the candidates, else the fastest candidate
        by `time_config` (seconds; a candidate that fails, e.g. needs more shared memory than
        this GPU has, is passed over), written to the file for everyone else."""
        if key in self.chosen:
            return self.chosen[key]
        with self._locked():
            on_file = self._load()
            config = on_file.get(key)
            if config in candidates:
                self.read += 1
            else:
                config = fastest(candidates, time_config)
                self.tuned += 1
                if self.path is not None:
                    self._save({**on_file, key: config})
        self.chosen[key] = config
        return config

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self.path is None:
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # peers meeting the same shape wait for the choice
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> dict[str, Config]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            saved = json.loads(self.path.read_text())
        except json.JSONDecodeError:
            return {}  # never written whole (writes are atomic): tune again
        return saved.get("configs", {}) if saved.get("version") == FORMAT_VERSION else {}

    def _save(self, configs: dict[str, Config]) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": FORMAT_VERSION, "configs": configs}, indent=1, sort_keys=True))
        os.replace(tmp, self.path)  # readers see the old file or the new one, never half


def fastest(candidates: list[Config], time_config: Callable[[Config], float]) -> Config:
    if len(candidates) == 1:
        return candidates[0]
    timings, first_error = [], None
    for config in candidates:
        try:
            timings.append(time_config(config))
        except Exception as exc:  # e.g. out of registers or shared memory on this GPU
            timings.append(math.inf)
            first_error = first_error or exc
    if all(t == math.inf for t in timings):
        raise RuntimeError(f"no tile config runs here; the first failed with: {first_error}") from first_error
    return candidates[timings.index(min(timings))]


_table = TileConfigTable()


def use_config_file(path: Optional[os.PathLike]) -> None:
    """Keep tile configs in `path` (JSON) from now on, or in this process only (None). Starts
    from what the file holds: choices made before this call are forgotten."""
    global _table
    _table = TileConfigTable(Path(path) if path is not None else None)


def table() -> TileConfigTable:
    return _table
