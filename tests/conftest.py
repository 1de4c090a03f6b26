"""Shared test helpers: small recipes, CLI subprocesses and a leftover-process check."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU interpreter here. Triton reads this when it is
    # first imported (DeepSpeed imports it too), so it is set before anything else.
    os.environ.setdefault("TRITON_INTERPRET", "1")
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from atoll.checkpoint.dcp_io import read_tensors
from atoll.checkpoint.manifest import verify
from atoll.checkpoint.store import resolve_checkpoint
from atoll.trainer.metrics import read_jsonl

# A tiny MoE that trains in well under a second per step on one core.
TINY_MOE = [
    "model.dim=64", "model.layers=2", "model.heads=4", "model.moe.num_experts=4",
    "model.moe.top_k=2", "data.seq_len=32", "data.micro_batch=2", "data.max_bytes=400000",
    "logging.wandb=disabled", "logging.eval_interval=0", "logging.log_interval=1",
    "launch.threads_per_worker=1",
    # The tests written for FSDP keep it (auto would pick DDP for so small a model); those
    # that test DDP or auto say so after these.
    "parallel.dp_shard=fsdp",
]

# Every subprocess a test starts carries this marker in its environment, so
# the session can prove none of them (nor their children) outlived the suite.
MARKER = "ATOLL_TEST_SESSION"
SESSION_ID = f"{os.getpid()}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", PYTHONUNBUFFERED="1", **extra)
    env[MARKER] = SESSION_ID
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    if "MASTER_PORT" not in extra:  # an in-process run of this session set it, and may still hold it
        env.pop("MASTER_PORT", None)
    return env


def run_two_ranks(args: list[str], timeout: float = 180) -> list[str]:
    """Run `python ARGS...` as ranks 0 and 1 of a two-process group on loopback; their
    outputs. The test fails, with the tail of both outputs, unless both exit 0."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = subprocess_env(MASTER_PORT=str(port))  # it drops RANK and WORLD_SIZE: set them after
        env.update(RANK=str(rank), WORLD_SIZE="2")
        procs.append(subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env=env))
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(out[-3000:] for out in outputs)
    return outputs


def run_cli(args: list[str], timeout: float = 300, env: dict | None = None,
            torchrun_procs: int = 0) -> subprocess.CompletedProcess:
    """`atoll ...` (or torchrun with N processes) in a subprocess, output captured."""
    if torchrun_procs:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={torchrun_procs}",
               "--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
               "-m", "atoll.launch", *args]
    else:
        cmd = [sys.executable, "-m", "atoll.launch", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=env or subprocess_env())


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl")]


def grad_norms(run_dir: Path) -> list[float]:
    return [r["grad_norm"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl")]


def moe_stats(run_dir: Path) -> list[dict]:
    """Per logged step, every `moe.<layer>.<stat>` (max_load, mean_load, dropped)."""
    return [{k: v for k, v in r.items() if k.startswith("moe.")}
            for r in read_jsonl(Path(run_dir) / "metrics.jsonl")]


def assert_same_metrics(got_dir: Path, want_dir: Path, names=("loss", "grad_norm"), rel: float = 1e-5,
                        first_step: int = 1) -> None:
    """The same logged steps and samples as the reference from `first_step` on, and each of
    `names` within `rel` of the reference's at every step (rel=0: exactly equal)."""
    got = read_jsonl(Path(got_dir) / "metrics.jsonl")
    want = [r for r in read_jsonl(Path(want_dir) / "metrics.jsonl") if r["step"] >= first_step]
    assert got and [r["step"] for r in got] == [r["step"] for r in want]
    assert [r["samples"] for r in got] == [r["samples"] for r in want]
    for name in names:
        values, expected = [r[name] for r in got], [r[name] for r in want]
        if rel:
            assert values == pytest.approx(expected, rel=rel), name
        else:
            assert values == expected, name


# ------------------------------------------------------------ runs in flight

def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = resolve_checkpoint(run_dir)
    return read_tensors(ckpt, verify(ckpt)["tensors"])


def assert_same_state(got_dir: Path, want_dir: Path) -> None:
    got, want = final_state(got_dir), final_state(want_dir)
    assert got.keys() == want.keys()
    assert any(k.endswith(".exp_avg_sq") for k in want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def checkpoint_model(path: Path):
    """The model of a checkpoint (a step, checkpoints or run folder; any layout) as one
    single-device Transformer in eval mode."""
    from atoll.checkpoint.tools import model_weights
    from atoll.trainer.config import model_config, recipe_from_dict
    from atoll.trainer.model import Transformer

    manifest, weights = model_weights(path)
    model = Transformer(model_config(recipe_from_dict(manifest["recipe"])))
    model.load_state_dict(weights)
    return model.eval()


def assert_close_state(got_dir: Path, want_dir: Path, tol: float = 1e-6) -> dict[str, torch.Tensor]:
    """Every tensor of the newest checkpoints (weights, buffers, both Adam moments and the
    step) within `tol`: relative, and absolute on the scale of that tensor's largest value
    (so that near-zero entries of a tensor compare like the rest); returns the reference's."""
    got, want = final_state(got_dir), final_state(want_dir)
    assert got.keys() == want.keys()
    for suffix in (".exp_avg", ".exp_avg_sq", ".step"):
        assert any(k.startswith("optim.state.") and k.endswith(suffix) for k in want), suffix
    for name in want:
        scale = want[name].abs().max().item() if want[name].numel() else 0.0
        torch.testing.assert_close(got[name], want[name], rtol=tol, atol=tol * scale, msg=name)
    return want


def events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == kind]


def wait_for(predicate, timeout: float, proc: subprocess.Popen, what: str):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"run ended (exit {proc.returncode}) while waiting for {what}:\n"
                                 f"{out[-2000:]}\n{err[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def last_step(run_dir: Path) -> int:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    return rows[-1]["step"] if rows else 0


def start_ray_run(args: list[str], short_tmp: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "atoll.launch", "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(RAY_TMPDIR=str(short_tmp)))


def start_torchrun(args: list[str], procs: int, max_restarts: int) -> subprocess.Popen:
    """`torchrun --max-restarts` running `atoll.launch ARGS` in the background."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}", "--nnodes=1",
           f"--max-restarts={max_restarts}", "--monitor-interval=0.1", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "atoll.launch", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env())


def torchrun_ranks(proc: subprocess.Popen) -> dict[str, psutil.Process]:
    """RANK -> process of the training processes a torchrun started."""
    ranks = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "atoll.launch" in " ".join(child.cmdline()) and child.environ().get("RANK"):
                ranks[child.environ()["RANK"]] = child
    return ranks


@contextlib.contextmanager
def ended(proc: subprocess.Popen):
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """The run's output once it ends; past `timeout`, a failure that shows what still runs."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        alive = []
        for child in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            with contextlib.suppress(psutil.Error):
                alive.append(f"{child.pid} {child.status()} {' '.join(child.cmdline())[:160]}")
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        raise AssertionError(f"run still going after {timeout} s (exit {proc.poll()}); processes:\n"
                             + "\n".join(alive) + f"\nstderr tail:\n{err[-6000:]}") from None


RESULT_TIMEOUT_S = 240  # a loaded 2-core machine is slow to spawn and import


@contextlib.contextmanager
def spawned():
    """(start(target, *args), results queue) for processes spawned by torch.multiprocessing;
    `target` gets the queue as its last argument. Every process started is gone afterwards,
    also when the test failed before reading what the processes sent."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results, procs = ctx.Queue(), []

    def start(target, *args):
        proc = ctx.Process(target=target, args=(*args, results))
        proc.start()
        procs.append(proc)
        return proc

    try:
        yield start, results
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()


@pytest.fixture
def short_tmp():
    """A short path for Ray's session folder (unix sockets cap path length)."""
    path = tempfile.mkdtemp(prefix="atoll-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


# Two FSDP ranks of the tiny MoE for 60 steps: the recipe of the runs that are killed, restarted
# or stopped on the way and must end bitwise where one uninterrupted run ends. Checkpoint and
# snapshot intervals, launcher and run name do not change the numbers: tests add their own.
DP2_SIXTY = [*TINY_MOE, "parallel.dp=2", "run.steps=60"]


@pytest.fixture(scope="session")
def dp2_sixty_reference(tmp_path_factory) -> Path:
    """The uninterrupted torchrun run of DP2_SIXTY (run once, shared by the tests that need it)."""
    run_dir = tmp_path_factory.mktemp("dp2_sixty") / "reference"
    done = run_cli(["train", *DP2_SIXTY, "checkpoint.interval=1000", f"run.dir={run_dir}"], torchrun_procs=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def pytest_collection_modifyitems(config, items):
    """GPU checks are deselected (not skipped) on machines without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def _marked_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get(MARKER) == SESSION_ID:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.fixture(scope="session", autouse=True)
def no_processes_left_behind():
    yield
    leftovers = _marked_processes()
    if leftovers:
        names = [f"{p.pid}:{' '.join(p.cmdline()[:3])}" for p in leftovers]
        for proc in leftovers:  # ours, found by the marker we set: safe to end
            proc.kill()
        pytest.fail(f"processes left behind by the test suite: {names}")


def word_level_tokenizer(folder: Path, words: list[str]) -> Path:
    """A local tokenizer folder as save_pretrained writes it (tokenizer.json and a
    tokenizer_config.json naming the end-of-text token): <unk> 0, </s> 1, then `words`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    return folder


# ------------------------------------------------------------ corpora the data tests write

WORDS = ["the", "island", "trains", "one", "model", "and", "talks", "rarely", "over", "slow", "links",
         "experts", "route", "tokens", "to", "many", "machines", "fail", "resume", "from", "checkpoints"]


def corpus(n: int, seed: int) -> list[str]:
    """n documents of 1-30 of WORDS, a few with a word a WORDS tokenizer does not know."""
    import numpy as np

    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        words = list(rng.choice(WORDS, size=int(rng.integers(1, 30))))
        if i % 7 == 3:
            words.insert(1, "unknown")
        docs.append(" ".join(words))
    return docs


def write_jsonl(path: Path, docs: list[str], opener=open, extra=None) -> Path:
    """Records {"id", "body"} (the text in `body`), with a blank line now and then."""
    import json

    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "body": d, **(extra or {})}) + "\n")
            if i % 5 == 2:
                f.write("\n")  # blank lines are skipped
    return path


def write_parquet(path: Path, docs: list[str], row_group_size: int = 16) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), "body": docs}), path, row_group_size=row_group_size)
    return path


def write_saved_dataset(path: Path, docs: list[str]) -> Path:
    """A folder as Hugging Face `datasets.save_to_disk` writes it, in two shards."""
    import datasets

    datasets.Dataset.from_dict({"body": docs, "n": list(range(len(docs)))}).save_to_disk(str(path), num_shards=2)
    return path


def mixture_recipe(folder: Path) -> Path:
    """A recipe file whose data is a three-source mixture of real corpus files, tokenised with
    a local word-level tokenizer: web (jsonl) 0.5, code (parquet) 0.3, math (save_to_disk) 0.2."""
    tokenizer = word_level_tokenizer(folder / "tokenizer", WORDS)
    web = write_jsonl(folder / "web.jsonl", corpus(300, seed=11))
    code = write_parquet(folder / "code.parquet", corpus(200, seed=12))
    math = write_saved_dataset(folder / "math", corpus(100, seed=13))
    recipe = folder / "mixture.yaml"
    recipe.write_text(
        f"data:\n  tokenizer: {tokenizer}\n  text_field: body\n  tokenize_workers: 1\n  mixture:\n"
        f"    - {{name: web, weight: 0.5, path: {web}}}\n"
        f"    - {{name: code, weight: 0.3, path: {code}}}\n"
        f"    - {{name: math, weight: 0.2, path: {math}}}\n")
    return recipe
