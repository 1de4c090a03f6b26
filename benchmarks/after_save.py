"""Step time before and after the first disk checkpoint, in one run, memory tier on.

What it measures
    Whether a disk checkpoint leaves training slower after it has committed
    (ISSUE: "after the first disk checkpoint, training stays slower while memory
    snapshots are on"). One run of the issue's model (dim 256, 4 layers, 8
    experts, one process) takes a memory snapshot every step
    (`checkpoint.memory_interval`, default 1, into a /dev/shm store as under
    torchrun) and a disk checkpoint at step SAVE_AT. It prints the median step
    time of the steps before the save and of the steps after it has committed
    (the save's own step and the one after it are always left out: the first
    holds a sync save, the second an async save's staging copy; steps that begin
    while an async save is still being written are counted and shown apart, as
    they share the cores with the save's own work) and their ratio, for
    `checkpoint.async` false and true. Target: after / before <= 1.05 for both.

    Besides wall time it prints the training thread's CPU time per step and the
    CPU the async writer process used over the window after the save: on a
    loaded machine the wall times move with other work, the CPU times much less,
    and a slowdown whose CPU shows up in neither comes from outside the trainer.

How
    Each run is a fresh subprocess (its allocator, threads and page cache start
    as a user's would); the two modes alternate over ROUNDS rounds, the one that
    goes first switching every round. Each step is `Trainer.one_step()` (train
    step and every hook: metrics, snapshot, checkpoint), timed alone.

Run (from the repository root; a few minutes on 2 cores):
    python benchmarks/after_save.py                     # defaults below
    python benchmarks/after_save.py --save-at 20 --after 15 --rounds 2 [key=value ...]
    python benchmarks/after_save.py --memory-interval 0   # the same without memory snapshots

It always exits 0: it is a benchmark, not a test; the last line says PASS/FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import load_line, machine_line  # noqa: E402

TARGET = 1.05
MODEL = ["model.dim=256", "model.layers=4", "model.moe.num_experts=8"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Median step time before vs after the first disk checkpoint.")
    parser.add_argument("--save-at", type=int, default=20,
                        help="step of the first disk save; the steps before it from SAVE_AT/2 are 'before'")
    parser.add_argument("--after", type=int, default=15, help="steps measured after the save (default 15)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per mode, alternated (default 2)")
    parser.add_argument("--memory-interval", type=int, default=1,
                        help="checkpoint.memory_interval; 0 turns the memory tier off (default 1)")
    parser.add_argument("--one", choices=("sync", "async"), help=argparse.SUPPRESS)  # a child run
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    args = parser.parse_args(argv)
    if args.save_at < 4 or args.after < 3 or args.rounds < 1 or args.memory_interval < 0:
        parser.error("--save-at >= 4, --after >= 3, --rounds >= 1, --memory-interval >= 0")
    return args


# ---------------------------------------------------------------- one run (child process)

def one_run(args: argparse.Namespace) -> None:
    """Train SAVE_AT + AFTER + 1 steps and print one JSON line of per-step timings."""
    from atoll.checkpoint.snapshot_store import ShmSnapshotStore
    from atoll.trainer.config import load_recipe
    from atoll.trainer.hooks import RunControl
    from atoll.trainer.train import Trainer

    with tempfile.TemporaryDirectory(prefix="atoll-after-save-") as tmp:
        steps = args.save_at + args.after + 1  # the last step saves too (end of run): not measured
        overrides = [*MODEL, "launch.backend=local", "parallel.dp=1", f"run.steps={steps}",
                     f"run.dir={tmp}/run", f"checkpoint.interval={args.save_at}",
                     f"checkpoint.async={str(args.one == 'async').lower()}",
                     f"checkpoint.memory_interval={args.memory_interval}", "logging.log_interval=1",
                     "logging.eval_interval=0", "logging.progress=false", "logging.wandb=disabled",
                     *args.overrides]
        cfg = load_recipe(None, overrides)
        store = ShmSnapshotStore(Path(tmp) / "snapshots") if args.memory_interval else None
        trainer = Trainer(cfg, control=RunControl(snapshot_store=store))
        rows = []
        try:
            writer = trainer.checkpointer.writer_process
            while trainer.step < trainer.last_step:
                trainer.checkpointer.poll()  # as the step's hook would: a finished save is cleared
                saving = trainer.checkpointer.in_flight is not None
                wall, cpu = time.perf_counter(), time.thread_time()
                trainer.one_step()
                rows.append({"step": trainer.step, "wall_s": time.perf_counter() - wall,
                             "cpu_s": time.thread_time() - cpu, "writer_cpu_s": _cpu_of(writer),
                             "saving": saving})
            trainer.run()  # nothing left to train: closes the hooks and the checkpointer as a run does
        finally:
            trainer.close(clean=True)
            if store is not None:
                store.clear()
    print(json.dumps({"rows": rows}))


def _cpu_of(writer) -> float:
    """CPU seconds the writer process has used so far (0 without one)."""
    if writer is None or writer.pid is None:
        return 0.0
    try:
        times = psutil.Process(writer.pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


# ---------------------------------------------------------------- the comparison

def windows(rows: list[dict], save_at: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(steps before the save, from SAVE_AT/2; steps after it, from the second one after it,
    that began with an async save still in flight; the same once it had committed)."""
    before = [r for r in rows if save_at // 2 <= r["step"] < save_at]
    after = [r for r in rows if save_at + 2 <= r["step"] < rows[-1]["step"]]
    return before, [r for r in after if r["saving"]], [r for r in after if not r["saving"]]


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.one:
        one_run(args)
        return
    print(machine_line())
    print(load_line())
    print(f"model {' '.join(MODEL)}; first disk save at step {args.save_at}; "
          f"memory snapshots every {args.memory_interval or 'never'} step(s); {args.rounds} round(s)")
    results: dict[str, list[dict]] = {"sync": [], "async": []}
    for round_ in range(args.rounds):
        for mode in (("sync", "async") if round_ % 2 == 0 else ("async", "sync")):
            command = [sys.executable, __file__, "--one", mode, "--save-at", str(args.save_at),
                       "--after", str(args.after), "--memory-interval", str(args.memory_interval),
                       *args.overrides]
            done = subprocess.run(command, capture_output=True, text=True, env=_child_env())
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                print(f"{mode} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
                print("FAIL: a run failed")
                return
            rows = json.loads(lines[-1])["rows"]
            before, writing, after = windows(rows, args.save_at)
            if len(after) < 3:
                print(f"FAIL: the {mode} save of step {args.save_at} was still in flight after "
                      f"{len(writing)} steps: raise --after")
                return
            result = {"before": median(before, "wall_s"), "after": median(after, "wall_s"),
                      "cpu_before": median(before, "cpu_s"), "cpu_after": median(after, "cpu_s"),
                      "writer_after": rows[-2]["writer_cpu_s"] - before[-1]["writer_cpu_s"]}
            results[mode].append(result)
            in_flight = (f"; {len(writing)} step(s) began with the save in flight, median "
                         f"{median(writing, 'wall_s'):.3f} s" if writing else "")
            print(f"round {round_ + 1} {mode:5s}: step {result['before']:.3f} s before, {result['after']:.3f} s "
                  f"after ({result['after'] / result['before']:.2f}x){in_flight}; training thread CPU "
                  f"{result['cpu_before']:.3f} -> {result['cpu_after']:.3f} s; writer process CPU "
                  f"{result['writer_after']:.2f} s over the steps after", flush=True)
    print()
    print(f"{'mode':6s} {'before s':>9s} {'after s':>9s} {'ratio':>6s} {'cpu ratio':>9s}")
    worst = 0.0
    for mode, runs in results.items():
        before = statistics.median(r["before"] for r in runs)
        after = statistics.median(r["after"] for r in runs)
        ratio = statistics.median(r["after"] / r["before"] for r in runs)
        cpu_ratio = statistics.median(r["cpu_after"] / r["cpu_before"] for r in runs)
        worst = max(worst, ratio)
        print(f"{mode:6s} {before:9.3f} {after:9.3f} {ratio:6.2f} {cpu_ratio:9.2f}")
    print(load_line())
    verdict = "PASS" if worst <= TARGET else "FAIL"
    print(f"{verdict}: step time after the first save / before it, worst mode {worst:.2f} (target <= {TARGET})")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # the child's 1-rank group picks a free port itself
        env.pop(name, None)
    return env


if __name__ == "__main__":
    main(sys.argv[1:])
