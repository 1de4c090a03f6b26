"""atoll's default run against the plain DDP loop a user would write for the same model.

What it measures
    Training tokens/s (global: both ranks' tokens), median of steps 6-35, of
    - atoll: `atoll train` with the default recipe as users launch it (`python3 dev.py
      train` runs exactly this once its virtual environment exists): the Ray launcher,
      2 workers, dp_shard auto, memory snapshots at their default, asynchronous disk
      checkpoints, wandb offline. Only what makes it shorter and measurable changes:
      run.steps=40 (the first disk checkpoint, at the last step, comes after the
      window), logging.log_interval=1 (a tokens_per_s per step), a fresh run.dir;
    - plain: a DDP loop written here in torch alone: 2 processes on 127.0.0.1
      (torch.multiprocessing), gloo, `DistributedDataParallel` around the same model
      class (`atoll.trainer.model.Transformer` of the default recipe's dims: dim 128,
      4 layers, 8 experts top-2, kernel auto), AdamW (fused where torch has it, as atoll
      uses; the recipe's lr, betas and weight decay) under a LambdaLR warm-up + cosine,
      cross-entropy + the model's aux loss, `clip_grad_norm_(1.0)`, random token
      batches of the same shape (8 sequences of 128 per rank), one thread per process
      (as torchrun and Ray give each worker of a 2-core machine), gloo on the loopback
      interface; rank 0 times each step.
    The two alternate (the side that goes first switches every round), ≥ 2 rounds; the
    last line is atoll / plain (median over rounds of each side's median). Target ≥ 1.1.
    On a loaded machine wall time favours the side with more runnable threads (Ray's
    processes, atoll's snapshot threads), so it also prints tokens per CPU-second of the
    two ranks' processes over the same window (read with psutil from outside for atoll,
    process_time inside the plain loop), which load disturbs far less.

The other figures it is read against (ANCHORS.md, "Measured side by side on this machine";
they cannot be rerun here: they need packages from the network)
    - Ray Train V2, 8,510-8,700 tokens/s: the same kind of plain DDP loop (same model, data
      shape, AdamW, gloo) as the `train_loop_per_worker` of a `ray.train.torch.TorchTrainer`
      with ScalingConfig(num_workers=2), `ray.train.torch.prepare_model` for DDP, a step
      time per step reported by rank 0, median of steps 6-35.
    - torchtitan 0.3.0, 6,590 tokens/s: its Llama-style MoE at the same dims under FSDP2
      (dp_shard=2), fp32, no activation checkpointing, no compile, started by torchrun with
      2 processes on CPU (gloo), tokens/s from its own metrics log, median of steps 6-35.

Run (from the repository root; a few minutes on 2 cores):
    python benchmarks/vs_plain_loop.py [--rounds 2] [--steps 40] [key=value ...]
Extra key=value overrides go to the atoll side only (e.g. checkpoint.memory_interval=0).
Timings on a loaded machine compare only within one run of this script. Always exits 0.
"""

from __future__ import annotations

import argparse
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
WINDOW = (6, 35)  # steps whose tokens/s count, both ends included
PROCS = 2


def median_window(rates_by_step: dict[int, float]) -> float:
    return statistics.median(rate for step, rate in rates_by_step.items() if WINDOW[0] <= step <= WINDOW[1])


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
    cmd = [sys.executable, "-m", "atoll.launch", "train", f"run.steps={steps}", "logging.log_interval=1",
           f"run.dir={run_dir}", *overrides]
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
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in rows if WINDOW[0] <= r["step"] <= WINDOW[1])
    per_cpu = tokens / (cpu[WINDOW[1]] - cpu[WINDOW[0] - 1]) if len(cpu) == 2 else float("nan")
    return median_window({r["step"]: r["tokens_per_s"] for r in rows if "tokens_per_s" in r}), per_cpu


# --------------------------------------------------------------------------- the plain loop


def plain_worker(rank: int, port: int, steps: int, out: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
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
    rates, cpu = {}, {}
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
        rates[step] = PROCS * batch * seq / (now - last)
        last = now
        if step in (WINDOW[0] - 1, WINDOW[1]):
            cpu[step] = time.process_time()  # this process, all its threads
    Path(f"{out}.{rank}").write_text(json.dumps({"rates": rates, "loss": loss_value,
                                                 "tokens_per_step": PROCS * batch * seq,
                                                 "cpu_s": cpu[WINDOW[1]] - cpu[WINDOW[0] - 1]}))
    dist.destroy_process_group()


def run_plain(steps: int, tmp: Path) -> tuple[float, float]:
    """(median tokens/s, tokens per CPU-second of the ranks' processes over the window)."""
    import torch.multiprocessing as mp

    from atoll.parallel.layout import free_port

    out = tmp / f"plain-{time.monotonic_ns()}.json"
    mp.spawn(plain_worker, args=(free_port(), steps, str(out)), nprocs=PROCS, join=True)
    ranks = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(PROCS)]
    rates = {int(step): rate for step, rate in ranks[0]["rates"].items()}
    tokens = ranks[0]["tokens_per_step"] * (WINDOW[1] - WINDOW[0] + 1)
    return median_window(rates), tokens / sum(r["cpu_s"] for r in ranks)


# --------------------------------------------------------------------------- main


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("overrides", nargs="*", help="key=value for the atoll side")
    args = parser.parse_args(argv)
    if args.steps < WINDOW[1]:
        parser.error(f"--steps must reach step {WINDOW[1]}")
    print(machine_line(), flush=True)
    print(load_line(), flush=True)
    atoll, plain, atoll_cpu, plain_cpu = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="vs_plain_") as tmp_name:
        tmp = Path(tmp_name)
        for round_index in range(args.rounds):
            order = ("atoll", "plain") if round_index % 2 == 0 else ("plain", "atoll")
            for side in order:
                rate, per_cpu = run_atoll(args.steps, tmp, args.overrides) if side == "atoll" else \
                    run_plain(args.steps, tmp)
                (atoll if side == "atoll" else plain).append(rate)
                (atoll_cpu if side == "atoll" else plain_cpu).append(per_cpu)
                print(f"  round {round_index + 1} {side:5s}: {rate:8,.0f} tokens/s, {per_cpu:8,.0f} tokens per "
                      f"CPU-second of its ranks", flush=True)
    print(load_line(), flush=True)
    a, p = statistics.median(atoll), statistics.median(plain)
    paired = statistics.median(x / y for x, y in zip(atoll, plain))
    print(f"atoll default {a:,.0f} tokens/s, plain DDP loop {p:,.0f} tokens/s "
          f"(medians of steps {WINDOW[0]}-{WINDOW[1]} over {args.rounds} rounds; paired ratio {paired:.3f})")
    cpu_ratio = statistics.median(atoll_cpu) / statistics.median(plain_cpu)
    print(f"tokens per CPU-second of the ranks (steady on a loaded machine, where wall time favours the "
          f"side with more runnable threads): atoll / plain = {cpu_ratio:.3f}")
    ratio = a / p
    print(f"atoll / plain = {ratio:.3f} (target >= {TARGET}): {'PASS' if ratio >= TARGET else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
