"""Pipeline parallelism: measured pp=2 step time per schedule vs the ideal with its bubble.

What it measures
    For m pipeline microbatches per step (m in --microbatches, default 2 4 8):
    - T1: the step time of one process running the whole model on the same m
      microbatches (data.micro_batch = one microbatch, data.grad_accum = m),
      one thread: the work a step holds, done with no pipeline.
    - Tpp: the step time of pp=2 (two processes under torchrun, one thread
      each, data.micro_batch = m microbatches, parallel.microbatches = m) with
      each schedule: gpipe, 1f1b, interleaved_1f1b (2 stages per rank).
    - The ideal pp=2 step: T1 / p spread over the m + p - 1 slots of a
      pipeline with the bubble (p-1)/(m+p-1), i.e. T1 / p · (m+p-1) / m.
    It prints measured / ideal for every schedule and m (1.00 = as fast as the
    bubble allows; above 1 is the cost of stage transfers, the schedule's own
    work and imbalance) and the speed-up over one process, T1 / Tpp.
    Interleaving shrinks the bubble to (p-1)/(v·m+p-1) with v stages per
    rank; the table also shows the ratio against that bound.

How
    Every configuration is a real `atoll train` run (torchrun for pp=2, the
    local backend for pp=1) of the same MoE model, with no checkpoints, eval
    or wandb; the step time is the median of `step_time_s` in metrics.jsonl
    over the steps after the first --warmup (the first steps also infer stage
    shapes). Runs of one m alternate between pp=1 and the schedules, --rounds
    times, and the medians of the rounds are reported.

Run (from the repository root):
    python benchmarks/pipeline.py
    python benchmarks/pipeline.py --microbatches 2 4 8 --steps 14 --rounds 1 [key=value ...]

It always exits 0: it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import load_line, machine_line  # noqa: E402

from atoll.trainer.metrics import read_jsonl  # noqa: E402

PP = 2
SCHEDULES = ["gpipe", "1f1b", "interleaved_1f1b"]
VIRTUAL = 2  # stages per rank for interleaved_1f1b
# An MoE big enough that compute, not the launcher, fills a step: ~0.1 s per
# 128-token microbatch (fwd + bwd) on one core; 8 layers so interleaving has 4 stages.
MODEL = ["model.dim=256", "model.layers=8", "model.heads=8", "model.moe.num_experts=8",
         "model.moe.top_k=2", "data.seq_len=128", "data.max_bytes=2000000"]
QUIET = ["logging.wandb=disabled", "logging.eval_interval=0", "logging.log_interval=1",
         "logging.progress=false", "checkpoint.interval=0", "launch.threads_per_worker=1"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def step_time(args: argparse.Namespace, run_dir: Path, procs: int, overrides: list[str]) -> float:
    """Median step time (s) of one `atoll train` run after the warm-up steps."""
    recipe = [*MODEL, *QUIET, f"run.steps={args.steps}", *overrides, *args.overrides,
              f"run.dir={run_dir}"]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    if procs == 1:
        cmd = [sys.executable, "-m", "atoll.launch", "train", *recipe, "launch.backend=local",
               "parallel.dp=1"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}",
               "--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
               "-m", "atoll.launch", "train", *recipe, "parallel.dp=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(overrides)}): {proc.stderr.strip().splitlines()[-1:]}")
    times = [r["step_time_s"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] > args.warmup]
    return statistics.median(times)


def ideal(t1: float, m: int, virtual: int = 1) -> float:
    """pp=PP step time with nothing but the bubble: T1/p over (v·m+p-1)/(v·m) slots."""
    return t1 / PP * (virtual * m + PP - 1) / (virtual * m)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    print(f"machine: {machine_line(1)} per process")
    print(load_line())
    print(f"model: {' '.join(MODEL)}; {args.steps} steps, median after {args.warmup}; "
          f"{args.rounds} round(s)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="atoll-pipeline-bench-") as tmp:
        for m in args.microbatches:
            t1s, tpps = [], {s: [] for s in SCHEDULES}
            for round_ in range(args.rounds):
                base = Path(tmp) / f"m{m}_r{round_}"
                t1s.append(step_time(args, base / "pp1", 1, ["data.micro_batch=1", f"data.grad_accum={m}"]))
                for schedule in SCHEDULES:
                    tpps[schedule].append(step_time(
                        args, base / schedule, PP,
                        [f"parallel.pp={PP}", f"parallel.pp_schedule={schedule}", f"data.micro_batch={m}",
                         f"parallel.microbatches={m}", f"parallel.pp_virtual_stages={VIRTUAL}"]))
                print(f"  m={m} round {round_ + 1}: pp=1 {t1s[-1] * 1e3:.0f} ms, "
                      + ", ".join(f"{s} {tpps[s][-1] * 1e3:.0f} ms" for s in SCHEDULES), flush=True)
            t1 = statistics.median(t1s)
            for schedule in SCHEDULES:
                tpp = statistics.median(tpps[schedule])
                virtual = VIRTUAL if schedule == "interleaved_1f1b" else 1
                rows.append((m, schedule, t1, tpp, ideal(t1, m), ideal(t1, m, virtual)))
    print(load_line())
    print()
    print(f"| m | schedule | pp=1 step | pp={PP} step | ideal (bubble (p-1)/(m+p-1)) | "
          f"**measured / ideal** | own bound (v·m) | measured / own bound | speed-up T1/Tpp |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m, schedule, t1, tpp, ideal_s, own_s in rows:
        print(f"| {m} | {schedule} | {t1 * 1e3:.0f} ms | {tpp * 1e3:.0f} ms | {ideal_s * 1e3:.0f} ms | "
              f"**{tpp / ideal_s:.2f}** | {own_s * 1e3:.0f} ms | {tpp / own_s:.2f} | {t1 / tpp:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
