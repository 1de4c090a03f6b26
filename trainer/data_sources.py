"""Data sources: what each `data.source` (and each `data.mixture` entry) reads, as one token stream.

- `stdlib`: the Python standard library's own .py files, as bytes (needs nothing).
- `folder`: every file in a folder, as bytes, each followed by byte 0.
- `tokens`: a flat file of pre-tokenised ids (uint16 or uint32), memory-mapped.
- `text`: every file in a folder, tokenised with `data.tokenizer` into the token cache.
- `dataset`: the documents of jsonl / parquet / arrow files or a `save_to_disk` folder
  (trainer/data_documents.py), tokenised into the token cache (trainer/data_cache.py).

`check_data_paths` only stats, so the driver and every rank can call it before
anything starts; `prepare_tokens` builds the caches (the driver calls it, so a
bad record stops the run before any worker starts); `load_tokens` returns a
source's tokens, mapping a cache that exists. A mixture entry is a `DataConfig`
with its own source, path and text field (`source_configs`).
This module must not know about process groups or models.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
from pathlib import Path
from typing import Optional

import numpy as np

from atoll.trainer.config import DataConfig
from atoll.trainer.data_cache import cached_tokens, tokenizer_file
from atoll.trainer.data_documents import Corpus, DataError, corpus_files, open_corpus

SEPARATOR = 0  # byte placed after every file so documents do not run together
CACHED_SOURCES = ("text", "dataset")  # tokenised once into the run directory's token cache
_TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_SKIP_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def source_configs(cfg: DataConfig) -> list[tuple[Optional[str], float, DataConfig]]:
    """(name, weight, source) of every source: the mixture's entries, or the one source (no name)."""
    if not cfg.mixture:
        return [(None, 1.0, cfg)]
    sources = []
    for entry in cfg.mixture:
        entry = entry if isinstance(entry, dict) else dataclasses.asdict(entry)
        sources.append((entry["name"], float(entry["weight"]), dataclasses.replace(
            cfg, mixture=None, source=entry["source"], path=entry.get("path"),
            text_field=entry.get("text_field") or cfg.text_field,
            token_dtype=entry.get("token_dtype") or cfg.token_dtype)))
    return sources


def _key(name: Optional[str], key: str) -> str:
    return f"data.mixture[{name}].{key}" if name else f"data.{key}"


# --------------------------------------------------------------------------- checks


def check_data_paths(cfg: DataConfig) -> None:
    """The files every source names exist: a wrong path is one line, not a failed worker."""
    for name, _, source in source_configs(cfg):
        _check_source_paths(source, name)
    if cfg.tokenizer:
        if not Path(cfg.tokenizer).exists():
            raise DataError(f"data.tokenizer {cfg.tokenizer} does not exist")
        if not tokenizer_file(cfg.tokenizer).is_file():
            raise DataError(f"data.tokenizer {cfg.tokenizer} has no tokenizer.json "
                            "(a local folder as save_pretrained writes it)")


def _check_source_paths(cfg: DataConfig, name: Optional[str]) -> None:
    if cfg.source == "stdlib":
        return
    key = _key(name, "path")
    if not cfg.path:
        raise DataError(f"{key} is required when {_key(name, 'source')}={cfg.source}")
    if cfg.source == "dataset":
        corpus_files(cfg.path, key)  # a file, a folder or a glob of corpus files
        return
    path = Path(cfg.path)
    if not path.exists():
        raise DataError(f"{key} {cfg.path} does not exist")
    if cfg.source == "tokens" and not path.is_file():
        raise DataError(f"{key} {cfg.path} is not a file ({_key(name, 'source')}=tokens reads a flat token file)")
    if cfg.source != "tokens" and not path.is_dir():
        raise DataError(f"{key} {cfg.path} is not a folder ({_key(name, 'source')}={cfg.source} "
                        "reads every file in it)")
    if cfg.source == "text" and not cfg.tokenizer:
        raise DataError(f"{_key(name, 'source')}=text needs data.tokenizer (a local tokenizer folder)")


# --------------------------------------------------------------------------- tokens


def prepare_tokens(cfg: DataConfig, vocab_size: Optional[int], cache_dir: Path) -> None:
    """Tokenise every cached source now (in the driver, before any worker starts)."""
    for name, _, source in source_configs(cfg):
        if source.source in CACHED_SOURCES:
            load_tokens(source, vocab_size, cache_dir, name)


def load_tokens(cfg: DataConfig, vocab_size: Optional[int] = None, cache_dir: Optional[Path] = None,
                name: Optional[str] = None) -> np.ndarray:
    """The whole token stream of one source, as a 1-D integer array (a memory map where it can be).
    `cache_dir` holds what `text` and `dataset` tokenised (in the run directory)."""
    if cfg.max_bytes <= 0:
        raise DataError("data.max_bytes must be positive")
    if cfg.source == "stdlib":
        return _stdlib_tokens(cfg.max_bytes)
    _check_source_paths(cfg, name)
    if cfg.source == "folder":
        return _folder_tokens(cfg.path, cfg.max_bytes, _key(name, "path"))
    if cfg.source == "tokens":
        return _file_tokens(cfg.path, cfg.token_dtype)
    if cfg.source in CACHED_SOURCES:
        if cache_dir is None:
            raise DataError(f"{_key(name, 'source')}={cfg.source} needs a run directory to cache its tokens in")
        if cfg.source == "text":
            files = _walk_files(Path(cfg.path), set(), None)
            if not files:
                raise DataError(f"{_key(name, 'path')} {cfg.path} has no text files")
            corpus = Corpus(tuple(files), cfg.max_bytes)
        else:
            corpus = open_corpus(cfg.path, _key(name, "path"))
        what = f"{name or 'data'} ({cfg.path})"
        cached = cached_tokens(corpus, cfg.tokenizer, cfg.text_field, cache_dir, vocab_size,
                               cfg.tokenize_workers, what)
        return _file_tokens(str(cached), cached.suffix.lstrip("."))
    raise DataError(f"{_key(name, 'source')} must be stdlib, folder, tokens, text or dataset, not {cfg.source}")


def _walk_files(root: Path, skip_dirs: set, suffix: Optional[str]) -> list[Path]:
    """Regular files under root, non-hidden, sorted by relative path (not walk order)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
        for name in filenames:
            if name.startswith(".") or (suffix and not name.endswith(suffix)):
                continue
            p = Path(dirpath, name)
            if p.is_file():
                found.append(p)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _concat_files(files: list[Path], max_bytes: int) -> np.ndarray:
    """Each file's bytes then SEPARATOR, stopping at max_bytes in total."""
    chunks, total, sep = [], 0, bytes([SEPARATOR])
    for p in files:
        if total >= max_bytes:
            break
        try:
            raw = p.read_bytes()
        except OSError:
            continue  # unreadable file: skip, as if absent
        if not raw:
            continue
        chunk = raw + sep
        chunks.append(chunk[: max_bytes - total])
        total += len(chunks[-1])
    return np.frombuffer(b"".join(chunks), dtype=np.uint8).astype(np.uint16)


def _stdlib_tokens(max_bytes: int) -> np.ndarray:
    root = Path(sysconfig.get_paths()["stdlib"])
    return _concat_files(_walk_files(root, _SKIP_STDLIB_DIRS, ".py"), max_bytes)


def _folder_tokens(path: str, max_bytes: int, key: str) -> np.ndarray:
    tokens = _concat_files(_walk_files(Path(path), set(), None), max_bytes)
    if tokens.size == 0:
        raise DataError(f"{key} {path} has no readable text files")
    return tokens


def _file_tokens(path: str, token_dtype: str) -> np.ndarray:
    if token_dtype not in _TOKEN_DTYPES:
        raise DataError(f"data.token_dtype must be uint16 or uint32, not {token_dtype}")
    p = Path(path)
    dtype = np.dtype(_TOKEN_DTYPES[token_dtype])
    size = p.stat().st_size
    if size == 0:
        raise DataError(f"token file {path} is empty")
    if size % dtype.itemsize:
        raise DataError(f"token file {path} has {size} bytes, not a multiple of {dtype.itemsize} ({token_dtype})")
    return np.memmap(p, dtype=dtype, mode="r")
