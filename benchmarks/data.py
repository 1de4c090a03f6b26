"""Real corpora: tokenisation throughput, the start on an existing cache, the loader's share of a step.

What it measures
    1. Tokenisation throughput of `data.source: dataset` (trainer/data_cache.py) with a real
       tokenizer: a byte-level BPE of --vocab tokens that the benchmark trains first with the
       `tokenizers` library on the standard library's source (nothing is downloaded). The
       corpus is the standard library's .py files, one document each, repeated to --mb MB
       of text, written as jsonl (tokenised in 8 MB ranges) and as parquet (row groups of 256 documents, ~4 MB). Each format
       is tokenised into a fresh cache by 1 and by 2 worker processes; MB/s is the documents'
       text (UTF-8 bytes) over the wall time of the whole build (start, parts, join).
    2. The start of a run whose cache exists: a --cache-gb GB byte-level cache (no tokenizer:
       2 bytes per character), built once; then, in a fresh process each time, the seconds
       from `build_data` (find the corpus, key the cache, map it, permute its windows) to
       the first batch of the default recipe's shapes. Three fresh processes; the page cache
       is warm after the build, as it is for a restart.
    3. The loader's share of step time on the default recipe (`atoll train`: Ray, 2 workers,
       its model, --steps steps): the `data_s` metric (seconds per step spent making batches,
       measured in the train loop) over `step_time_s`, summed over the logged steps after
       the first 10, for the recipe's own data and for a byte-level 3-source mixture
       (jsonl 0.5, parquet 0.3, arrow 0.2) of the corpus of part 1.

Targets (issue [13/13]): the first batch of a run with a 1 GB cache in under 2 s; data loading
<= 2% of step time on the default recipe.

Run (from the repository root; about 5 minutes on 2 cores, 1.5 GB of disk in a temporary folder):
    python benchmarks/data.py [--mb 32] [--cache-gb 1] [--steps 100] [--vocab 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import load_line, machine_line  # noqa: E402

from atoll.trainer.data_cache import cached_tokens  # noqa: E402
from atoll.trainer.data_documents import open_corpus  # noqa: E402

FIRST_BATCH = """
import sys, time
from pathlib import Path
from atoll.trainer.config import DataConfig
from atoll.trainer.data import build_data
imported = time.perf_counter()
cfg = DataConfig(source="dataset", path=sys.argv[1], seq_len=128, micro_batch=8)
dataset, loader = build_data(cfg, 0, 0, 2, 256, cache_dir=Path(sys.argv[2]))
batch = loader.next_step()
print(time.perf_counter() - imported, flush=True)
"""


def stdlib_documents() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            docs.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    return docs


def repeated(docs: list[str], megabytes: float) -> list[str]:
    out, size, i = [], 0, 0
    while size < megabytes * 1e6:
        out.append(docs[i % len(docs)])
        size += len(out[-1].encode())
        i += 1
    return out


def train_tokenizer(docs: list[str], vocab: int, folder: Path) -> float:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    started = time.perf_counter()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(docs, trainer)
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return time.perf_counter() - started


def write_corpus(docs: list[str], folder: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    table = pa.table({"text": docs})
    pq.write_table(table, folder / "corpus.parquet", row_group_size=256)
    with pa.OSFile(str(folder / "corpus.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=256)
    return {kind: folder / f"corpus.{kind}" for kind in ("jsonl", "parquet", "arrow")}


def throughput(path: Path, tokenizer: Path, workers: int, cache: Path, text_mb: float) -> tuple[float, int]:
    started = time.perf_counter()
    target = cached_tokens(open_corpus(str(path)), str(tokenizer), "text", cache, None, workers, path.name)
    seconds = time.perf_counter() - started
    return text_mb / seconds, target.stat().st_size // 2


def first_batch_seconds(corpus: Path, cache: Path) -> list[float]:
    times = []
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", FIRST_BATCH, str(corpus), str(cache)], capture_output=True,
                              text=True, check=True)
        times.append(float(proc.stdout.split()[-1]))  # the last line: progress may come first
    return times


def loader_share(tmp: Path, name: str, steps: int, overrides: list[str]) -> tuple[float, float, float]:
    run_dir = tmp / f"run-{name}"
    cmd = [sys.executable, "-m", "atoll.launch", "train", f"run.steps={steps}", f"run.dir={run_dir}",
           "logging.wandb=disabled", "logging.log_interval=1", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{name}: atoll train failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] > 10]
    data_s, step_s = sum(r["data_s"] for r in rows), sum(r["step_time_s"] for r in rows)
    return data_s / step_s, 1e3 * data_s / len(rows), 1e3 * step_s / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=32, help="MB of text for the throughput corpus")
    parser.add_argument("--cache-gb", type=float, default=1.0, help="size of the cache the start is timed on")
    parser.add_argument("--steps", type=int, default=100, help="steps of each default-recipe run")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary of the BPE tokenizer")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    print(load_line(), flush=True)
    with tempfile.TemporaryDirectory(prefix="atoll-data-bench-") as tmp_name:
        tmp = Path(tmp_name)
        stdlib = stdlib_documents()
        seconds = train_tokenizer(stdlib, args.vocab, tmp / "tokenizer")
        print(f"BPE tokenizer of {args.vocab} tokens trained on {len(stdlib)} files in {seconds:.1f} s", flush=True)
        docs = repeated(stdlib, args.mb)
        text_mb = sum(len(d.encode()) for d in docs) / 1e6
        files = write_corpus(docs, tmp / "corpus")

        print(f"\n## Tokenisation: {len(docs):,} documents, {text_mb:.1f} MB of text\n", flush=True)
        print("| format | workers | MB/s | tokens | vs 1 worker |\n|---|---|---|---|---|", flush=True)
        for kind in ("jsonl", "parquet"):
            one = None
            for workers in (1, 2):
                rate, tokens = throughput(files[kind], tmp / "tokenizer", workers, tmp / f"cache-{kind}-{workers}",
                                          text_mb)
                one = one or rate
                print(f"| {kind} | {workers} | {rate:.2f} | {tokens:,} | {rate / one:.2f}x |", flush=True)

        print(f"\n## Start on an existing {args.cache_gb:g} GB cache\n", flush=True)
        big = repeated(stdlib, args.cache_gb * 1e3 / 2)  # bytes: 2 cache bytes per text byte
        big_files = write_corpus(big, tmp / "big")
        for kind in ("parquet", "arrow"):
            big_files[kind].unlink()
        started = time.perf_counter()
        cache = cached_tokens(open_corpus(str(big_files["jsonl"])), None, "text", tmp / "big-cache", None, 2,
                              "big corpus")
        build_s = time.perf_counter() - started
        times = first_batch_seconds(big_files["jsonl"], tmp / "big-cache")
        print(f"cache {cache.stat().st_size / 1e9:.2f} GB built in {build_s:.1f} s (bytes, 2 workers); "
              f"first batch of a fresh process: {', '.join(f'{t:.2f}' for t in times)} s "
              f"(target < 2 s: {'met' if max(times) < 2 else 'MISSED'})", flush=True)
        big_files["jsonl"].unlink()
        cache.unlink()

        print(f"\n## Loader share of step time, default recipe, {args.steps} steps\n", flush=True)
        mixture = ("data.mixture=[" + ",".join(
            f"{{name: {kind}, weight: {w}, source: dataset, path: '{files[kind]}'}}"
            for kind, w in (("jsonl", 0.5), ("parquet", 0.3), ("arrow", 0.2))) + "]")
        print("| data | data_s / step_time_s | data ms/step | step ms |\n|---|---|---|---|", flush=True)
        for name, overrides in (("stdlib (the recipe's)", []), ("mixture of 3 byte-level sources", [mixture])):
            share, data_ms, step_ms = loader_share(tmp, name.split()[0], args.steps, overrides)
            print(f"| {name} | {100 * share:.2f}% ({'met' if share <= 0.02 else 'MISSED'}) | {data_ms:.2f} | "
                  f"{step_ms:.1f} |", flush=True)
    print(load_line(), flush=True)


if __name__ == "__main__":
    main()
