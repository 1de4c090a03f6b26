"""The tokenizer that goes with an exported model, as transformers loads it.

A checkpoint's recipe says what its token ids mean:

- `data.source: stdlib | folder`: the ids are the text's UTF-8 bytes, 0..255.
  The export writes a byte-level `tokenizer.json` (built with the `tokenizers`
  library: a ByteLevel pre-tokenizer turns every byte into one printable
  character and a merge-free BPE vocabulary maps that character back to the
  byte's value) and a `tokenizer_config.json`. It encodes any text to exactly
  the ids atoll trained on and decodes them back.
- `data.source: text | dataset` with `data.tokenizer` (also in a `data.mixture`):
  the training tokenizer itself; its files are copied from the `data.tokenizer`
  folder (or the folder of that tokenizer.json). `dataset` without one: bytes.
- `data.source: tokens` (ids of an unknown tokenizer), or a checkpoint whose
  recipe has no data section (an import): no tokenizer.

This module knows tokenizer files and the recipe's `data` section, nothing
of models or of transformers itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from atoll.checkpoint.hf import make_readable

BYTE_SOURCES = ("stdlib", "folder")
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# What save_pretrained writes for a tokenizer; the export copies those present.
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG, "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json")
# The generic class that runs a tokenizer.json as it is (no per-model rules on top).
GENERIC_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def token_ids_of(data: Optional[dict]) -> Optional[str]:
    """What the ids of a recipe's `data` section mean: "bytes", "tokenizer" (data.tokenizer's),
    "tokens" (a pre-tokenised file's, of a tokenizer the recipe does not name), or None."""
    if not data or not data.get("source"):
        return None
    sources = [entry.get("source") for entry in data.get("mixture") or []] or [data["source"]]
    if data.get("tokenizer") and any(s in ("text", "dataset") for s in sources):
        return "tokenizer"
    if all(s == "tokens" for s in sources):
        return "tokens"
    return "bytes" if any(s in BYTE_SOURCES + ("dataset",) for s in sources) else "tokenizer"


def byte_characters() -> dict[int, str]:
    """Byte value -> the printable character the ByteLevel pre-tokenizer writes for it:
    printable Latin-1 bytes stand for themselves, the others take the code points
    from 256 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    characters, shifted = {}, 0
    for value in range(256):
        if value in printable:
            characters[value] = chr(value)
        else:
            characters[value] = chr(256 + shifted)
            shifted += 1
    return characters


def byte_level_tokenizer():
    """A `tokenizers.Tokenizer` whose ids are the UTF-8 bytes of the text, and back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {character: value for value, character in byte_characters().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def training_tokenizer_folder(tokenizer: str) -> Path:
    """The folder holding `data.tokenizer` (a folder, or the path of its tokenizer.json)."""
    path = Path(tokenizer)
    return path if path.is_dir() else path.parent


def write_tokenizer(out: Path, data: Optional[dict], model_max_length: int) -> str:
    """Write the tokenizer of a checkpoint whose recipe has this `data` section into `out`;
    returns one line saying what was written (or why nothing was)."""
    source, ids = (data or {}).get("source"), token_ids_of(data)
    if ids in ("bytes", "tokenizer"):  # files of an earlier export must not mix with these
        for name in TOKENIZER_FILES:
            (out / name).unlink(missing_ok=True)
    if ids == "bytes":
        byte_level_tokenizer().save(str(out / TOKENIZER_FILE))
        _write_config(out / TOKENIZER_CONFIG, {"tokenizer_class": GENERIC_TOKENIZER_CLASS,
                                               "model_max_length": model_max_length})
        make_readable([out / TOKENIZER_FILE, out / TOKENIZER_CONFIG])
        return f"tokenizer: byte-level (ids are the UTF-8 bytes of the text, data.source={source})"
    if ids == "tokenizer":
        return _copy_training_tokenizer(out, data.get("tokenizer"), model_max_length)
    if ids == "tokens":
        return ("no tokenizer written: data.source=tokens holds ids of a tokenizer the checkpoint does "
                "not name; copy its files into the folder to use it with a pipeline")
    return ("no tokenizer written: the checkpoint's recipe names no data source (imported weights); "
            "copy the model's tokenizer files into the folder to use it with a pipeline")


def _copy_training_tokenizer(out: Path, tokenizer: Optional[str], model_max_length: int) -> str:
    if not tokenizer:
        return "no tokenizer written: the checkpoint's recipe has data.source=text without data.tokenizer"
    given = Path(tokenizer)
    folder = training_tokenizer_folder(tokenizer)
    tokenizer_json = given if given.is_file() else folder / TOKENIZER_FILE
    if not tokenizer_json.is_file():
        return (f"no tokenizer written: data.tokenizer {tokenizer} (the training tokenizer) is not on this "
                "machine; copy its files into the folder to use it with a pipeline")
    shutil.copyfile(tokenizer_json, out / TOKENIZER_FILE)
    copied = [TOKENIZER_FILE]
    for name in TOKENIZER_FILES[1:]:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
            copied.append(name)
    # Without a class of its own, transformers would pick one from the model type, which may
    # add rules of that family; the generic class runs tokenizer.json exactly as training did.
    config_path = out / TOKENIZER_CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if "tokenizer_class" not in config:
        config.setdefault("model_max_length", model_max_length)
        _write_config(config_path, {"tokenizer_class": GENERIC_TOKENIZER_CLASS, **config})
    make_readable([out / name for name in set(copied) | {TOKENIZER_CONFIG}])
    return f"tokenizer: copied from {folder} ({', '.join(copied)})"


def _write_config(path: Path, config: dict) -> None:
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
