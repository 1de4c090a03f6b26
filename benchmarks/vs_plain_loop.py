"""atoll's default run against the plain DDP loop a user would write for the same model.

What it measures
    Training tokens/s (global: both ranks' tokens) over steps 11-40 (the window's tokens
    over its seconds, so that every step counts, slow ones too), of three sides:
    - atoll: `atoll train` with the default recipe as users launch it (`python3 dev.py
      train` runs exactly this once its virtual environment exists): the Ray launcher,
      2 workers, dp_shard auto, memory snapshots at their default, asynchronous disk
      checkpoints, metrics every 10 steps, wandb offline. Only run.steps=50 (the window
      ends before the recipe's eval and checkpoint at step 50) and a fresh run.dir change;
      the metrics rows of steps 20, 30 and 40 time the window;
    - raytrain: the plain DDP loop a Ray Train user writes, run by Ray Train V2's
      `TorchTrainer` (ScalingConfig(num_workers=2), gloo, `ray.train.torch.prepare_model`
      for the DDP) on a fresh local Ray cluster; it reports to Ray Train once, at the end
      (reporting every step would only slow it down). Needs Ray Train's packages
      (`.venv/bin/pip install -e ".[bench]"`: pandas, pyarrow); without them this side is
      left out;
    - plain: the same loop in torch alone: 2 processes (torch.multiprocessing), gloo on
      127.0.0.1.
    The loop of both plain sides: `DistributedDataParallel` around the same model class
    (`atoll.trainer.model.Transformer` of the default recipe's dims: dim 128, 4 layers, 8
    experts top-2, kernel auto), AdamW (fused where torch has it, as atoll uses; the recipe's
    lr, betas and weight decay) under a LambdaLR warm-up + cosine, cross-entropy + the
    model's aux loss, `clip_grad_norm_(1.0)`, `loss.item()` every step, random token batches
    of the same shape (8 sequences of 128 per rank), one thread per process (as torchrun and
    Ray give each worker of a 2-core machine); rank 0 times each step.
    The sides alternate (the one that goes first moves on every round); the result is the
    median over rounds of each side's rate, atoll / raytrain against the target (>= 1.1)
    and atoll / plain beside it. On a loaded machine wall time favours the side with more
    runnable threads, so it also prints tokens per CPU-second of the two ranks' processes
    over the same window (read with psutil from outside for atoll, process_time inside the
    loops), which load disturbs far less.

The other figure it is read against (ANCHORS.md, "Measured side by side on this machine";
it cannot be rerun here: it needs packages from the network)
    - torchtitan 0.3.0, 6,590 tokens/s: its Llama-style MoE at the same dims under FSDP2
      (dp_shard=2), fp32, no activation checkpointing, no compile, started by torchrun with
      2 processes on CPU (gloo), tokens/s from its own metrics log, median of steps 6-35.

Run (from the repository root; a few minutes on 2 cores):
    python benchmarks/vs_plain_loop.py [--rounds 2] [--steps 50] [key=value ...]
Extra key=value overrides go to the atoll side only (e.g. checkpoint.memory_interval=0).
Timings on a loaded machine compare only within one run of this script. Always exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import load_line, machine_line  # noqa: E402

from atoll.trainer.metrics import read_jsonl  # noqa: E402

TARGET = 1.1
# Steps whose tokens/s count, both ends included: past the warm-up (and dp_shard auto's and
# memory_interval auto's first steps), before the default recipe's eval and checkpoint at 50.
WINDOW = (11, 40)
PROCS = 2


def window_rate(tokens_per_step: float, seconds_by_step: dict[int, float]) -> float:
    """Tokens/s over the window: its tokens over its seconds (every step counts, slow ones too)."""
    steps = [step for step in seconds_by_step if WINDOW[0] <= step <= WINDOW[1]]
    if len(steps) != WINDOW[1] - WINDOW[0] + 1:
        raise RuntimeError(f"steps {WINDOW[0]}-{WINDOW[1]} were not all timed: {sorted(seconds_by_step)}")
    return tokens_per_step * len(steps) / sum(seconds_by_step[step] for step in steps)


# --------------------------------------------------------------------------- atoll




def _ranks_cpu_s(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def run_atoll(steps: int, tmp: Path, overrides: list[str]) -> tuple[float, float]:
    """(median tokens/s, tokens per CPU-second of the ranks' processes over the window)."""
    run_dir = tmp / f"atoll-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "atoll.launch", "train", f"run.steps={steps}", f"run.dir={run_dir}", *overrides]
    log = (tmp / f"{run_dir.name}.log").open("w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    # The ranks' CPU time at the start and the end of the window, read from outside while it runs
    # (on a loaded machine, CPU time is what the two sides compare fairly).
    cpu, pids = {}, []
    while proc.poll() is None and len(cpu) < 2:
        if not pids:
            workers = [e for e in read_jsonl(run_dir / "events.jsonl") if e.get("event") == "workers"]
            pids = [r["pid"] for r in workers[-1]["ranks"]] if workers else []
        done = max((r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")), default=0)
        mark = WINDOW[0] - 1 if not cpu else WINDOW[1]
        if pids and done >= mark and mark not in cpu:
            try:
                cpu[mark] = _ranks_cpu_s(pids)
            except Exception:  # a rank gone: no CPU figure
                break
        time.sleep(0.01)
    proc.wait(timeout=900)
    log.seek(0)
    output = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"atoll train failed ({proc.returncode}): {output[-2000:]}")
    first = next((line for line in output.splitlines() if "training " in line), "")
    if first:  # the layout, dp_shard auto's choice included
        print(f"    {first.strip()}", flush=True)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    # A metrics row covers the steps since the previous one, each at the row's mean step time.
    seconds, previous, tokens_per_step = {}, 0, 0.0
    for row in rows:
        if "tokens_per_s" in row:
            for step in range(previous + 1, row["step"] + 1):
                seconds[step] = row["step_time_s"]
            previous, tokens_per_step = row["step"], row["tokens_per_s"] * row["step_time_s"]
    rate = window_rate(tokens_per_step, seconds)
    tokens = tokens_per_step * (WINDOW[1] - WINDOW[0] + 1)
    per_cpu = tokens / (cpu[WINDOW[1]] - cpu[WINDOW[0] - 1]) if len(cpu) == 2 else float("nan")
    return rate, per_cpu


# --------------------------------------------------------------------------- the plain loop


def plain_steps(model: torch.nn.Module, cfg, rank: int, world: int, steps: int) -> dict:
    """The loop itself, the same on both plain sides: AdamW, warm-up + cosine, clipping."""
    import torch.nn.functional as F

    opt = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=(opt.beta1, opt.beta2),
                                  weight_decay=opt.weight_decay, fused=True)  # CPU too, torch >= 2.4
    total = cfg.run.steps

    def lr_at(step: int) -> float:
        if step < opt.warmup_steps:
            return (step + 1) / opt.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - opt.warmup_steps) / max(1, total - opt.warmup_steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(rank)
    batch, seq, vocab = cfg.data.micro_batch, cfg.data.seq_len, cfg.model.vocab_size
    seconds, cpu = {}, {}
    last = time.perf_counter()
    for step in range(1, steps + 1):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=generator)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logits, aux_loss = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1)) + aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()  # what a loop that prints its loss does every step
        now = time.perf_counter()
        seconds[step] = now - last
        last = now
        if step in (WINDOW[0] - 1, WINDOW[1]):
            cpu[step] = time.process_time()  # this process, all its threads
    return {"seconds": seconds, "loss": loss_value, "tokens_per_step": world * batch * seq,
            "cpu_s": cpu[WINDOW[1]] - cpu[WINDOW[0] - 1]}


def plain_worker(rank: int, port: int, steps: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from atoll.trainer.config import load_recipe, model_config
    from atoll.trainer.model import Transformer

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // PROCS))
    # gloo on the loopback interface, as atoll keeps it on one machine (else it may pick the
    # hostname's interface, much slower in some sandboxes: not what a plain loop is about)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=PROCS)
    cfg = load_recipe("default", [])
    model = Transformer(model_config(cfg))
    model.init_weights(cfg.run.seed)
    model = DistributedDataParallel(model)
    Path(f"{out}.{rank}").write_text(json.dumps(plain_steps(model, cfg, rank, PROCS, steps)))
    dist.destroy_process_group()


def raytrain_loop(config: dict) -> None:
    """Ray Train's `train_loop_per_worker`: the plain loop, with `prepare_model` making the DDP."""
    import ray.train
    import ray.train.torch

    from atoll.trainer.config import load_recipe, model_config
    from atoll.trainer.model import Transformer

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(1)  # the worker's one CPU (Ray sets OMP_NUM_THREADS=1 too)
    cfg = load_recipe("default", [])
    model = Transformer(model_config(cfg))
    model.init_weights(cfg.run.seed)
    model = ray.train.torch.prepare_model(model)  # DistributedDataParallel over gloo
    result = plain_steps(model, cfg, rank, world, config["steps"])
    # Reported once at the end (a report per step would only slow this side down).
    Path(f"{config['out']}.{rank}").write_text(json.dumps(result))
    ray.train.report({"loss": result["loss"]})


def raytrain_main(steps: int, out: str, storage: str) -> None:
    """Run `raytrain_loop` with Ray Train's TorchTrainer on a fresh local cluster (a subprocess)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep the node on 127.0.0.1
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(num_cpus=PROCS, _node_ip_address="127.0.0.1", include_dashboard=False,
             object_store_memory=256 * 2**20, logging_level="WARNING")
    try:
        trainer = TorchTrainer(raytrain_loop, train_loop_config={"steps": steps, "out": out},
                               scaling_config=ScalingConfig(num_workers=PROCS, use_gpu=False),
                               torch_config=TorchConfig(backend="gloo"),
                               run_config=RunConfig(storage_path=storage, name="plain"))
        trainer.fit()
    finally:
        ray.shutdown()


def run_raytrain(steps: int, tmp: Path) -> tuple[float, float]:
    """(median tokens/s, tokens per CPU-second of the ranks) of the loop under Ray Train."""
    out = tmp / f"raytrain-{time.monotonic_ns()}.json"
    proc = subprocess.run([sys.executable, __file__, "--raytrain-side", str(out), "--steps", str(steps)],
                          capture_output=True, text=True, env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"})
    if proc.returncode != 0:
        raise RuntimeError(f"the Ray Train loop failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return _read_loop_results(out)


def _read_loop_results(out: Path) -> tuple[float, float]:
    ranks = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(PROCS)]
    seconds = {int(step): s for step, s in ranks[0]["seconds"].items()}
    tokens = ranks[0]["tokens_per_step"] * (WINDOW[1] - WINDOW[0] + 1)
    return window_rate(ranks[0]["tokens_per_step"], seconds), tokens / sum(r["cpu_s"] for r in ranks)


def run_plain(steps: int, tmp: Path) -> tuple[float, float]:
    """(median tokens/s, tokens per CPU-second of the ranks' processes over the window)."""
    import torch.multiprocessing as mp

    from atoll.parallel.layout import free_port

    out = tmp / f"plain-{time.monotonic_ns()}.json"
    mp.spawn(plain_worker, args=(free_port(), steps, str(out)), nprocs=PROCS, join=True)
    return _read_loop_results(out)


# --------------------------------------------------------------------------- main


SIDES = {"atoll": "atoll default", "raytrain": "plain loop under Ray Train",
         "plain": "plain loop, torch alone"}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--raytrain-side", metavar="OUT", help=argparse.SUPPRESS)  # the subprocess
    parser.add_argument("overrides", nargs="*", help="key=value for the atoll side")
    args = parser.parse_args(argv)
    if args.raytrain_side:
        with tempfile.TemporaryDirectory(prefix="raytrain_") as storage:
            raytrain_main(args.steps, args.raytrain_side, storage)
        return 0
    if args.steps < WINDOW[1]:
        parser.error(f"--steps must reach step {WINDOW[1]}")
    try:
        importlib.import_module("ray.train")  # needs pandas and pyarrow: pip install "ray[train]"
        sides = list(SIDES)
    except ImportError:
        print("ray.train is not importable (pip install \"ray[train]\"): the Ray Train side is left out")
        sides = ["atoll", "plain"]
    print(machine_line(), flush=True)
    print(load_line(), flush=True)
    rates = {side: [] for side in sides}
    per_cpu = {side: [] for side in sides}
    runners = {"atoll": lambda tmp: run_atoll(args.steps, tmp, args.overrides),
               "raytrain": lambda tmp: run_raytrain(args.steps, tmp),
               "plain": lambda tmp: run_plain(args.steps, tmp)}
    with tempfile.TemporaryDirectory(prefix="vs_plain_") as tmp_name:
        tmp = Path(tmp_name)
        for round_index in range(args.rounds):
            # the side that goes first moves on every round
            shift = round_index % len(sides)
            for side in sides[shift:] + sides[:shift]:
                rate, cpu_rate = runners[side](tmp)
                rates[side].append(rate)
                per_cpu[side].append(cpu_rate)
                print(f"  round {round_index + 1} {side:8s}: {rate:8,.0f} tokens/s, {cpu_rate:8,.0f} tokens "
                      f"per CPU-second of its ranks", flush=True)
    print(load_line(), flush=True)
    for side in sides:
        print(f"{SIDES[side]}: {statistics.median(rates[side]):,.0f} tokens/s "
              f"(steps {WINDOW[0]}-{WINDOW[1]}, median over {args.rounds} rounds)")
    for reference, target in (("raytrain", TARGET), ("plain", None)):
        if reference not in sides:
            continue
        ratio = statistics.median(rates["atoll"]) / statistics.median(rates[reference])
        paired = statistics.median(x / y for x, y in zip(rates["atoll"], rates[reference]))
        cpu_ratio = statistics.median(per_cpu["atoll"]) / statistics.median(per_cpu[reference])
        verdict = f" (target >= {target}): {'PASS' if ratio >= target else 'FAIL'}" if target else ""
        print(f"atoll / {SIDES[reference]} = {ratio:.3f}{verdict}; paired {paired:.3f}; "
              f"per CPU-second {cpu_ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
