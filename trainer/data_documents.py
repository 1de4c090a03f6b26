"""The documents of a local corpus: jsonl (plain, gzip, zstd), parquet, arrow and `save_to_disk` folders.

`open_corpus(path)` resolves `data.path` (a file, a folder or a glob) to the
files it names; `Corpus.units()` cuts them into units of work that can be
tokenised in any order by any process: a byte range of a plain jsonl file, a row group of a
parquet file, a whole compressed jsonl or arrow file. `read_documents(unit,
text_field)` yields the unit's texts in batches, in file order, so the
concatenation of the units in order is the corpus in order whatever the
number of workers.

Every problem a user must fix is a `DataError` whose one line names the file,
the line or row, and the recipe key. Nothing here is downloaded: a folder
written by Hugging Face `datasets.save_to_disk` is read as the arrow files its
`state.json` lists, with pyarrow. This module must not import torch (it runs
in the tokenising processes).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

JSONL_RANGE_BYTES = 8 << 20  # plain jsonl files are tokenised in ranges of this size
BATCH_DOCUMENTS = 1024  # texts handed to the tokenizer at once
SUFFIXES = (".jsonl.gz", ".jsonl.zst", ".jsonl", ".parquet", ".arrow")


class DataError(ValueError):
    """A data problem a user must fix; the message is one line."""


@dataclass(frozen=True)
class Unit:
    """One piece of a corpus file, tokenised independently of the others."""

    path: str
    kind: str  # one of SUFFIXES without the dot, or "text" (a whole file read as UTF-8)
    start: int = 0  # jsonl: first byte of the range; parquet: the row group
    stop: int = 0  # jsonl: end of the range; text: bytes to read
    size: int = 0  # bytes on disk this unit covers (progress and throughput)


def suffix_of(path: str) -> Optional[str]:
    name = path.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def corpus_files(path: str, key: str = "data.path") -> list[Path]:
    """The corpus files `path` names, in a fixed order. A `save_to_disk` folder lists its own."""
    if any(ch in path for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"{key} {path} matches no file")
        return [_supported(p, key) for p in matches]
    p = Path(path)
    if not p.exists():
        raise DataError(f"{key} {path} does not exist")
    if p.is_file():
        return [_supported(p, key)]
    saved = saved_dataset_files(p, key)
    if saved is not None:
        return saved
    found = []
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, n) for n in filenames if not n.startswith(".") and suffix_of(n)]
    if not found:
        raise DataError(f"{key} {path} holds no {', '.join(SUFFIXES)} file")
    return sorted(found, key=lambda f: f.relative_to(p).as_posix())


def _supported(p: Path, key: str) -> Path:
    if suffix_of(p.name) is None:
        raise DataError(f"{key}: {p} is not one of {', '.join(SUFFIXES)}")
    return p


def saved_dataset_files(folder: Path, key: str) -> Optional[list[Path]]:
    """The arrow files of a folder `datasets.save_to_disk` wrote (its train split for a
    DatasetDict), or None when the folder is not one."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise DataError(f"{key} {folder} is a DatasetDict without a train split "
                            f"(splits: {', '.join(splits)}); point {key} at one split's folder")
        return saved_dataset_files(folder / "train", key)
    state = folder / "state.json"
    if not state.is_file():
        return None
    files = [folder / entry["filename"] for entry in json.loads(state.read_text()).get("_data_files", [])]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{key} {folder}: {missing[0].name}, listed in state.json, is missing")
    if not files:
        raise DataError(f"{key} {folder} is a saved dataset with no data files")
    return files


@dataclass(frozen=True)
class Corpus:
    """The files of one source, and how they are cut into units of work.

    `max_bytes` 0: corpus files (jsonl, parquet, arrow), read whole. Otherwise plain text
    files (`data.source: text`), each one document, the first `max_bytes` of them in all.
    """

    files: tuple[Path, ...]
    max_bytes: int = 0

    def identity(self) -> str:
        """What the tokens are made of, from the files' metadata only (cheap: no file is opened)."""
        lines = [f"max_bytes={self.max_bytes}"]
        for f in self.files:
            stat = os.stat(f)
            lines.append(f"{f}:{stat.st_size}:{stat.st_mtime_ns}")
        return "\n".join(lines)

    def units(self) -> list[Unit]:
        """The units of work, in corpus order."""
        return _text_units(self.files, self.max_bytes) if self.max_bytes else _corpus_units(self.files)


def open_corpus(path: str, key: str = "data.path") -> Corpus:
    return Corpus(tuple(corpus_files(path, key)))


def _corpus_units(files) -> list[Unit]:
    units = []
    for f in files:
        kind, size = suffix_of(f.name).lstrip("."), f.stat().st_size
        if kind == "jsonl":
            units += [Unit(str(f), kind, a, min(a + JSONL_RANGE_BYTES, size), min(JSONL_RANGE_BYTES, size - a))
                      for a in range(0, max(size, 1), JSONL_RANGE_BYTES)]
        elif kind == "parquet":
            units += _parquet_units(f, size)
        else:
            units.append(Unit(str(f), kind, size=size))
    return units


def _text_units(files, max_bytes: int) -> list[Unit]:
    units, left = [], max_bytes
    for p in files:
        if left <= 0:
            break
        size = p.stat().st_size
        if size:
            units.append(Unit(str(p), "text", stop=min(size, left), size=min(size, left)))
            left -= units[-1].stop
    return units


def _parquet_units(f: Path, size: int) -> list[Unit]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(f).metadata
    except Exception as exc:  # not a parquet file, or truncated
        raise DataError(f"{f}: not a readable parquet file ({_first_line(exc)})") from None
    groups = meta.num_row_groups
    compressed = [sum(meta.row_group(g).column(c).total_compressed_size for c in range(meta.num_columns))
                  for g in range(groups)]
    return [Unit(str(f), "parquet", g, g + 1, compressed[g]) for g in range(groups)]


# --------------------------------------------------------------------------- reading


def read_documents(unit: Unit, text_field: str) -> Iterator[list[str]]:
    """The unit's texts, in order, in batches of up to BATCH_DOCUMENTS."""
    if unit.kind == "text":
        with open(unit.path, "rb") as f:
            yield [f.read(unit.stop).decode("utf-8", errors="replace")]
    elif unit.kind == "parquet":
        yield from _parquet_documents(unit, text_field)
    elif unit.kind == "arrow":
        yield from _arrow_documents(unit, text_field)
    else:
        yield from _jsonl_documents(unit, text_field)


def _jsonl_documents(unit: Unit, text_field: str) -> Iterator[list[str]]:
    batch: list[str] = []
    for k, line in enumerate(_jsonl_lines(unit)):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            text = _text_of(record, text_field)
        except UnicodeDecodeError as exc:
            raise DataError(f"{_where(unit, k)}: invalid UTF-8 at byte {exc.start} of the line") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{_where(unit, k)}: not a JSON record ({exc.msg})") from None
        except ValueError as exc:
            raise DataError(f"{_where(unit, k)}: {_first_line(exc)}") from None
        batch.append(text)
        if len(batch) == BATCH_DOCUMENTS:
            yield batch
            batch = []
    if batch:
        yield batch


def _where(unit: Unit, k: int) -> str:
    """`file:line` of the unit's k-th line (0-based); counted only for an error message."""
    first = 1 if unit.kind != "jsonl" or unit.start == 0 else _line_number(unit.path, _first_line_start(unit))
    return f"{unit.path}:{first + k}"


def _first_line_start(unit: Unit) -> int:
    with open(unit.path, "rb") as f:
        f.seek(unit.start - 1)
        return unit.start if f.read(1) == b"\n" else unit.start + len(f.readline())


def _jsonl_lines(unit: Unit) -> Iterator[bytes]:
    """Every line that starts inside the unit (a line belongs to the range its first byte is in)."""
    if unit.kind == "jsonl.gz":
        with gzip.open(unit.path, "rb") as f:
            yield from _guarded(f, unit.path)
        return
    if unit.kind == "jsonl.zst":
        import zstandard

        with open(unit.path, "rb") as raw:
            yield from _guarded(io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw)), unit.path)
        return
    position = _first_line_start(unit) if unit.start else 0
    with open(unit.path, "rb") as f:
        f.seek(position)
        while position < unit.stop:
            line = f.readline()
            if not line:
                break
            yield line
            position += len(line)


def _guarded(lines, path: str) -> Iterator[bytes]:
    """A compressed file's lines; a damaged or truncated file is one line, not a traceback."""
    try:
        yield from lines
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(f"{path}: cannot decompress ({_first_line(exc)})") from None


def _line_number(path: str, offset: int) -> int:
    """The 1-based number of the line starting at byte `offset`."""
    count = 1
    with open(path, "rb") as f:
        while offset > 0:
            chunk = f.read(min(offset, 1 << 24))
            count += chunk.count(b"\n")
            offset -= len(chunk)
    return count


def _text_of(record, text_field: str) -> str:
    """The record's text; a ValueError says what is wrong with the record."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, not {type(record).__name__}")
    if text_field not in record:
        raise ValueError(f"the record has no '{text_field}' field (data.text_field={text_field})")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"field '{text_field}' is {type(text).__name__}, not text (data.text_field={text_field})")
    return text


def _parquet_documents(unit: Unit, text_field: str) -> Iterator[list[str]]:
    import pyarrow.parquet as pq

    reader = pq.ParquetFile(unit.path)
    _check_column(reader.schema_arrow.names, unit.path, text_field)
    first_row = sum(reader.metadata.row_group(g).num_rows for g in range(unit.start))
    for batch in reader.iter_batches(batch_size=BATCH_DOCUMENTS, row_groups=[unit.start], columns=[text_field]):
        yield _column_texts(batch.column(0), unit.path, first_row, text_field)
        first_row += batch.num_rows


def _arrow_documents(unit: Unit, text_field: str) -> Iterator[list[str]]:
    import pyarrow as pa

    source = pa.memory_map(unit.path)
    try:  # datasets writes the streaming format; others write the file format
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        schema_names = reader.schema.names
    except pa.ArrowInvalid:
        source.seek(0)
        try:
            stream = pa.ipc.open_stream(source)
        except pa.ArrowInvalid as exc:
            raise DataError(f"{unit.path}: not a readable arrow file ({_first_line(exc)})") from None
        batches, schema_names = stream, stream.schema.names
    _check_column(schema_names, unit.path, text_field)
    row = 0
    for batch in batches:
        column = batch.column(text_field)
        for start in range(0, batch.num_rows, BATCH_DOCUMENTS):
            yield _column_texts(column.slice(start, BATCH_DOCUMENTS), unit.path, row + start, text_field)
        row += batch.num_rows


def _check_column(names: list[str], path: str, text_field: str) -> None:
    if text_field not in names:
        raise DataError(f"{path}: no column '{text_field}' (data.text_field={text_field}; "
                        f"columns: {', '.join(names)})")


def _column_texts(column, path: str, first_row: int, text_field: str) -> list[str]:
    """A column's values as str; rows are numbered from 0 across the whole file."""
    import pyarrow as pa

    if column.null_count:
        row = first_row + next(i for i, v in enumerate(column.is_null().to_pylist()) if v)
        raise DataError(f"{path}: row {row} has no '{text_field}' value (data.text_field={text_field})")
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.to_pylist()
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise DataError(f"{path}: column '{text_field}' holds {column.type}, not text "
                        f"(data.text_field={text_field})")
    texts = []
    for i, raw in enumerate(column.to_pylist()):
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: row {first_row + i}: invalid UTF-8 at byte {exc.start} "
                            f"of '{text_field}'") from None
    return texts


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
