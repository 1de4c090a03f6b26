"""Fault recovery on the default recipe: detection, recovery and lost steps per failure kind.

    python benchmarks/recovery.py [--injections 10] [--kinds kill,hang,node] [--throughput-steps 80]

For each configuration one `atoll train` run (the default recipe on its own
local Ray cluster, checkpoints off so that only the tier under test serves
the restart) gets `--injections` failures, one after another, each once the
run has stepped a few times since the previous restart:

- `kill`: SIGKILL of a random rank (pid from the `workers` event);
- `hang`: SIGSTOP of a random rank (`fault_tolerance.hang_timeout_s=5`).

Each is run with the memory tier (`checkpoint.memory_interval=1`) and, for
kills, without it (then every restart begins at step 0: its lost steps show
what the tier saves). From events.jsonl: detection (the `failure` event's
time minus the injection's), recovery (injection to the first completed step
after the restart, from the `restart` event), lost steps. Printed as median
and p95. Then the memory tier's throughput cost: median tokens/s of two
failure-free runs, memory_interval=1 over memory_interval=0, alternated
`--throughput-pairs` times (median of each side), printed as a ratio.

- `node`: the run joins a two-node cluster on this machine (Ray's
  `cluster_utils.Cluster`, 1 CPU per node; `launch.ray_address`,
  `fault_tolerance.min_workers=1`, `placement_timeout_s=2`) and the worker
  node is killed with all its processes: the run resumes from the snapshot
  replicas on one worker (a shrink); a new node is then added and the run
  grows back before the next injection.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import load_line, machine_line, percentile  # noqa: E402

from atoll.trainer.metrics import read_jsonl  # noqa: E402

QUIET = ["logging.wandb=disabled", "logging.eval_interval=0", "logging.log_interval=1",
         "checkpoint.interval=0", "logging.progress=false"]




def events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == kind]


def last_step(run_dir: Path) -> int:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    return rows[-1]["step"] if rows else 0


def wait_for(predicate, timeout: float, proc: subprocess.Popen):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.02)


def start(tmp: Path, name: str, extra: list[str]) -> tuple[subprocess.Popen, Path]:
    run_dir = tmp / name
    env = dict(os.environ, RAY_TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "atoll.launch", "train", *QUIET, *extra,
                             f"run.dir={run_dir}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    return proc, run_dir


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def inject(tmp: Path, name: str, kind: str, injections: int, extra: list[str], rng) -> list[dict]:
    """Failures one after another; per failure: detection_s, recovery_s, lost_steps."""
    sig = signal.SIGKILL if kind == "kill" else signal.SIGSTOP
    proc, run_dir = start(tmp, name, ["run.steps=100000", f"fault_tolerance.max_restarts={injections + 1}",
                                      *extra])
    found = []
    try:
        wait_for(lambda: last_step(run_dir) >= 5, 180, proc)
        for i in range(injections):
            restarts = len(events(run_dir, "restart"))
            pid = rng.choice([r["pid"] for r in events(run_dir, "workers")[-1]["ranks"]])
            injected = time.time()
            os.kill(pid, sig)
            wait_for(lambda: len(events(run_dir, "restart")) > restarts, 180, proc)
            failure, restart = events(run_dir, "failure")[-1], events(run_dir, "restart")[-1]
            found.append({"detection_s": failure["time"] - injected,
                          "recovery_s": restart["time"] - injected,
                          "reported_recovery_s": restart["recovery_s"],
                          "lost_steps": restart["lost_steps"], "source": restart["source"],
                          "breakdown": restart.get("breakdown", {})})
            print(f"  {name} #{i + 1}: detected {found[-1]['detection_s']:.2f}s, recovered "
                  f"{found[-1]['recovery_s']:.2f}s, lost {restart['lost_steps']} steps "
                  f"({restart['source']}) | {breakdown_line(found[-1]['breakdown'])}", flush=True)
            start_step = last_step(run_dir)
            wait_for(lambda: last_step(run_dir) >= start_step + 3, 180, proc)
    finally:
        stop(proc)
    return found


class TwoNodes:
    """A head and one worker node on 127.0.0.1, 1 CPU each; the worker node can be lost."""

    def __init__(self, tmp: Path):
        os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_TMPDIR=str(tmp))
        from ray.cluster_utils import Cluster

        from atoll.launch.ray_backend import HEALTH_CHECKS

        self.node_args = dict(num_cpus=1, object_store_memory=256 * 1024 * 1024,
                              node_ip_address="127.0.0.1")
        self.cluster = Cluster(initialize_head=True, head_node_args=dict(
            self.node_args, _system_config=dict(HEALTH_CHECKS), include_dashboard=False))
        self.worker = self.cluster.add_node(**self.node_args)
        self.address = self.cluster.address

    def lose_worker(self) -> None:
        self.cluster.remove_node(self.worker, allow_graceful=False)

    def add_worker(self) -> None:
        self.worker = self.cluster.add_node(**self.node_args)

    def close(self) -> None:
        self.cluster.shutdown()


def inject_node_losses(tmp: Path, name: str, injections: int) -> list[dict]:
    """Lose the worker node, recover on one worker, add a node, grow back; repeat."""
    nodes = TwoNodes(tmp)
    proc, run_dir = start(tmp, name, [
        "run.steps=100000", f"fault_tolerance.max_restarts={injections + 1}", "checkpoint.memory_interval=1",
        f"launch.ray_address={nodes.address}", "fault_tolerance.min_workers=1",
        "fault_tolerance.placement_timeout_s=2"])
    found = []
    try:
        wait_for(lambda: last_step(run_dir) >= 5, 180, proc)
        for i in range(injections):
            restarts, resizes = len(events(run_dir, "restart")), len(events(run_dir, "resize"))
            injected = time.time()
            nodes.lose_worker()
            wait_for(lambda: len(events(run_dir, "restart")) > restarts, 180, proc)
            failure, restart = events(run_dir, "failure")[-1], events(run_dir, "restart")[-1]
            found.append({"detection_s": failure["time"] - injected, "recovery_s": restart["time"] - injected,
                          "lost_steps": restart["lost_steps"], "source": restart["source"],
                          "kind": failure["kind"], "world": restart["world"],
                          "breakdown": restart.get("breakdown", {})})
            print(f"  {name} #{i + 1}: {failure['kind']} detected {found[-1]['detection_s']:.2f}s, "
                  f"recovered on {restart['world']} worker(s) {found[-1]['recovery_s']:.2f}s, "
                  f"lost {restart['lost_steps']} steps ({restart['source']}) | "
                  f"{breakdown_line(found[-1]['breakdown'])}", flush=True)
            nodes.add_worker()
            wait_for(lambda: len(events(run_dir, "resize")) >= resizes + 2
                     and events(run_dir, "workers")[-1]["world"] == 2, 180, proc)
            start_step = last_step(run_dir)
            wait_for(lambda: last_step(run_dir) >= start_step + 3, 180, proc)
    finally:
        stop(proc)
        nodes.close()
    return found


def throughput(tmp: Path, name: str, extra: list[str], steps: int) -> float:
    """Median tokens/s over the logged steps after the first 10."""
    proc, run_dir = start(tmp, name, [f"run.steps={steps}", *extra])
    proc.wait(timeout=1800)
    if proc.returncode:
        raise RuntimeError(proc.stderr.read()[-2000:])
    rates = sorted(r["tokens_per_s"] for r in read_jsonl(run_dir / "metrics.jsonl")[10:])
    return rates[len(rates) // 2]


PHASES = ("detect", "kill", "place", "start", "rendezvous", "build", "restore", "first_step")


def breakdown_line(breakdown: dict) -> str:
    return " ".join(f"{phase} {breakdown[phase]:.2f}" for phase in PHASES if phase in breakdown)


def median_breakdown(rows: list[dict]) -> dict:
    """Per phase of the `restart` event's breakdown, the median over the injections."""
    phases = [p for p in PHASES if any(p in r["breakdown"] for r in rows)]
    return {p: percentile([r["breakdown"][p] for r in rows if p in r["breakdown"]], 0.5) for p in phases}


def summary(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows]
    return f"{percentile(values, 0.5):.2f} / {percentile(values, 0.95):.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--injections", type=int, default=10)
    parser.add_argument("--kinds", default="kill,hang,node")
    parser.add_argument("--no-throughput", action="store_true", help="skip the memory tier's cost")
    parser.add_argument("--throughput-steps", type=int, default=80)
    parser.add_argument("--throughput-pairs", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(0)
    print(machine_line())
    print(f"start: {load_line()}")
    configs = []
    for kind in filter(None, args.kinds.split(",")):
        if kind == "node":
            configs.append(("node lost, memory tier, shrink to 1", kind, []))
            continue
        hang = ["fault_tolerance.hang_timeout_s=5"] if kind == "hang" else []
        configs.append((f"{kind}, memory tier", kind, ["checkpoint.memory_interval=1", *hang]))
        if kind == "kill":
            configs.append((f"{kind}, no memory tier", kind, ["checkpoint.memory_interval=0", *hang]))
    results = {}
    with tempfile.TemporaryDirectory(prefix="atoll-rec-", dir="/tmp") as tmp:
        for label, kind, extra in configs:
            name = label.replace(", ", "-").replace(" ", "_")
            results[label] = (inject_node_losses(Path(tmp), name, args.injections) if kind == "node" else
                              inject(Path(tmp), name, kind, args.injections, extra, rng))
        if not args.no_throughput:
            # Alternated and repeated: single runs on 2 busy cores differ by several percent.
            with_runs, without_runs = [], []
            for i in range(args.throughput_pairs):
                with_runs.append(throughput(Path(tmp), f"tput-memory-{i}", ["checkpoint.memory_interval=1"],
                                            args.throughput_steps))
                without_runs.append(throughput(Path(tmp), f"tput-none-{i}", ["checkpoint.memory_interval=0"],
                                               args.throughput_steps))
                print(f"  throughput pair {i + 1}: {with_runs[-1]:,.0f} / {without_runs[-1]:,.0f} tok/s",
                      flush=True)
            with_tier, without = percentile(with_runs, 0.5), percentile(without_runs, 0.5)
    print(f"end: {load_line()}")
    print("\n| failure | n | detection s (median / p95) | recovery s (median / p95) | lost steps "
          "(median / p95) | resumed from |")
    print("|---|---|---|---|---|---|")
    for label, rows in results.items():
        sources = sorted({r["source"] for r in rows})
        print(f"| {label} | {len(rows)} | {summary(rows, 'detection_s')} | {summary(rows, 'recovery_s')} "
              f"| {summary(rows, 'lost_steps')} | {', '.join(sources)} |")
    print("\nrecovery breakdown, median seconds per phase (the `restart` event's breakdown):\n")
    print("| failure | " + " | ".join(PHASES) + " | sum |")
    print("|---|" + "---|" * (len(PHASES) + 1))
    for label, rows in results.items():
        medians = median_breakdown(rows)
        print(f"| {label} | " + " | ".join(f"{medians[p]:.2f}" if p in medians else "-" for p in PHASES)
              + f" | {sum(medians.values()):.2f} |")
    if not args.no_throughput:
        print(f"\nmemory tier throughput: {with_tier:,.0f} tok/s with memory_interval=1, "
              f"{without:,.0f} without: ratio {with_tier / without:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
