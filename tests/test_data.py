"""Tests for atoll.trainer.data: sources, errors, deterministic order, dp sharding, resume."""

import re

import numpy as np
import pytest
import torch

from atoll.trainer.config import DataConfig
from conftest import word_level_tokenizer
from atoll.trainer.data import (
    ByteTokenizer, DataError, DataLoader, TokenDataset, build_data, load_tokens,
    step_sample_indices, val_batches,
)

SEQ = 8


def make_dataset(n_windows=64, seed=0, val_fraction=0.1):
    # Each window starts with its own index so tests can tell windows apart.
    tokens = np.arange(n_windows * (SEQ + 1), dtype=np.int64) // (SEQ + 1)
    return TokenDataset(tokens, SEQ, val_fraction, seed)


def window_ids(batches):
    """Window index of every sample in a list of (inputs, targets) micro-batches."""
    return [[int(row[0]) for row in x] for x, _ in batches]


def test_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo, wörld ✓ 日本'\n"
    ids = tok.encode(text)
    assert tok.vocab_size == 256 and ids.dtype == np.uint16
    assert ids.max() < 256 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(torch.from_numpy(ids.astype(np.int64))) == text


def test_stdlib_source_is_real_python_and_deterministic():
    cfg = DataConfig(source="stdlib", max_bytes=200_000)
    a, b = load_tokens(cfg), load_tokens(cfg)
    assert a.ndim == 1 and len(a) == 200_000 and a.dtype == np.uint16
    np.testing.assert_array_equal(a, b)
    head = ByteTokenizer().decode(a[:100_000])
    assert "import" in head and "def " in head


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_folder_source_sorted_independent_of_creation_order(tmp_path):
    files = {"b.txt": b"bbb", "a/z.txt": b"zz", "a/c.txt": b"c", "empty.txt": b""}
    one, two = tmp_path / "one", tmp_path / "two"
    for name in files:
        write(one / name, files[name])
    for name in reversed(list(files)):
        write(two / name, files[name])
    write(one / ".hidden", b"secret")
    write(one / ".git" / "x", b"secret")
    got1 = load_tokens(DataConfig(source="folder", path=str(one)))
    got2 = load_tokens(DataConfig(source="folder", path=str(two)))
    assert ByteTokenizer().decode(got1) == "c\0zz\0bbb\0"
    np.testing.assert_array_equal(got1, got2)
    capped = load_tokens(DataConfig(source="folder", path=str(one), max_bytes=4))
    assert ByteTokenizer().decode(capped) == "c\0zz"


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_tokens_source_memmap(tmp_path, dtype):
    values = np.array([0, 1, 255, 256, 60000] + ([70000] if dtype == "uint32" else []), dtype=dtype)
    path = tmp_path / "tok.bin"
    values.tofile(path)
    got = load_tokens(DataConfig(source="tokens", path=str(path), token_dtype=dtype))
    assert isinstance(got, np.memmap) and got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(got), values)


def test_data_errors(tmp_path):
    missing = tmp_path / "x" / "y"
    with pytest.raises(DataError, match=re.escape(f"data.path {missing} does not exist")):
        load_tokens(DataConfig(source="folder", path=str(missing)))
    (tmp_path / "hollow" / "sub").mkdir(parents=True)
    write(tmp_path / "hollow" / "sub" / "e.txt", b"")
    write(tmp_path / "hollow" / ".hidden", b"abc")
    hollow = tmp_path / "hollow"
    with pytest.raises(DataError, match=re.escape(f"data.path {hollow} has no readable text files")):
        load_tokens(DataConfig(source="folder", path=str(hollow)))
    with pytest.raises(DataError, match=re.escape(f"data.path {missing} does not exist")):
        load_tokens(DataConfig(source="tokens", path=str(missing)))
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(f"token file {empty} is empty")):
        load_tokens(DataConfig(source="tokens", path=str(empty)))
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"abc")
    with pytest.raises(DataError, match=re.escape(f"token file {odd} has 3 bytes, not a multiple of 2 (uint16)")):
        load_tokens(DataConfig(source="tokens", path=str(odd)))
    odd.write_bytes(b"abcdef")
    with pytest.raises(DataError, match=re.escape(f"token file {odd} has 6 bytes, not a multiple of 4 (uint32)")):
        load_tokens(DataConfig(source="tokens", path=str(odd), token_dtype="uint32"))
    msg = "the data has 250 tokens, too few for one sample of data.seq_len+1=129 tokens plus a validation split"
    with pytest.raises(DataError, match=re.escape(msg)):
        TokenDataset(np.zeros(250, np.uint16), 128, 0.02, 0)
    TokenDataset(np.zeros(2 * 129, np.uint16), 128, 0.02, 0)  # exactly one train + one val window


def test_order_is_pure_function_of_seed_epoch_index():
    a, b, c = make_dataset(seed=1), make_dataset(seed=1), make_dataset(seed=2)
    n = a.num_train
    assert (a.num_train, a.num_val) == (58, 6)
    order_a = [int(a.train_sample(g)[0]) for g in range(3 * n)]
    # b is read in reverse: the cached epoch permutation must not leak into results.
    order_b = [int(b.train_sample(g)[0]) for g in reversed(range(3 * n))][::-1]
    order_c = [int(c.train_sample(g)[0]) for g in range(3 * n)]
    assert order_a == order_b and order_a != order_c
    epochs = [order_a[e * n : (e + 1) * n] for e in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(n))  # every train window exactly once per epoch
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[1] == list(np.random.default_rng([1, 1]).permutation(n))
    sample = a.train_sample(5)
    assert sample.dtype == np.int64 and sample.shape == (SEQ + 1,)


def test_train_and_val_disjoint():
    ds = make_dataset()
    train = {int(ds.train_sample(g)[0]) for g in range(ds.num_train)}
    val = {int(ds.val_sample(i)[0]) for i in range(ds.num_val)}
    assert not train & val and len(train | val) == 64
    with pytest.raises(IndexError):
        ds.val_sample(ds.num_val)


def test_step_indices_same_samples_for_any_dp():
    mb, B = 2, 8
    for step in range(3):
        expected = set(range(step * B, (step + 1) * B))
        for dp in (1, 2, 4):
            ga = B // (mb * dp)
            seen = [i for r in range(dp) for m in step_sample_indices(step * B, mb, ga, r, dp) for i in m]
            assert sorted(seen) == sorted(expected) and len(seen) == B
    # dp=2, grad_accum=1: rank r's micro-batch == single process (grad_accum=2) micro-batch r
    single = step_sample_indices(16, 4, 2, 0, 1)
    assert [step_sample_indices(16, 4, 1, r, 2)[0] for r in range(2)] == single
    assert [m for r in range(4) for m in step_sample_indices(16, 2, 1, r, 4)] == \
        step_sample_indices(16, 2, 4, 0, 1)
    with pytest.raises(ValueError):
        step_sample_indices(0, 2, 1, 2, 2)


def test_loaders_dp1_dp2_dp4_see_same_batches():
    ds = make_dataset()
    single = DataLoader(ds, 2, 4, 0, 1)
    ranks2 = [DataLoader(ds, 2, 2, r, 2) for r in range(2)]
    ranks4 = [DataLoader(ds, 2, 1, r, 4) for r in range(4)]
    for _ in range(10):  # crosses an epoch boundary (58 train windows)
        ref = single.next_step()
        out2 = [b for ld in ranks2 for b in ld.next_step()]
        out4 = [b for ld in ranks4 for b in ld.next_step()]
        for got in (out2, out4):
            assert window_ids(got) == window_ids(ref)
            for (x, y), (rx, ry) in zip(got, ref):
                assert torch.equal(x, rx) and torch.equal(y, ry)
    assert single.samples_consumed == ranks2[1].samples_consumed == ranks4[3].samples_consumed == 80
    x, y = ref[0]
    assert x.dtype == torch.long and x.shape == (2, SEQ) and y.shape == (2, SEQ)
    assert single.global_batch == 8


def test_inputs_targets_shifted():
    ds = TokenDataset(np.arange(200, dtype=np.uint16), SEQ, 0.1, 0)
    (x, y), = DataLoader(ds, 3, 1, 0, 1).next_step()
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, -1], x[:, -1] + 1)


def collect(loaders, steps):
    """Window ids of every sample, in global order, over `steps` steps of a rank group."""
    return [i for _ in range(steps) for ld in loaders for m in window_ids(ld.next_step()) for i in m]


def test_resume_with_different_dp_neither_skips_nor_repeats():
    ds = make_dataset()
    reference = collect([DataLoader(ds, 2, 2, 0, 1)], 12)  # 48 samples, single process
    before = [DataLoader(ds, 2, 1, r, 2) for r in range(2)]
    first = collect(before, 5)  # 20 samples at dp=2
    state = before[0].state_dict()
    assert state == {"samples_consumed": 20} and before[1].state_dict() == state
    after = [DataLoader(ds, 1, 1, r, 4) for r in range(4)]
    for ld in after:
        ld.load_state_dict(dict(state))
    second = collect(after, 7)  # 28 samples at dp=4
    assert first + second == reference


def test_out_of_vocab_token_raises():
    tokens = np.full(20 * (SEQ + 1), 5, dtype=np.uint16)
    tokens[3] = 300
    ds = TokenDataset(tokens, SEQ, 0.1, 0)
    loader = DataLoader(ds, 18, 1, 0, 1, vocab_size=256)
    with pytest.raises(DataError, match=re.escape("token id 300") + ".*model.vocab_size=256"):
        loader.next_step()
    DataLoader(ds, 18, 1, 0, 1, vocab_size=301).next_step()


def test_val_batches_fixed_and_sharded():
    ds = make_dataset()  # 6 val windows: 58..63
    whole = val_batches(ds, 2, 3, 0, 1)
    assert window_ids(whole) == [[58, 59], [60, 61], [62, 63]]
    assert window_ids(val_batches(ds, 2, 3, 0, 1)) == window_ids(whole)
    shards = [val_batches(ds, 2, 2, r, 2) for r in range(2)]  # 8 > 6 windows: wraps around
    assert [window_ids(s) for s in shards] == [[[58, 59], [60, 61]], [[62, 63], [58, 59]]]


def test_build_data(tmp_path):
    values = np.arange(1000, dtype=np.uint16) % 50
    values.tofile(tmp_path / "t.bin")
    cfg = DataConfig(source="tokens", path=str(tmp_path / "t.bin"), seq_len=9, micro_batch=2,
                     grad_accum=2, val_fraction=0.1)
    dataset, loader = build_data(cfg, seed=3, dp_rank=1, dp_size=2, vocab_size=50)
    assert (dataset.num_train, dataset.num_val) == (90, 10)
    batches = loader.next_step()
    assert len(batches) == 2 and batches[0][0].shape == (2, 9) and loader.global_batch == 8
    with pytest.raises(DataError, match="model.vocab_size=5"):
        build_data(cfg, seed=3, dp_rank=0, dp_size=1, vocab_size=5)[1].next_step()


def test_text_is_tokenised_once_with_a_local_tokenizer_and_cached(tmp_path, capsys):
    words = ["the", "islands", "train", "one", "model", "and", "talk", "rarely"]
    word_level_tokenizer(tmp_path / "tok", words)
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "b.txt").write_text("islands talk rarely " * 40)
    (texts / "a.txt").write_text("the islands train one model and " * 30 + "unknown")
    cfg = DataConfig(source="text", path=str(texts), tokenizer=str(tmp_path / "tok"))
    cache = tmp_path / "run" / "data"
    tokens = load_tokens(cfg, vocab_size=16, cache_dir=cache)
    ids = {w: i + 2 for i, w in enumerate(words)}
    first = [ids[w] for w in ("the islands train one model and " * 30).split()] + [0, 1]  # <unk>, </s>
    second = [ids[w] for w in ("islands talk rarely " * 40).split()] + [1]
    assert tokens.dtype == np.uint16 and list(tokens) == first + second  # a.txt before b.txt
    assert "MB in 2 pieces" in capsys.readouterr().out
    cached = list(cache.glob("tokens-*.uint16"))
    assert len(cached) == 1
    again = load_tokens(cfg, vocab_size=16, cache_dir=cache)  # mapped, not tokenised again
    assert np.array_equal(again, tokens) and "tokenising" not in capsys.readouterr().out
    (texts / "c.txt").write_text("model")  # another folder content: another cache file
    assert len(load_tokens(cfg, vocab_size=16, cache_dir=cache)) == len(tokens) + 2
    assert len(list(cache.glob("tokens-*.uint16"))) == 2
    with pytest.raises(DataError, match="has 10 tokens but model.vocab_size=8$"):
        load_tokens(cfg, vocab_size=8, cache_dir=cache)
    with pytest.raises(DataError, match="has no tokenizer.json"):
        load_tokens(DataConfig(source="text", path=str(texts), tokenizer=str(texts)), 16, cache)
