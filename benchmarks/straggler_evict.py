"""Throughput lost to a straggler: `fault_tolerance.straggler` report vs evict, against a clean run.

    python benchmarks/straggler_evict.py [--steps 200] [--factor 1.6] [--slow-from 10]
                                         [--window 20] [--evict-after 50] [key=value ...]

Three runs of the default recipe (2 ranks), each on a fresh three-node Ray
cluster on this machine (Ray's `cluster_utils.Cluster`, 1 CPU per node: one
node stays free) joined with `launch.ray_address`, memory snapshots every step:

- `clean`: nothing slowed;
- `report`: from step `--slow-from` on, rank 1's process is duty-cycled from
  outside `--factor` times slower (tests/slowdown.py: SIGSTOP/SIGCONT, 100 ms
  period) until the run ends; the straggler is only reported;
- `evict`: the same, with `fault_tolerance.straggler=evict`: once named and past
  `--evict-after` steps of cost, the run moves to the free node.

Tokens/s is counted from step `--slow-from` to the last step on the wall
clock, restarts included, and printed relative to the clean run. For evict, the
median step time after the move (from 20 steps after its restart, once the new
processes have warmed up) is compared with the clean run's over the same steps
(the issue's bound: within 10%). `--window` and `--evict-after` default to the
recipe's defaults. Extra `key=value` arguments go to all three runs.
benchmarks/straggler.py runs it after its detection trials
(`throughput_report_vs_evict`); `report_vs_evict(tmp, ...)` returns the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from machine import load_line, machine_line  # noqa: E402
from recovery import events, last_step, read_jsonl, wait_for  # noqa: E402
from slowdown import duty_cycle, slowdown_fraction  # noqa: E402

QUIET = ["logging.wandb=disabled", "logging.eval_interval=0", "logging.log_interval=1",
         "checkpoint.interval=0", "logging.progress=false", "checkpoint.memory_interval=1"]
SETTLED_AFTER = 20  # steps after the move before its step time counts


class ThreeNodes:
    """A head and two worker nodes on 127.0.0.1, 1 CPU each: two ranks and a free node."""

    def __init__(self, tmp: Path):
        os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_TMPDIR=str(tmp))
        from ray.cluster_utils import Cluster

        from atoll.launch.ray_backend import HEALTH_CHECKS

        args = dict(num_cpus=1, object_store_memory=256 * 1024 * 1024, node_ip_address="127.0.0.1")
        self.cluster = Cluster(initialize_head=True, head_node_args=dict(
            args, _system_config=dict(HEALTH_CHECKS), include_dashboard=False))
        for _ in range(2):
            self.cluster.add_node(**args)
        self.cluster.wait_for_nodes()
        self.address = self.cluster.address

    def close(self) -> None:
        self.cluster.shutdown()


def straggler_run(tmp: Path, mode: str, steps: int, factor: float, slow_from: int, extra: list[str]) -> dict:
    """One run (`clean`, `report` or `evict`) on a fresh three-node cluster."""
    cluster = ThreeNodes(tmp)
    run_dir = tmp / f"straggler-{mode}"
    straggler = "report" if mode == "clean" else mode
    proc = subprocess.Popen([sys.executable, "-m", "atoll.launch", "train", *QUIET, f"run.steps={steps}",
                             f"fault_tolerance.straggler={straggler}", f"launch.ray_address={cluster.address}",
                             *extra, f"run.dir={run_dir}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        wait_for(lambda: last_step(run_dir) >= slow_from, 600, proc)
        started = time.time()
        pid = events(run_dir, "workers")[0]["ranks"][1]["pid"]
        slowed = duty_cycle(pid, slowdown_fraction(factor)) if mode != "clean" else contextlib.nullcontext()
        with slowed:  # ends by itself once an eviction has ended the process
            wait_for(lambda: last_step(run_dir) >= steps, 3600, proc)
            ended = time.time()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        cluster.close()
    rows = read_jsonl(run_dir / "metrics.jsonl")
    tokens = rows[-1]["tokens"] - next(r["tokens"] for r in rows if r["step"] == slow_from)
    restarts = events(run_dir, "restart")
    return {"tokens_per_s": tokens / (ended - started),
            "named_at": next((e["step"] for e in events(run_dir, "straggler")), None),
            "moved_at": restarts[0]["resume_step"] if restarts else None,
            "recovery_s": restarts[0]["recovery_s"] if restarts else None,
            "step_times": {r["step"]: r["step_time_s"] for r in rows}}


def report_vs_evict(tmp: Path, steps: int = 200, factor: float = 1.6, slow_from: int = 10,
                    extra: tuple[str, ...] = ()) -> dict:
    """The three runs and the figures: tokens/s of each relative to clean, and for evict the
    median step time after the move over the clean run's."""
    runs = {mode: straggler_run(tmp, mode, steps, factor, slow_from, list(extra))
            for mode in ("clean", "report", "evict")}
    clean = runs["clean"]["tokens_per_s"]
    figures = {mode: run["tokens_per_s"] / clean for mode, run in runs.items()}
    moved = runs["evict"]["moved_at"]
    after = range(moved + SETTLED_AFTER, steps + 1) if moved else range(0)
    if len(after) >= 5:
        figures["step_time_after_move"] = (statistics.median(runs["evict"]["step_times"][s] for s in after)
                                           / statistics.median(runs["clean"]["step_times"][s] for s in after))
    print(f"\n{factor}x straggler (rank 1) from step {slow_from}, {steps} steps, 2 ranks on 3 one-CPU nodes "
          f"({' '.join(extra) or 'recipe defaults'}):")
    print("| run | tokens/s | of clean | named at step | moved at step | recovery s |")
    print("|---|---|---|---|---|---|")
    for mode, run in runs.items():
        print(f"| {mode} | {run['tokens_per_s']:,.0f} | {figures[mode]:.3f} | {run['named_at'] or '-'} | "
              f"{run['moved_at'] or '-'} | {run['recovery_s'] or '-'} |")
    if "step_time_after_move" in figures:
        print(f"evict: median step time of steps {after.start}-{steps} over the clean run's: "
              f"{figures['step_time_after_move']:.3f} (bound 1.10)")
    else:
        print("evict: no move early enough to compare the step time after it")
    return figures


def main() -> int:
    from atoll.trainer.config import FaultToleranceConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--factor", type=float, default=1.6)
    parser.add_argument("--slow-from", type=int, default=10)
    parser.add_argument("--window", type=int, default=FaultToleranceConfig.straggler_window)
    parser.add_argument("--evict-after", type=float, default=FaultToleranceConfig.straggler_evict_after)
    args, overrides = parser.parse_known_args()
    extra = (f"fault_tolerance.straggler_window={args.window}",
             f"fault_tolerance.straggler_evict_after={args.evict_after:g}", *overrides)
    print(machine_line())
    print(f"start: {load_line()}")
    with tempfile.TemporaryDirectory(prefix="atoll-evict-", dir="/tmp") as tmp:
        report_vs_evict(Path(tmp), args.steps, args.factor, args.slow_from, extra)
    print(f"end: {load_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
