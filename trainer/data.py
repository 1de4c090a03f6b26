"""Training data: a deterministic sample order over the sources, and per-rank sharding.

The sources (trainer/data_sources.py) give 1-D token streams; each is cut into
fixed windows of `seq_len + 1` tokens, the last ones held out for validation.
A `data.mixture` reads several sources in fixed proportions
(trainer/data_mixture.py). Each data-parallel rank takes its share of every
step (DESIGN §4): step `s` consumes global samples `[s·B, (s+1)·B)`,
B = micro_batch × grad_accum × dp, and the order is a pure function of
(seed, epoch, global index). The loader's only state is the number of samples
consumed, so a resume under another layout neither skips nor repeats a
sample. DiLoCo islands share one order and take turns: island k's step s
reads global samples `[(s·M + k)·B, (s·M + k + 1)·B)` of M islands.

This module must not know about process groups (dp rank and size are plain
ints), models (only `vocab_size` as an int) or checkpoint files (it offers
`state_dict()` / `load_state_dict()` and nothing more).
"""

from __future__ import annotations

import time
import zlib
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from atoll.trainer.config import DataConfig
from atoll.trainer.data_documents import DataError
from atoll.trainer.data_mixture import MixtureDataset
from atoll.trainer.data_sources import SEPARATOR, check_data_paths, load_tokens, source_configs

__all__ = ["ByteTokenizer", "DataError", "DataLoader", "MixtureDataset", "SEPARATOR", "TokenDataset",
           "build_data", "check_data_paths", "load_dataset", "load_tokens", "step_sample_indices",
           "val_batches", "validation_sets"]


class ByteTokenizer:
    """Byte-level tokenizer: token id = UTF-8 byte. Needs no download."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        return np.asarray(ids).reshape(-1).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- order


class TokenDataset:
    """Non-overlapping windows of seq_len+1 tokens; the last ones are validation."""

    def __init__(self, tokens: np.ndarray, seq_len: int, val_fraction: float, seed: Union[int, Sequence[int]],
                 name: Optional[str] = None):
        if seq_len < 1:
            raise DataError("data.seq_len must be at least 1")
        self.tokens, self.seq_len = tokens, seq_len
        self.seed = [seed] if isinstance(seed, int) else list(seed)
        self.window = seq_len + 1
        n_windows = len(tokens) // self.window
        self.num_val = max(1, round(val_fraction * n_windows))
        self.num_train = n_windows - self.num_val
        if self.num_train < 1:
            raise DataError(
                f"{f'data.mixture source {name}' if name else 'the data'} has {len(tokens)} tokens, "
                f"too few for one sample of "
                f"data.seq_len+1={self.window} tokens plus a validation split"
            )
        self._perm_epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> np.ndarray:
        """Order of train windows in an epoch; a pure function of (seed, epoch)."""
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([*self.seed, epoch]).permutation(self.num_train)
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

    def eval_sources(self) -> list[tuple[Optional[str], float, "TokenDataset"]]:
        """(name, share, dataset) of each validation set: one, unnamed."""
        return [(None, 1.0, self)]

    def samples_by_source(self, n: int) -> dict[str, int]:
        return {}


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
        self.busy_s = 0.0  # time spent making batches since take_busy_s (not state)

    def stream_index(self, i: int) -> int:
        """Global sample of this island's i-th: islands take turns, one global batch each."""
        batch = self.global_batch
        return (i // batch) * batch * self.islands + self.island * batch + i % batch

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp_size

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (inputs_BS, targets_BS) per micro-batch; advances by the global batch."""
        started = time.perf_counter()
        groups = step_sample_indices(self.samples_consumed, self.micro_batch, self.grad_accum,
                                     self.dp_rank, self.dp_size)
        batches = [_to_batch([self.dataset.train_sample(self.stream_index(i)) for i in idx], self.vocab_size)
                   for idx in groups]
        self.samples_consumed += self.global_batch
        self.busy_s += time.perf_counter() - started
        return batches

    def take_busy_s(self) -> float:
        """Seconds spent making batches since the last call (the `data_s` metric)."""
        busy, self.busy_s = self.busy_s, 0.0
        return busy

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


def validation_sets(dataset: Union[TokenDataset, MixtureDataset], micro_batch: int, num_batches: int,
                    dp_rank: int, dp_size: int, vocab_size: Optional[int] = None
                    ) -> list[tuple[Optional[str], float, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """(name, share, this rank's batches) of each source's validation set; one unnamed set
    without a mixture. Every source gets the same number of batches."""
    return [(name, share, val_batches(source, micro_batch, num_batches, dp_rank, dp_size, vocab_size))
            for name, share, source in dataset.eval_sources()]


def load_dataset(cfg: DataConfig, seed: int, vocab_size: Optional[int] = None,
                 cache_dir: Optional[Path] = None) -> Union[TokenDataset, MixtureDataset]:
    """The windows of the recipe's data: one source, or a mixture whose sources each keep
    their own order (seeded by the run's seed and the source's name)."""
    sources = source_configs(cfg)
    if not cfg.mixture:
        return TokenDataset(load_tokens(cfg, vocab_size, cache_dir), cfg.seq_len, cfg.val_fraction, seed)
    datasets = [TokenDataset(load_tokens(source, vocab_size, cache_dir, name), cfg.seq_len, cfg.val_fraction,
                             (seed, zlib.crc32(name.encode())), name)
                for name, _, source in sources]
    return MixtureDataset([name for name, _, _ in sources], [w for _, w, _ in sources], datasets, seed)


def build_data(cfg: DataConfig, seed: int, dp_rank: int, dp_size: int, vocab_size: int, island: int = 0,
               islands: int = 1, cache_dir: Optional[Path] = None
               ) -> tuple[Union[TokenDataset, MixtureDataset], DataLoader]:
    """Dataset and this rank's loader for a recipe's data section (and its DiLoCo island)."""
    dataset = load_dataset(cfg, seed, vocab_size, cache_dir)
    loader = DataLoader(dataset, cfg.micro_batch, cfg.grad_accum, dp_rank, dp_size, vocab_size=vocab_size,
                        island=island, islands=islands)
    return dataset, loader
