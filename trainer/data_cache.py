"""The token cache: a corpus tokenised once, in parallel, into one memory-mapped file.

`cached_tokens(corpus, ...)` returns the path of a flat token file in the run
directory's `data/` folder holding every document of a `Corpus` (trainer/
data_documents.py), in order, each followed by the end-of-text token. The
file's name hashes what it was made from (the tokenizer, the text field, every
input file's path, size and modification time), so changed inputs tokenise
again and the same inputs never do.

Building it: `data.tokenize_workers` processes tokenise units in any order,
each into its own part file (written to a temporary name, then renamed), and
the parts are joined in corpus order into the final file, which appears only
by a rename. A build that is killed leaves finished parts that the next build
reuses and never a file that could be taken for the cache. A lock in the
folder makes one process build while the others (torchrun's ranks) wait.

`data.tokenizer` names a local tokenizer folder (or its tokenizer.json) as
transformers' `save_pretrained` writes it; the `tokenizers` library loads it
and nothing is downloaded. Without one, a document's tokens are its UTF-8
bytes and the end-of-text token is byte 0. This module must not import torch.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from atoll.trainer.data_documents import Corpus, DataError, Unit, read_documents

CACHE_FORMAT = 2  # part of every cache key: a change in how tokens are laid out tokenises again
BYTE_END_OF_TEXT = 0
PROGRESS_EVERY_S = 10.0  # a progress line this often when stderr is not a terminal
_END_OF_TEXT_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


def tokenizer_file(path: str) -> Path:
    p = Path(path)
    return p / "tokenizer.json" if p.is_dir() else p


def load_tokenizer(path: str, error: Callable[[str], Exception] = DataError):
    """The `tokenizers.Tokenizer` of a local folder or tokenizer.json."""
    file = tokenizer_file(path)
    if not file.is_file():
        raise error(f"data.tokenizer {path} has no tokenizer.json (a local folder as save_pretrained writes it)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise error("data.tokenizer needs the tokenizers library: pip install tokenizers") from None
    return Tokenizer.from_file(str(file))


def end_of_text(path: str, tokenizer) -> Optional[int]:
    """The id of the tokenizer's end-of-text token: tokenizer_config.json's eos_token, else a
    token with one of the usual names."""
    config = tokenizer_file(path).with_name("tokenizer_config.json")
    names = list(_END_OF_TEXT_NAMES)
    if config.is_file():
        token = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str):
            names.insert(0, token)
    return next((tokenizer.token_to_id(n) for n in names if tokenizer.token_to_id(n) is not None), None)


class Tokeniser:
    """Documents to one flat array of ids: each document's ids, then the end-of-text id."""

    def __init__(self, tokenizer_path: Optional[str], vocab_size: Optional[int] = None):
        self.tokenizer_path = tokenizer_path
        if tokenizer_path is None:
            self.tokenizer, self.vocab, self.end = None, 256, BYTE_END_OF_TEXT
        else:
            self.tokenizer = load_tokenizer(tokenizer_path)
            self.vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
            self.end = end_of_text(tokenizer_path, self.tokenizer)
            if self.end is None:
                raise DataError(f"data.tokenizer {tokenizer_path} names no end-of-text token "
                                "(eos_token in tokenizer_config.json)")
        if vocab_size is not None and self.vocab > vocab_size:
            raise DataError(f"data.tokenizer {tokenizer_path or '(bytes)'} has {self.vocab} tokens "
                            f"but model.vocab_size={vocab_size}")
        self.dtype = np.dtype(np.uint16 if self.vocab <= 2**16 else np.uint32)

    def identity(self) -> bytes:
        return tokenizer_file(self.tokenizer_path).read_bytes() if self.tokenizer_path else b"utf-8 bytes"

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.tokenizer is None:
            joined = b"\0".join(t.encode("utf-8", errors="replace") for t in texts) + b"\0"
            return np.frombuffer(joined, dtype=np.uint8).astype(self.dtype)
        ids: list[int] = []
        for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=False):
            ids += encoding.ids
            ids.append(self.end)
        return np.asarray(ids, dtype=self.dtype)


def cache_key(corpus: Corpus, tokeniser: Tokeniser, text_field: str) -> str:
    """What the tokens are made of; reading the inputs' metadata only, so it is cheap."""
    key = hashlib.sha256(f"{CACHE_FORMAT}:{text_field}:".encode() + tokeniser.identity())
    key.update(corpus.identity().encode())
    return key.hexdigest()[:20]


def cached_tokens(corpus: Corpus, tokenizer_path: Optional[str], text_field: str, cache_dir: Path,
                  vocab_size: Optional[int] = None, workers: Optional[int] = None, what: str = "data") -> Path:
    """The token file of `corpus`, tokenised now unless a process already did (or is doing it)."""
    tokeniser = Tokeniser(tokenizer_path, vocab_size)
    target = cache_dir / f"tokens-{cache_key(corpus, tokeniser, text_field)}.{tokeniser.dtype.name}"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".tokenise.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process tokenises; the others wait, then map it
        if not target.exists():
            _build(corpus.units(), tokeniser, text_field, target, workers or default_workers(), what)
    return target


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# --------------------------------------------------------------------------- building


def _build(units: list[Unit], tokeniser: Tokeniser, text_field: str, target: Path, workers: int,
           what: str) -> None:
    # The parts of another cut of the same files (another range size) must not be mixed in.
    cut = hashlib.sha256(repr(units).encode()).hexdigest()[:8]
    parts = target.with_name(f"{target.name}.parts-{cut}")
    for other in target.parent.glob(f"{target.name}.parts-*"):
        if other != parts:
            shutil.rmtree(other, ignore_errors=True)
    parts.mkdir(exist_ok=True)
    for stale in [*parts.glob("*.tmp"), *target.parent.glob(f".{target.name}.*.tmp")]:
        stale.unlink()  # half-written by a build that was killed
    done = {int(p.name.split(".")[0]) for p in parts.iterdir()}
    pending = [i for i in range(len(units)) if i not in done]
    progress = _Progress(what, sum(u.size for u in units), sum(units[i].size for i in done), len(units))
    jobs = [(i, units[i], str(parts)) for i in pending]
    workers = max(1, min(workers, len(jobs)))
    if workers == 1:
        _start_worker(tokeniser, text_field)
        for result in map(_tokenise_unit, jobs):
            progress.update(units[result[0]].size, *result[1:])
    else:
        context = multiprocessing.get_context("spawn")  # the driver may hold threads (Ray, wandb)
        with context.Pool(workers, initializer=_start_worker, initargs=(tokeniser.tokenizer_path, text_field)) as pool:
            for result in pool.imap_unordered(_tokenise_unit, jobs):
                progress.update(units[result[0]].size, *result[1:])
    total = _join_parts(sorted(parts.iterdir(), key=lambda p: int(p.name.split(".")[0])), target, what)
    shutil.rmtree(parts, ignore_errors=True)
    progress.close(total)


def _join_parts(part_files: list[Path], target: Path, what: str) -> int:
    """Concatenate the parts into the cache file; it appears only when complete."""
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(temp, "wb") as out:
        for part in part_files:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
        out.flush()
        os.fsync(out.fileno())
        size = out.tell()
    if size == 0:
        temp.unlink()
        raise DataError(f"{what} has no documents")
    os.replace(temp, target)
    return size // np.dtype(target.suffix.lstrip(".")).itemsize


_WORKER: dict = {}


def _start_worker(tokeniser, text_field: str) -> None:
    """In a tokenising process: the tokenizer (rebuilt from its path in a spawned process)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per worker, as asked
    if not isinstance(tokeniser, Tokeniser):
        tokeniser = Tokeniser(tokeniser)
    _WORKER.update(tokeniser=tokeniser, text_field=text_field)


def _tokenise_unit(job: tuple[int, Unit, str]) -> tuple[int, int, int, int]:
    """Tokenise one unit into its part file; returns (index, documents, text bytes, tokens)."""
    index, unit, parts = job
    tokeniser, text_field = _WORKER["tokeniser"], _WORKER["text_field"]
    documents = text_bytes = tokens = 0
    part = Path(parts) / f"{index:06d}.{tokeniser.dtype.name}"
    temp = part.with_name(f"{part.name}.{os.getpid()}.tmp")
    with open(temp, "wb") as out:
        for texts in read_documents(unit, text_field):
            ids = tokeniser.encode(texts)
            out.write(ids.tobytes())
            documents += len(texts)
            text_bytes += sum(len(t) for t in texts)  # characters: close to bytes, and free
            tokens += ids.size
        out.flush()
        os.fsync(out.fileno())  # a part that has its name is whole, even after a crash
    os.replace(temp, part)
    return index, documents, text_bytes, tokens


class _Progress:
    """A progress line on stderr while tokenising: documents, MB/s of input, ETA."""

    def __init__(self, what: str, total_bytes: int, done_bytes: int, units: int):
        self.what, self.documents, self.text = what, 0, 0
        self.total, self.initial, self.done = total_bytes, done_bytes, done_bytes
        self.started = self.printed = time.perf_counter()
        resumed = f" (resuming: {done_bytes / 1e6:,.1f} MB done)" if done_bytes else ""
        print(f"tokenising {what}: {total_bytes / 1e6:,.1f} MB in {units} piece{'s' if units != 1 else ''}{resumed}", flush=True)
        from tqdm import tqdm

        self.bar = tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, desc="tokenising",
                        file=sys.stderr, mininterval=1.0, disable=not sys.stderr.isatty(), dynamic_ncols=True)

    def update(self, size: int, documents: int, text: int, tokens: int) -> None:
        self.documents += documents
        self.text += text
        self.done += size
        self.bar.update(size)
        self.bar.set_postfix_str(f"{self.documents:,} documents", refresh=False)
        now = time.perf_counter()
        if self.bar.disable and now - self.printed >= PROGRESS_EVERY_S:  # a log, not a terminal
            self.printed = now
            done, total = self.done, self.total
            rate = (done - self.initial) / max(now - self.started, 1e-9)
            eta = (total - done) / rate if rate > 0 else float("inf")
            print(f"tokenising {self.what}: {done / 1e6:,.1f}/{total / 1e6:,.1f} MB, {self.documents:,} "
                  f"documents, {rate / 1e6:,.1f} MB/s, ETA {eta:,.0f} s", flush=True)

    def close(self, tokens: int) -> None:
        self.bar.close()
        seconds = time.perf_counter() - self.started
        print(f"tokenised {self.what}: {self.documents:,} documents, {tokens:,} tokens in {seconds:.1f} s "
              f"({self.text / 1e6 / max(seconds, 1e-9):,.1f} MB/s of text)", flush=True)
