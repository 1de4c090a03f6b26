"""Training data: tokens, a deterministic sample order, and per-rank sharding.

Turns a `DataConfig` into a 1-D token stream (Python stdlib sources, a folder
of text files as bytes, a flat pre-tokenised file read through a memmap, or a
folder of text tokenised once with a local tokenizer: trainer/text_data.py), cuts it
into fixed windows of `seq_len + 1` tokens, and hands each data-parallel rank
its share of every step (DESIGN §4): step `s` consumes global samples
`[s·B, (s+1)·B)`, B = micro_batch × grad_accum × dp, and the order is a pure
function of (seed, epoch, global index). The loader's only state is the number
of samples consumed, so a resume under another layout neither skips nor
repeats a sample. DiLoCo islands share one order and take turns: island k's
step s reads global samples `[(s·M + k)·B, (s·M + k + 1)·B)` of M islands.

This module must not know about process groups (dp rank and size are plain
ints), models (only `vocab_size` as an int) or checkpoint files (it offers
`state_dict()` / `load_state_dict()` and nothing more).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from atoll.trainer.config import DataConfig
from atoll.trainer.text_data import text_tokens, tokenizer_file

SEPARATOR = 0  # byte placed after every file so documents do not run together
_TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_SKIP_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


class DataError(ValueError):
    """A data problem a user must fix; the message is one line."""


class ByteTokenizer:
    """Byte-level tokenizer: token id = UTF-8 byte. Needs no download."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        return np.asarray(ids).reshape(-1).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- sources


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


def check_data_paths(cfg: DataConfig) -> None:
    """The files the data section names exist: cheap enough for the driver and every rank
    to call before anything starts, so a wrong path is one line, not a failed worker."""
    if cfg.source not in ("folder", "tokens", "text"):
        return
    if not cfg.path:
        raise DataError(f"data.path is required when data.source={cfg.source}")
    path = Path(cfg.path)
    if not path.exists():
        raise DataError(f"data.path {cfg.path} does not exist")
    if cfg.source == "tokens" and not path.is_file():
        raise DataError(f"data.path {cfg.path} is not a file (data.source=tokens reads a flat token file)")
    if cfg.source != "tokens" and not path.is_dir():
        raise DataError(f"data.path {cfg.path} is not a folder (data.source={cfg.source} reads every file in it)")
    if cfg.source == "text":
        if not cfg.tokenizer:
            raise DataError("data.source=text needs data.tokenizer (a local tokenizer folder)")
        if not Path(cfg.tokenizer).exists():
            raise DataError(f"data.tokenizer {cfg.tokenizer} does not exist")
        if not tokenizer_file(cfg.tokenizer).is_file():
            raise DataError(f"data.tokenizer {cfg.tokenizer} has no tokenizer.json "
                            "(a local folder as save_pretrained writes it)")


def _folder_tokens(path: str, max_bytes: int) -> np.ndarray:
    tokens = _concat_files(_walk_files(Path(path), set(), None), max_bytes)
    if tokens.size == 0:
        raise DataError(f"data.path {path} has no readable text files")
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


def _text_tokens(cfg: DataConfig, vocab_size: Optional[int], cache_dir: Optional[Path]) -> np.ndarray:
    root = Path(cfg.path)
    files = _walk_files(root, set(), None)
    if not files:
        raise DataError(f"data.path {cfg.path} has no text files")
    if cache_dir is None:
        raise DataError("data.source=text needs a run directory to cache its tokens in")
    cached = text_tokens(root, files, cfg.tokenizer, vocab_size, cfg.max_bytes, cache_dir, DataError)
    return _file_tokens(str(cached), cached.suffix.lstrip("."))


def load_tokens(cfg: DataConfig, vocab_size: Optional[int] = None, cache_dir: Optional[Path] = None) -> np.ndarray:
    """The whole token stream of the recipe's data source, as a 1-D integer array.
    `cache_dir` holds what `data.source: text` tokenised (in the run directory)."""
    if cfg.max_bytes <= 0:
        raise DataError("data.max_bytes must be positive")
    if cfg.source == "stdlib":
        return _stdlib_tokens(cfg.max_bytes)
    check_data_paths(cfg)
    if cfg.source == "folder":
        return _folder_tokens(cfg.path, cfg.max_bytes)
    if cfg.source == "tokens":
        return _file_tokens(cfg.path, cfg.token_dtype)
    if cfg.source == "text":
        return _text_tokens(cfg, vocab_size, cache_dir)
    raise DataError(f"data.source must be stdlib, folder, tokens or text, not {cfg.source}")


# --------------------------------------------------------------------------- order


class TokenDataset:
    """Non-overlapping windows of seq_len+1 tokens; the last ones are validation."""

    def __init__(self, tokens: np.ndarray, seq_len: int, val_fraction: float, seed: int):
        if seq_len < 1:
            raise DataError("data.seq_len must be at least 1")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.window = seq_len + 1
        n_windows = len(tokens) // self.window
        self.num_val = max(1, round(val_fraction * n_windows))
        self.num_train = n_windows - self.num_val
        if self.num_train < 1:
            raise DataError(
                f"the data has {len(tokens)} tokens, too few for one sample of "
                f"data.seq_len+1={self.window} tokens plus a validation split"
            )
        self._perm_epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> np.ndarray:
        """Order of train windows in an epoch; a pure function of (seed, epoch)."""
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_train)
            self._perm_epoch = epoch
        return self._perm

    def _window(self, w: int) -> np.ndarray:
        return np.asarray(self.tokens[w * self.window : (w + 1) * self.window], dtype=np.int64)

    def train_window(self, g: int) -> int:
        """Index of the window that global train sample g reads."""
        if g < 0:
            raise IndexError(f"global sample index {g} is negative")
        epoch, pos = divmod(g, self.num_train)
        return int(self.permutation(epoch)[pos])

    def train_sample(self, g: int) -> np.ndarray:
        return self._window(self.train_window(g))

    def val_sample(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_val:
            raise IndexError(f"validation index {i} not in [0, {self.num_val})")
        return self._window(self.num_train + i)


def step_sample_indices(
    samples_consumed: int, micro_batch: int, grad_accum: int, dp_rank: int, dp_size: int
) -> list[list[int]]:
    """Global sample indices of this rank's micro-batches for the step starting at samples_consumed.

    The step's global batch B = micro_batch·grad_accum·dp_size; rank r takes the
    contiguous block [r·B/dp, (r+1)·B/dp) and cuts it into grad_accum micro-batches.
    """
    if micro_batch < 1 or grad_accum < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"bad batch layout: micro_batch={micro_batch} grad_accum={grad_accum} "
                         f"dp_rank={dp_rank} dp_size={dp_size}")
    start = samples_consumed + dp_rank * micro_batch * grad_accum
    return [[start + k * micro_batch + j for j in range(micro_batch)] for k in range(grad_accum)]


def _to_batch(rows: list[np.ndarray], vocab_size: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    x_BL = np.stack(rows)
    if vocab_size is not None:
        top = int(x_BL.max())
        if top >= vocab_size:
            raise DataError(f"token id {top} in the data is >= model.vocab_size={vocab_size}")
    x_BL = torch.from_numpy(x_BL)
    return x_BL[:, :-1].contiguous(), x_BL[:, 1:].contiguous()


class DataLoader:
    """This rank's micro-batches, step after step; state is samples consumed (layout-free)."""

    def __init__(self, dataset: TokenDataset, micro_batch: int, grad_accum: int, dp_rank: int,
                 dp_size: int, vocab_size: Optional[int] = None, island: int = 0, islands: int = 1):
        step_sample_indices(0, micro_batch, grad_accum, dp_rank, dp_size)  # validates the layout
        self.dataset, self.micro_batch, self.grad_accum = dataset, micro_batch, grad_accum
        self.dp_rank, self.dp_size, self.vocab_size = dp_rank, dp_size, vocab_size
        self.island, self.islands = island, islands
        self.samples_consumed = 0  # of this island's stream

    def stream_index(self, i: int) -> int:
        """Global sample of this island's i-th: islands take turns, one global batch each."""
        batch = self.global_batch
        return (i // batch) * batch * self.islands + self.island * batch + i % batch

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp_size

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (inputs_BS, targets_BS) per micro-batch; advances by the global batch."""
        groups = step_sample_indices(self.samples_consumed, self.micro_batch, self.grad_accum,
                                     self.dp_rank, self.dp_size)
        batches = [_to_batch([self.dataset.train_sample(self.stream_index(i)) for i in idx], self.vocab_size)
                   for idx in groups]
        self.samples_consumed += self.global_batch
        return batches

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed}

    def load_state_dict(self, state: dict) -> None:
        n = int(state["samples_consumed"])
        if n < 0:
            raise ValueError(f"samples_consumed must be >= 0, not {n}")
        self.samples_consumed = n


def val_batches(dataset: TokenDataset, micro_batch: int, num_batches: int, dp_rank: int, dp_size: int,
                vocab_size: Optional[int] = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of a fixed validation set of num_batches·micro_batch·dp_size windows."""
    groups = step_sample_indices(0, micro_batch, num_batches, dp_rank, dp_size)
    return [_to_batch([dataset.val_sample(i % dataset.num_val) for i in idx], vocab_size) for idx in groups]


def build_data(cfg: DataConfig, seed: int, dp_rank: int, dp_size: int, vocab_size: int, island: int = 0,
               islands: int = 1, cache_dir: Optional[Path] = None) -> tuple[TokenDataset, DataLoader]:
    """Dataset and this rank's loader for a recipe's data section (and its DiLoCo island)."""
    dataset = TokenDataset(load_tokens(cfg, vocab_size, cache_dir), cfg.seq_len, cfg.val_fraction, seed)
    loader = DataLoader(dataset, cfg.micro_batch, cfg.grad_accum, dp_rank, dp_size, vocab_size=vocab_size,
                        island=island, islands=islands)
    return dataset, loader
