"""Real corpora: jsonl (plain, gzip, zstd), parquet, arrow and save_to_disk folders, tokenised
in parallel into the token cache, and weighted mixtures of sources.

Every corpus is written here by the test itself with the libraries users write them with
(json, gzip, zstandard, pyarrow, Hugging Face `datasets`); the tokens are compared with a
per-document reference tokenisation.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import atoll.trainer.data_documents as documents
from atoll.trainer.config import DataConfig, RecipeError, load_recipe
from atoll.trainer.data import DataError, build_data, load_dataset, load_tokens
from atoll.trainer.data_cache import load_tokenizer
from atoll.trainer.data_mixture import MixtureSchedule, integer_counts
from atoll.trainer.data_sources import prepare_tokens
from conftest import (WORDS, corpus, subprocess_env, word_level_tokenizer, write_jsonl, write_parquet,
                      write_saved_dataset)

def reference_ids(docs: list[str], tokenizer_dir: Path | None) -> list[int]:
    """Each document tokenised on its own, then the end-of-text id (</s> = 1; byte 0 for bytes)."""
    if tokenizer_dir is None:
        return [b for d in docs for b in [*d.encode("utf-8"), 0]]
    tokenizer = load_tokenizer(str(tokenizer_dir))
    return [i for d in docs for i in [*tokenizer.encode(d, add_special_tokens=False).ids, 1]]


def write_zst(path: Path, docs: list[str]) -> Path:
    import zstandard

    raw = "".join(json.dumps({"body": d}) + "\n" for d in docs).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    return path


def write_arrow(path: Path, docs: list[str]) -> Path:
    import pyarrow as pa

    table = pa.table({"body": docs})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=10):
            writer.write_batch(batch)
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return word_level_tokenizer(tmp_path_factory.mktemp("tok") / "tok", WORDS)


def dataset_cfg(path: Path, tokenizer: Path | None, workers: int = 1, **kw) -> DataConfig:
    return DataConfig(source="dataset", path=str(path), tokenizer=str(tokenizer) if tokenizer else None,
                      tokenize_workers=workers, **{"text_field": "body", **kw})


def test_every_format_gives_the_reference_tokens_with_one_or_two_workers(tmp_path, tokenizer_dir, monkeypatch):
    """jsonl (split into byte ranges), gzip and zstd jsonl, parquet (row groups), arrow and a
    save_to_disk folder: the tokens are the per-document reference, in file order, and two
    tokenising processes give the same file as one."""
    monkeypatch.setattr(documents, "JSONL_RANGE_BYTES", 500)  # many ranges; lines cross their edges
    docs = corpus(120, seed=1)
    folder = tmp_path / "corpus"
    folder.mkdir()
    files = {
        "jsonl": write_jsonl(folder / "a.jsonl", docs[:40]),
        "gz": write_jsonl(folder / "b.jsonl.gz", docs[40:60], opener=gzip.open),
        "zst": write_zst(folder / "c.jsonl.zst", docs[60:80]),
        "parquet": write_parquet(folder / "d.parquet", docs[80:100], row_group_size=6),
        "arrow": write_arrow(folder / "e.arrow", docs[100:120]),
    }
    (folder / "README.md").write_text("not a corpus file: skipped")
    parts = {"jsonl": docs[:40], "gz": docs[40:60], "zst": docs[60:80], "parquet": docs[80:100],
             "arrow": docs[100:120]}
    for kind, path in files.items():
        got = load_tokens(dataset_cfg(path, tokenizer_dir), 64, tmp_path / "cache" / kind)
        assert got.tolist() == reference_ids(parts[kind], tokenizer_dir), kind
    assert len(documents.open_corpus(str(files["jsonl"])).units()) > 5
    assert len(documents.open_corpus(str(files["parquet"])).units()) == 4

    whole = reference_ids(docs, tokenizer_dir)  # the folder: files in name order
    one = load_tokens(dataset_cfg(folder, tokenizer_dir, workers=1), 64, tmp_path / "one")
    two = load_tokens(dataset_cfg(folder, tokenizer_dir, workers=2), 64, tmp_path / "two")
    assert one.tolist() == whole and two.tolist() == whole and one.dtype == np.uint16
    glob = load_tokens(dataset_cfg(folder / "*.jsonl*", None), 256, tmp_path / "glob")
    assert glob.tolist() == reference_ids(docs[:80], None)  # bytes, each document then byte 0

    saved = write_saved_dataset(tmp_path / "saved", docs[:50])
    got = load_tokens(dataset_cfg(saved, tokenizer_dir, workers=2), 64, tmp_path / "saved-cache")
    assert got.tolist() == reference_ids(docs[:50], tokenizer_dir)


def test_the_cache_is_reused_and_keyed_by_its_inputs(tmp_path, tokenizer_dir, capsys):
    path = write_jsonl(tmp_path / "a.jsonl", corpus(30, seed=2))
    cfg, cache = dataset_cfg(path, tokenizer_dir), tmp_path / "cache"
    first = load_tokens(cfg, 64, cache)
    assert "tokenised" in capsys.readouterr().out
    again = load_tokens(cfg, 64, cache)
    assert np.array_equal(first, again) and "tokenis" not in capsys.readouterr().out  # mapped, not redone
    assert isinstance(again, np.memmap)
    load_tokens(dataset_cfg(path, None), 256, cache)  # another tokenizer: another file
    write_jsonl(path, corpus(31, seed=2))  # changed input: tokenised again
    assert len(load_tokens(cfg, 64, cache)) > len(first)
    assert len(list(cache.glob("tokens-*"))) == 3 and not list(cache.glob("*.parts-*"))


KILLED_BUILD = """
import sys, time
import atoll.trainer.data_cache as cache
import atoll.trainer.data_documents as documents
documents.JSONL_RANGE_BYTES = 300
read = cache.read_documents
def slow(unit, field):
    time.sleep(0.2)
    yield from read(unit, field)
cache.read_documents = slow
cache.cached_tokens(documents.open_corpus(sys.argv[1]), sys.argv[2], "body", cache.Path(sys.argv[3]), 64, 1)
"""


def test_a_tokenisation_killed_half_way_is_redone_not_used(tmp_path, tokenizer_dir, monkeypatch, capsys):
    docs = corpus(150, seed=3)
    path = write_jsonl(tmp_path / "a.jsonl", docs)
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(path), str(tokenizer_dir), str(cache)],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not len(list(cache.glob("*.parts-*/*.uint16"))) >= 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    parts = next(cache.glob("*.parts-*"))
    assert not list(cache.glob("tokens-*.uint16"))  # nothing that could be taken for the cache
    (parts / "000099.uint16.12345.tmp").write_bytes(b"\x07\x00" * 50)  # a part a kill cut short
    monkeypatch.setattr(documents, "JSONL_RANGE_BYTES", 300)  # the same cut as the killed build
    tokens = load_tokens(dataset_cfg(path, tokenizer_dir), 64, cache)
    assert "resuming" in capsys.readouterr().out
    assert tokens.tolist() == reference_ids(docs, tokenizer_dir)
    assert not parts.exists()


def test_bad_input_is_one_line_naming_the_file_the_line_and_the_key(tmp_path, tokenizer_dir, monkeypatch):
    good = corpus(5, seed=4)

    def error_of(cfg: DataConfig, vocab_size: int = 64) -> str:
        with pytest.raises(DataError) as raised:
            prepare_tokens(cfg, vocab_size, tmp_path / "cache")
        message = str(raised.value)
        assert "\n" not in message
        return message

    missing = tmp_path / "missing.jsonl"
    missing.write_text("".join(json.dumps({"body": d}) + "\n" for d in good[:2]) + '{"text": "x"}\n')
    assert error_of(dataset_cfg(missing, tokenizer_dir)) == \
        f"{missing}:3: the record has no 'body' field (data.text_field=body)"
    late = tmp_path / "late.jsonl"  # in the last of many ranges: the line number is the file's
    late.write_text("".join(json.dumps({"body": d}) + "\n" for d in corpus(60, seed=5)) + "{not json\n")
    with monkeypatch.context() as patch:
        patch.setattr(documents, "JSONL_RANGE_BYTES", 256)
        assert len(documents.open_corpus(str(late)).units()) > 5
        assert error_of(dataset_cfg(late, tokenizer_dir)).startswith(f"{late}:61: not a JSON record (")
    bad_utf8 = tmp_path / "bad.jsonl"
    bad_utf8.write_bytes(b'{"body": "fine"}\n{"body": "caf\xe9"}\n')
    assert error_of(dataset_cfg(bad_utf8, tokenizer_dir)).startswith(f"{bad_utf8}:2: invalid UTF-8")
    not_text = tmp_path / "number.jsonl.gz"
    write_jsonl(not_text, good, opener=gzip.open, extra={"body": 7})
    assert error_of(dataset_cfg(not_text, tokenizer_dir)) == \
        f"{not_text}:1: field 'body' is int, not text (data.text_field=body)"

    import pyarrow as pa
    import pyarrow.parquet as pq

    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"body": ["a", "b", None, "c"]}), nulls, row_group_size=2)
    assert error_of(dataset_cfg(nulls, tokenizer_dir)) == \
        f"{nulls}: row 2 has no 'body' value (data.text_field=body)"
    assert error_of(dataset_cfg(nulls, tokenizer_dir, text_field="content")).startswith(
        f"{nulls}: no column 'content' (data.text_field=content; columns: body")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.jsonl").write_text("\n\n")
    assert error_of(dataset_cfg(empty, tokenizer_dir)) == f"data ({empty}) has no documents"
    assert error_of(dataset_cfg(tmp_path / "none", tokenizer_dir)) == f"data.path {tmp_path / 'none'} does not exist"
    assert error_of(dataset_cfg(missing, tokenizer_dir), vocab_size=16) == \
        f"data.tokenizer {tokenizer_dir} has {len(WORDS) + 2} tokens but model.vocab_size=16"
    mixture = DataConfig(mixture=[{"name": "web", "weight": 1.0, "source": "dataset", "path": str(empty)}])
    assert error_of(mixture, 256) == f"web ({empty}) has no documents"


def test_the_cli_stops_on_a_bad_record_before_any_worker_starts(tmp_path, tokenizer_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "the island"}\n{"title": "no text"}\n')
    proc = subprocess.run([sys.executable, "-m", "atoll.launch", "train", "data.source=dataset",
                           f"data.path={bad}", "data.text_field=body", f"data.tokenizer={tokenizer_dir}",
                           f"run.dir={tmp_path / 'run'}", "launch.backend=ray"],
                          capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == \
        f"atoll: error: {bad}:2: the record has no 'body' field (data.text_field=body)"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_mixture_recipe_errors_name_the_key(tmp_path):
    def recipe_error(*overrides: str) -> str:
        with pytest.raises(RecipeError) as raised:
            load_recipe(None, list(overrides))
        return str(raised.value)

    path = tmp_path / "mix.yaml"
    path.write_text("data:\n  mixture:\n    - {name: web, weight: 0, path: a.jsonl}\n"
                    "    - {name: code, weight: 0.0, path: b.jsonl}\n")
    with pytest.raises(RecipeError, match="the weights of data.mixture must sum to a positive number, got 0.0"):
        load_recipe(str(path))
    path.write_text("data:\n  mixture:\n    - {name: web, weight: 1, path: a.jsonl, wieght: 2}\n")
    with pytest.raises(RecipeError, match=r"unknown recipe key 'data.mixture\[0\].wieght'"):
        load_recipe(str(path))
    path.write_text("data:\n  mixture:\n    - {name: web, weight: -1, path: a.jsonl}\n")
    with pytest.raises(RecipeError, match=r"'data.mixture\[0\].weight' must be a number of at least 0"):
        load_recipe(str(path))
    path.write_text("data:\n  mixture:\n    - {name: web, weight: 1, path: a.jsonl}\n"
                    "    - {name: web, weight: 1, path: b.jsonl}\n")
    with pytest.raises(RecipeError, match="'web' names two mixture entries"):
        load_recipe(str(path))
    path.write_text("data:\n  tokenizer: tok\n  mixture:\n    - {name: py, weight: 1, source: stdlib}\n")
    with pytest.raises(RecipeError, match="reads bytes, but data.tokenizer"):
        load_recipe(str(path))
    assert "data.tokenize_workers' must be at least 1" in recipe_error("data.tokenize_workers=0")
    assert "data.path is required when data.source=dataset" in recipe_error("data.source=dataset")


# --------------------------------------------------------------------------- mixtures


@pytest.mark.parametrize("weights", [(0.5, 0.3, 0.2), (0.7, 0.2, 0.1), (1, 1, 1), (3.0, 1.0),
                                     (0.61, 0.27, 0.09, 0.03), (0.123, 0.456, 0.789)])
def test_every_window_holds_each_share_within_one_sample(weights):
    """Any N consecutive samples hold between floor(N·w)-1 and ceil(N·w)+1 of each source,
    over many windows of many lengths, whatever the seed's offset."""
    shares = np.asarray(weights, dtype=float) / sum(weights)
    for seed in (0, 1):
        schedule = MixtureSchedule(weights, seed)
        located = [schedule.locate(g) for g in range(3000)]
        source_G = np.array([s for s, _ in located])
        one_hot = np.zeros((len(source_G) + 1, len(weights)))
        one_hot[1:][np.arange(len(source_G)), source_G] = 1
        prefix = one_hot.cumsum(axis=0)
        for n in (1, 7, 10, 33, 100, 257, 1000):
            counts_WS = prefix[n:] - prefix[:-n]
            assert (counts_WS >= np.floor(n * shares) - 1).all() and (counts_WS <= np.ceil(n * shares) + 1).all()
        for s in range(len(weights)):  # each source's samples are its stream 0, 1, 2, ... in order
            assert [i for src, i in located if src == s] == list(range(int((source_G == s).sum())))
        assert schedule.consumed(3000) == np.bincount(source_G, minlength=len(weights)).tolist()


def test_the_mixture_of_0_5_0_3_0_2_is_exact_in_every_window_of_100():
    schedule = MixtureSchedule([0.5, 0.3, 0.2], seed=7)
    assert integer_counts([0.5, 0.3, 0.2]) == [5, 3, 2]
    source_G = np.array([schedule.locate(g)[0] for g in range(5000)])
    for start in range(0, 4900):
        assert np.bincount(source_G[start:start + 100], minlength=3).tolist() == [50, 30, 20]


def test_a_mixture_reads_each_source_in_its_own_order_and_epochs(tmp_path):
    """Three token files mixed 0.5/0.3/0.2: every sample is a window of the source the
    schedule names, each source permutes its windows under its own seed, and the small
    source starts its next epoch on its own while the others are still in their first."""
    seq_len, windows = 7, {"web": 60, "code": 30, "math": 6}
    mixture = []
    for k, (name, n) in enumerate(windows.items()):
        tokens = np.arange(n * (seq_len + 1), dtype=np.uint16) + 1000 * k  # window w starts at 1000k + 8w
        (tmp_path / f"{name}.bin").write_bytes(tokens.tobytes())
        mixture.append({"name": name, "weight": [0.5, 0.3, 0.2][k], "source": "tokens",
                        "path": str(tmp_path / f"{name}.bin")})
    cfg = DataConfig(mixture=mixture, seq_len=seq_len, val_fraction=0.1, micro_batch=2, grad_accum=1)
    dataset = load_dataset(cfg, seed=5)
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for g in range(200):
        source, _ = dataset.train_source(g)
        first = int(dataset.train_sample(g)[0])
        assert first // 1000 == source  # the sample is a window of the source the schedule names
        seen[source].append((first % 1000) // (seq_len + 1))
    assert [len(v) for v in seen.values()] == [100, 60, 40]
    math_train = dataset.sources[2].num_train  # 6 windows, 1 held out: 5 per epoch
    epochs = [sorted(seen[2][e * math_train:(e + 1) * math_train]) for e in range(3)]
    assert epochs == [list(range(math_train))] * 3  # every epoch reads every window once
    assert seen[2][:math_train] != seen[2][math_train:2 * math_train]  # a fresh order each epoch
    assert sorted(seen[0][:54]) == list(range(54))  # web: still in its first epoch
    assert seen[0][:10] != seen[1][:10]  # the sources are not permuted alike
    held_out = {name: ds.num_val for name, _, ds in dataset.eval_sources()}
    assert held_out == {"web": 6, "code": 3, "math": 1}
    assert dataset.samples_by_source(200) == {"web": 100, "code": 60, "math": 40}

    # DiLoCo islands take turns along the same mixed stream, one global batch each
    _, island0 = build_data(cfg, 5, 0, 1, 4096, island=0, islands=2)
    _, island1 = build_data(cfg, 5, 0, 1, 4096, island=1, islands=2)
    _, whole = build_data(cfg, 5, 0, 1, 4096)
    for _ in range(3):
        turns = [x.tolist() for loader in (island0, island1) for x, _ in loader.next_step()]
        assert turns == [x.tolist() for _ in range(2) for x, _ in whole.next_step()]

    # dp=2 splits the same stream: the two ranks' batches together are dp=1's batches
    _, single = build_data(cfg, 5, 0, 1, 4096)
    _, rank0 = build_data(cfg, 5, 0, 2, 4096)
    _, rank1 = build_data(cfg, 5, 1, 2, 4096)
    for _ in range(3):
        a, b = single.next_step(), single.next_step()
        both = [x for pair in (rank0.next_step(), rank1.next_step()) for x, _ in pair]
        assert [x.tolist() for x, _ in a + b] == [x.tolist() for x in both]


def test_the_export_names_the_ids_a_dataset_or_mixture_trained_on(tmp_path, tokenizer_dir):
    """A hf export writes the training tokenizer of a `dataset` source or mixture with
    data.tokenizer, the byte-level one without, and none for a mixture of token files."""
    from atoll.checkpoint.hf_tokenizer import write_tokenizer

    out = tmp_path / "hf"
    out.mkdir()
    assert write_tokenizer(out, {"source": "dataset", "tokenizer": None}, 64).startswith("tokenizer: byte-level")
    mixture = [{"name": "web", "source": "dataset"}, {"name": "ids", "source": "tokens"}]
    copied = write_tokenizer(out, {"source": "stdlib", "tokenizer": str(tokenizer_dir), "mixture": mixture}, 64)
    assert copied.startswith("tokenizer:") and "byte-level" not in copied
    assert (out / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    only_ids = [{"name": "a", "source": "tokens"}, {"name": "b", "source": "tokens"}]
    assert write_tokenizer(out, {"source": "stdlib", "tokenizer": None, "mixture": only_ids}, 64).startswith(
        "no tokenizer written: data.source=tokens")
