"""`data.source: text`: a folder of text tokenised once with a local tokenizer, then memory-mapped.

`data.tokenizer` names a tokenizer folder (or its tokenizer.json) on this
machine, as transformers' `save_pretrained` writes it; the `tokenizers`
library loads it and nothing is ever downloaded. The first process to get
there tokenises every file under `data.path` (sorted by relative path, each
followed by the tokenizer's end-of-text token when its tokenizer_config.json
names one) into a flat token file in the run directory; every other process,
restart and later run of the same recipe maps that file, like
`data.source: tokens`. The file's name hashes the tokenizer and the texts,
so a changed tokenizer or folder tokenises again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np


def tokenizer_file(path: str) -> Path:
    p = Path(path)
    return p / "tokenizer.json" if p.is_dir() else p


def load_tokenizer(path: str, error: Callable[[str], Exception]):
    """The `tokenizers.Tokenizer` of a local folder or tokenizer.json."""
    file = tokenizer_file(path)
    if not file.is_file():
        raise error(f"data.tokenizer {path} has no tokenizer.json (a local folder as save_pretrained writes it)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise error("data.source=text needs the tokenizers library: pip install tokenizers") from None
    return Tokenizer.from_file(str(file))


def _end_of_text(path: str, tokenizer) -> Optional[int]:
    config = tokenizer_file(path).with_name("tokenizer_config.json")
    if not config.is_file():
        return None
    token = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    if isinstance(token, dict):
        token = token.get("content")
    return tokenizer.token_to_id(token) if isinstance(token, str) else None


def text_tokens(folder: Path, files: list[Path], tokenizer_path: str, vocab_size: Optional[int],
                max_bytes: int, cache_dir: Path, error: Callable[[str], Exception]) -> Path:
    """The cached token file of `files` (tokenised now unless a process already did)."""
    tokenizer = load_tokenizer(tokenizer_path, error)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and size > vocab_size:
        raise error(f"data.tokenizer {tokenizer_path} has {size} tokens but model.vocab_size={vocab_size}")
    key = hashlib.sha256(tokenizer_file(tokenizer_path).read_bytes())
    for p in files:
        stat = p.stat()
        key.update(f"{p.relative_to(folder).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    key.update(str(max_bytes).encode())
    dtype = np.uint16 if size <= 2**16 else np.uint32
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"tokens-{key.hexdigest()[:16]}.{np.dtype(dtype).name}"
    with open(cache_dir / ".tokenise.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process tokenises; the others wait, then map it
        if not target.exists():
            _tokenise(files, tokenizer, _end_of_text(tokenizer_path, tokenizer), max_bytes, dtype, target)
    return target


def _tokenise(files: list[Path], tokenizer, end: Optional[int], max_bytes: int, dtype, target: Path) -> None:
    print(f"tokenising {len(files)} files into {target}", flush=True)
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    total_bytes = total_tokens = 0
    with open(temp, "wb") as out:
        for p in files:
            if total_bytes >= max_bytes:
                break
            text = p.read_bytes()[: max_bytes - total_bytes]
            total_bytes += len(text)
            ids = tokenizer.encode(text.decode("utf-8", errors="replace"), add_special_tokens=False).ids
            ids = ids + ([end] if end is not None else [])
            out.write(np.asarray(ids, dtype=dtype).tobytes())
            total_tokens += len(ids)
    os.replace(temp, target)
    print(f"tokenised {total_bytes:,} bytes into {total_tokens:,} tokens", flush=True)
