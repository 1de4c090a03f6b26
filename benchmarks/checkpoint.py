"""Asynchronous checkpoint cost: blocking time, training throughput and save bandwidth.

What it measures (one run, single process, CPU or one GPU)
    (a) Step blocking time of an asynchronous save vs a synchronous save of
        the same state: the time `Trainer.train_step()` spends inside the
        checkpointer (`trainer.checkpointer.take_blocked_s()`: `save()` plus
        `wait_staging()` before the next optimizer step, plus any wait for the
        previous save to commit), summed over the steps from one save to the
        next, per save. A `checkpoint.async=true` trainer against a
        `checkpoint.async=false` trainer, both saving every
        `checkpoint.interval` steps through their own `train_step()`; and a
        plain `torch.distributed.checkpoint.save` of the same tensors
        (`split_state(trainer.states)`, default FileSystemWriter) as the
        reference "sync dcp.save". The first save of each trainer is reported
        separately (the first asynchronous save spawns DCP's writer process and
        allocates the shared staging buffers). Target: async <= 5% of sync.
    (b) Training throughput (tokens/s) with a checkpoint every 10 steps vs none:
        the same recipe with `checkpoint.interval=10` vs `checkpoint.interval=0`,
        windows of N steps (default 40) run in interleaved rounds. A window
        starts with a saving step and ends with the last save committed (the
        wait for that commit is counted), so it covers whole save periods.
        Measured with each `--threads` setting (default 2 = all cores, and 1,
        which leaves a core to the writer process and the hashing thread as on
        a GPU machine whose CPU is mostly idle). Target: >= 0.97.
    (c) Save bandwidth: checkpoint bytes / (save() start to commit), from the
        `checkpoint_commit` events in `<run.dir>/events.jsonl`, vs one
        `open(..., "wb").write()` + fsync of the same number of bytes in the
        same folder. Also sha256 of the checkpoint's files (what the commit
        computes for the manifest) against that write.

How
    Three `Trainer(load_recipe(RECIPE, overrides))` built from the same recipe
    and seed (so they follow the same trajectory; the script checks the losses
    agree): async every 10 steps, sync every 10 steps, no checkpoints; single
    process (`launch.backend=local parallel.dp=1`, no wandb, no eval), run
    directories in a temporary folder under /tmp. Default model: dim 256,
    4 layers, 12 experts (26.6M parameters, ~320 MB of fp32 weights + Adam
    moments). Each round runs one window per trainer plus the two
    references, in an order that rotates every round; the table shows medians.
    The main process's CPU time per window and the writer process's CPU time
    are shown too (less sensitive than wall time to other load on the machine).
    Trainers are closed as `Trainer.run()` closes them (`checkpointer.close()`),
    then DCP's writer daemon is ended and the temporary folder removed.

Run (from the repository root):
    python benchmarks/checkpoint.py                       # ~10 min on 2 cores
    python benchmarks/checkpoint.py --quick               # smoke run, small model
    python benchmarks/checkpoint.py --threads 2,1 --rounds 3 --steps 40 [--recipe NAME] [key=value ...]

It always exits 0: it is a benchmark, not a test; the last lines say PASS/FAIL.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
import torch.distributed.checkpoint as dcp

from atoll.checkpoint.manifest import data_files, hash_file
from atoll.checkpoint.state import split_state
from atoll.trainer.config import load_recipe
from atoll.trainer.metrics import read_jsonl
from atoll.trainer.train import Trainer

BLOCK_TARGET = 0.05
THROUGHPUT_TARGET = 0.97
INTERVAL = 10
MODEL = ["model.dim=256", "model.layers=4", "model.moe.num_experts=12"]
QUICK_MODEL = ["model.dim=128", "model.layers=2", "model.moe.num_experts=8"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Blocking time, throughput cost and bandwidth of atoll's asynchronous checkpoints.")
    parser.add_argument("--quick", action="store_true",
                        help="small model (~28 MB of state), 1 round of 20 steps: a smoke run")
    parser.add_argument("--threads", default=None,
                        help="comma-separated torch thread settings, each measured in turn "
                             "(default: all cores, then 1)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per thread setting (default 3; --quick 1)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"steps per window, a multiple of {INTERVAL} (default 40; --quick 20)")
    parser.add_argument("--recipe", default=None, help="recipe path or shipped name (default: default recipe)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides (win over the model above)")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        args.threads = ([int(t) for t in args.threads.split(",")] if args.threads
                        else sorted({cores, 1}, reverse=True))
    except ValueError:
        parser.error("--threads takes integers separated by commas, e.g. 2,1")
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.steps = args.steps or (20 if args.quick else 40)
    if args.steps % INTERVAL or args.steps < INTERVAL or args.rounds < 1 or min(args.threads) < 1:
        parser.error(f"--steps must be a positive multiple of {INTERVAL}; --rounds and --threads positive")
    return args


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    line = f"cpu: {cpu}, {cores} cores; {psutil.virtual_memory().total / 2**30:.0f} GiB RAM; torch {torch.__version__}"
    if torch.cuda.is_available():
        line += f"; gpu: {torch.cuda.get_device_name()}"
    return line


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# ---------------------------------------------------------------- CPU accounting


def writer_processes() -> list[psutil.Process]:
    """DCP's writer daemon: a spawned child of this process (not the resource tracker)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "spawn_main" in cmd:
            found.append(child)
    return found


def writer_cpu_s() -> float:
    total = 0.0
    for proc in writer_processes():
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def thread_cpu_s(prefixes: tuple[str, ...]) -> dict[str, float]:
    """CPU seconds of this process's named checkpoint threads (staging, commit)."""
    by_tid = {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}
    out = {p: 0.0 for p in prefixes}
    for thread in threading.enumerate():
        for p in prefixes:
            if thread.name.startswith(p) and thread.native_id in by_tid:
                out[p] += by_tid[thread.native_id]
    return out


CKPT_THREADS = ("atoll-ckpt-stage", "atoll-ckpt-commit")


# ---------------------------------------------------------------- windows


class Side:
    """One trainer and what its windows measured."""

    def __init__(self, name: str, trainer: Trainer):
        self.name, self.trainer = name, trainer
        self.losses: dict[int, float] = {}
        self.reset()

    def reset(self) -> None:
        self.tokens_per_s: list[float] = []
        self.step_s: list[float] = []
        self.cpu_per_window: list[float] = []
        self.writer_cpu_per_window: list[float] = []
        self.thread_cpu: dict[str, float] = {p: 0.0 for p in CKPT_THREADS}
        self.saves = 0
        self.blocked_per_save: list[float] = []
        self.in_save: list[float] = []  # blocked inside save() (the saving step)
        self.in_wait: list[float] = []  # blocked in the next steps (staging, previous save)
        self.drain: list[float] = []  # last save of a window not committed at its end

    def step(self) -> tuple[float, float]:
        start = time.perf_counter()
        result = self.trainer.train_step()
        elapsed = time.perf_counter() - start
        self.losses[self.trainer.step] = result.loss
        return elapsed, self.trainer.checkpointer.take_blocked_s()

    def drain_saves(self) -> float:
        """Wait (polling, as training would) until no save is in flight."""
        ckpt = self.trainer.checkpointer
        start = time.perf_counter()
        while ckpt.in_flight is not None:
            ckpt.poll()
            if ckpt.in_flight is not None:
                time.sleep(0.005)
        return time.perf_counter() - start

    def warm_up(self, steps: int) -> dict:
        """Untimed steps; the first save's blocking (a one-off) is returned."""
        blocked = []
        for _ in range(steps):
            blocked.append(self.step()[1])
        drain = self.drain_saves()
        first = {}
        if self.trainer.checkpointer.interval:
            first = {"in_save": blocked[INTERVAL - 1], "after": sum(blocked[INTERVAL:]), "drain": drain}
        self.trainer.checkpointer.take_blocked_s()
        return first

    def window(self, steps: int) -> None:
        saving = bool(self.trainer.checkpointer.interval)
        assert not saving or self.trainer.step % INTERVAL == INTERVAL - 1, self.trainer.step
        wall0, cpu0, wcpu0 = time.perf_counter(), time.process_time(), writer_cpu_s()
        th0 = thread_cpu_s(CKPT_THREADS)
        times, blocked = [], []
        for _ in range(steps):
            t, b = self.step()
            times.append(t)
            blocked.append(b)
        drain = self.drain_saves() if saving else 0.0
        wall = time.perf_counter() - wall0
        self.tokens_per_s.append(steps * self.trainer.tokens_per_step / wall)
        self.step_s += times
        self.cpu_per_window.append(time.process_time() - cpu0)
        self.writer_cpu_per_window.append(writer_cpu_s() - wcpu0)
        for p, v in thread_cpu_s(CKPT_THREADS).items():
            self.thread_cpu[p] += v - th0[p]
        if saving:
            for k in range(0, steps, INTERVAL):
                cycle = blocked[k:k + INTERVAL]
                tail = drain if k + INTERVAL >= steps else 0.0
                self.in_save.append(cycle[0])
                self.in_wait.append(sum(cycle[1:]))
                self.drain.append(tail)
                self.blocked_per_save.append(sum(cycle) + tail)
                self.saves += 1


def commit_events(run_dir: Path) -> list[dict]:
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e.get("event") == "checkpoint_commit"]


def plain_dcp_save(trainer: Trainer, folder: Path) -> tuple[float, float]:
    """(split_state seconds, dcp.save seconds) of the trainer's tensors into a fresh folder."""
    start = time.perf_counter()
    tensors, _ = split_state(trainer.states)
    split_s = time.perf_counter() - start
    start = time.perf_counter()
    dcp.save(tensors, checkpoint_id=str(folder))
    save_s = time.perf_counter() - start
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    return split_s, save_s


def plain_write(buffer: memoryview, path: Path) -> float:
    """One write() of the whole buffer + fsync, as a file a save would make."""
    start = time.perf_counter()
    with open(path, "wb") as f:
        f.write(buffer)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def hash_checkpoint(ckpt_dir: Path) -> tuple[int, float]:
    files = data_files(ckpt_dir)
    start = time.perf_counter()
    for path in files:
        hash_file(path)
    return sum(p.stat().st_size for p in files), time.perf_counter() - start


def latest_checkpoint(run_dir: Path) -> Path:
    root = run_dir / "checkpoints"
    return root / (root / "latest").read_text().strip()


# ---------------------------------------------------------------- report


def ms(values: list[float]) -> str:
    if not values:
        return f"{'-':>10}{'-':>10}{'-':>10}{0:>5}"
    return (f"{1e3 * statistics.median(values):>10.1f}{1e3 * percentile(values, 0.1):>10.1f}"
            f"{1e3 * percentile(values, 0.9):>10.1f}{len(values):>5}")


def num(values: list[float], scale: float = 1.0, fmt: str = ".0f") -> str:
    if not values:
        return f"{'-':>10}{'-':>10}{'-':>10}{0:>5}"
    v = [x * scale for x in values]
    return (f"{statistics.median(v):>10{fmt}}{percentile(v, 0.1):>10{fmt}}"
            f"{percentile(v, 0.9):>10{fmt}}{len(v):>5}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="atoll-ckpt-bench-", dir="/tmp")
    root = Path(tmp.name)
    chosen = [*(QUICK_MODEL if args.quick else MODEL), *args.overrides]
    base = [*chosen, "launch.backend=local", "parallel.dp=1", "logging.wandb=disabled",
            "logging.eval_interval=0", "logging.progress=false", "run.steps=1000000",
            "checkpoint.keep=2", "checkpoint.keep_every=0", "checkpoint.resume=none",
            f"launch.threads_per_worker={args.threads[0]}"]
    specs = {"async": ["checkpoint.async=true", f"checkpoint.interval={INTERVAL}"],
             "sync": ["checkpoint.async=false", f"checkpoint.interval={INTERVAL}"],
             "none": ["checkpoint.async=true", "checkpoint.interval=0"]}
    print(f"machine: {machine_line()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M')}; {load_line()}")
    print(f"recipe: {args.recipe or 'default'} {' '.join(chosen)}")

    sides: dict[str, Side] = {}
    trainers = []
    try:
        for name, extra in specs.items():
            cfg = load_recipe(args.recipe, [*base, *extra, f"run.dir={root / name}"])
            trainer = Trainer(cfg)
            trainers.append(trainer)
            sides[name] = Side(name, trainer)
        t0 = sides["async"].trainer
        n_params = sum(p.numel() for p in t0.model.parameters())
        print(f"model: dim {t0.cfg.model.dim}, {t0.cfg.model.layers} layers, "
              f"{t0.cfg.model.moe.num_experts} experts top-{t0.cfg.model.moe.top_k}, {n_params:,} params; "
              f"batch {t0.cfg.data.micro_batch}x{t0.cfg.data.grad_accum}x{t0.cfg.data.seq_len} tokens; "
              f"device {t0.device}")

        # Warm-up: up to the step before a save, through the first save (a one-off).
        torch.set_num_threads(args.threads[0])
        warm = 2 * INTERVAL - 1
        first = {name: side.warm_up(warm) for name, side in sides.items()}
        tensors, _ = split_state(t0.states)
        state_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        n_tensors = len(tensors)
        del tensors
        ckpt_bytes = commit_events(root / "async")[-1]["bytes"]
        print(f"checkpoint state: {n_tensors} tensors, {state_bytes / 1e6:.1f} MB "
              f"(params + 2 Adam moments, fp32); files {ckpt_bytes / 1e6:.1f} MB")
        print(f"windows: {warm} warm-up steps, then per thread setting {args.rounds} rounds x "
              f"{args.steps} steps per trainer (save every {INTERVAL}); threads {args.threads}", flush=True)

        buffer = memoryview(torch.randint(0, 256, (ckpt_bytes,), dtype=torch.uint8).numpy())
        results = {}
        for threads in args.threads:
            torch.set_num_threads(threads)
            load_start = load_line()
            refs = {"dcp_save": [], "split_state": [], "write": [], "hash": []}
            for side in sides.values():  # fresh figures per setting, same trainers
                side.reset()
            ev_start = {name: len(commit_events(root / name)) for name in ("async", "sync")}
            jobs = ["async", "none", "sync", "refs"]
            for r in range(args.rounds):
                order = jobs[r % len(jobs):] + jobs[:r % len(jobs)]
                for job in order:
                    if job == "refs":
                        split_s, save_s = plain_dcp_save(sides["sync"].trainer, root / "plain-dcp")
                        refs["split_state"].append(split_s)
                        refs["dcp_save"].append(save_s)
                        refs["write"].append(plain_write(buffer, root / "plain-write.bin"))
                        size, hash_s = hash_checkpoint(latest_checkpoint(root / "sync"))
                        refs["hash"].append(hash_s)
                    else:
                        sides[job].window(args.steps)
                print(f"  threads {threads} round {r + 1}/{args.rounds}: tokens/s "
                      + ", ".join(f"{n} {sides[n].tokens_per_s[-1]:.0f}" for n in ("async", "none", "sync"))
                      + f"; {load_line()}", flush=True)
            events = {name: commit_events(root / name)[ev_start[name]:] for name in ("async", "sync")}
            results[threads] = (sides_snapshot(sides), refs, events, load_start, load_line())

        # Same trajectory => same work; checkpointing must not change training.
        common = sorted(set(sides["async"].losses) & set(sides["none"].losses) & set(sides["sync"].losses))
        delta = max(max(abs(sides["async"].losses[s] - sides["none"].losses[s]),
                        abs(sides["sync"].losses[s] - sides["none"].losses[s])) for s in common)
    finally:
        for trainer in trainers:  # as Trainer.run() ends, then Trainer.close()
            trainer.checkpointer.close()
        left = stop_writer()
        for trainer in trainers[:1]:
            trainer.close()  # destroys the (shared) default process group
        tmp.cleanup()

    report(args, first, results, ckpt_bytes, state_bytes, delta, len(common), left)
    return 0


def sides_snapshot(sides: dict[str, Side]) -> dict[str, dict]:
    return {name: {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
                   for k, v in vars(s).items() if k not in ("trainer", "losses")}
            for name, s in sides.items()}


def stop_writer() -> list[int]:
    """End DCP's writer daemon (module-global, shared by every trainer of this process).

    `Checkpointer.close()` leaves it running until the interpreter exits; end it
    the way torch's own finaliser does. Returns the pids still alive after."""
    from torch.distributed.checkpoint import _async_process_executor as executor
    proc = getattr(executor, "_CHECKPOINT_PROCESS", None)
    pids = [p.pid for p in writer_processes()]
    if proc is not None:
        try:
            proc.__del__()  # torch's own shutdown: TERMINATE request, join 5 s, then SIGTERM
        finally:
            executor._CHECKPOINT_PROCESS = None
    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    print(f"writer processes before shutdown: {pids or 'none'}; alive after: {alive or 'none'}")
    return alive


def report(args, first, results, ckpt_bytes, state_bytes, delta, n_common, left) -> None:
    print()
    f = first["async"]
    print(f"first async save (one-off: spawns the writer, allocates shared buffers): blocked "
          f"{1e3 * f['in_save']:.1f} ms in save() + {1e3 * f['after']:.1f} ms in the next {INTERVAL - 1} "
          f"steps; not committed {1e3 * f['drain']:.0f} ms after them")
    f = first["sync"]
    print(f"first sync save: {1e3 * f['in_save']:.1f} ms")
    finals = []
    for threads, (sides, refs, events, load0, load1) in results.items():
        a, s, n = sides["async"], sides["sync"], sides["none"]
        mb = ckpt_bytes / 1e6
        print()
        print(f"threads {threads}  ({load0} at start, {load1} at end)")
        print(f"{'':<52}{'median':>10}{'p10':>10}{'p90':>10}{'n':>5}")
        print(f"{'(a) async: blocked per save, ms':<52}{ms(a['blocked_per_save'])}")
        print(f"{'      in save() (split_state, async_save)':<52}{ms(a['in_save'])}")
        print(f"{'      in the next steps (staging, prior save)':<52}{ms(a['in_wait'])}")
        print(f"{'      last save of a window, wait to commit':<52}{ms(a['drain'])}")
        print(f"{'(a) sync: blocked per save, ms':<52}{ms(s['blocked_per_save'])}")
        print(f"{'(a) plain dcp.save of the same tensors, ms':<52}{ms(refs['dcp_save'])}")
        print(f"{'      split_state (get_state_dict), ms':<52}{ms(refs['split_state'])}")
        print(f"{'(b) tokens/s, async checkpoint every 10 steps':<52}{num(a['tokens_per_s'])}")
        print(f"{'(b) tokens/s, no checkpoints':<52}{num(n['tokens_per_s'])}")
        print(f"{'(b) tokens/s, sync checkpoint every 10 steps':<52}{num(s['tokens_per_s'])}")
        print(f"{'    step time, async ckpt, ms':<52}{ms(a['step_s'])}")
        print(f"{'    step time, no ckpt, ms':<52}{ms(n['step_s'])}")
        print(f"{'    main process CPU s per window, async ckpt':<52}{num(a['cpu_per_window'], fmt='.2f')}")
        print(f"{'    main process CPU s per window, no ckpt':<52}{num(n['cpu_per_window'], fmt='.2f')}")
        print(f"{'    writer process CPU s per save':<52}"
              f"{num([w / (args.steps // INTERVAL) for w in a['writer_cpu_per_window']], fmt='.2f')}")
        per_save = {p: a["thread_cpu"][p] / max(a["saves"], 1) for p in CKPT_THREADS}
        print(f"{'    staging thread / commit thread CPU s per save':<52}"
              f"{per_save['atoll-ckpt-stage']:>10.2f}{per_save['atoll-ckpt-commit']:>10.2f}")
        a_mbs = [e["bytes_per_s"] / 1e6 for e in events["async"]]
        s_mbs = [e["bytes_per_s"] / 1e6 for e in events["sync"]]
        w_mbs = [mb / t for t in refs["write"]]
        h_mbs = [mb / t for t in refs["hash"]]
        print(f"{'(c) async save -> commit, MB/s':<52}{num(a_mbs)}")
        print(f"{'      seconds':<52}{num([e['seconds'] for e in events['async']], fmt='.2f')}")
        print(f"{'(c) sync save -> commit, MB/s':<52}{num(s_mbs)}")
        print(f"{'(c) plain write + fsync, same bytes, MB/s':<52}{num(w_mbs)}")
        print(f"{'(c) sha256 of the checkpoint files, MB/s':<52}{num(h_mbs)}")
        print(f"{'      seconds':<52}{num(refs['hash'], fmt='.2f')}")
        block_ratio = statistics.median(a["blocked_per_save"]) / statistics.median(s["blocked_per_save"])
        tput = statistics.median(a["tokens_per_s"]) / statistics.median(n["tokens_per_s"])
        paired = statistics.median(x / y for x, y in zip(a["tokens_per_s"], n["tokens_per_s"]))
        bw = statistics.median(a_mbs) / statistics.median(w_mbs)
        print(f"async blocking / plain dcp.save: "
              f"{100 * statistics.median(a['blocked_per_save']) / statistics.median(refs['dcp_save']):.2f}%; "
              f"throughput paired per round: {paired:.3f}; sync-ckpt throughput / none: "
              f"{statistics.median(s['tokens_per_s']) / statistics.median(n['tokens_per_s']):.3f}; "
              f"sync save bandwidth / plain write: {statistics.median(s_mbs) / statistics.median(w_mbs):.2f}; "
              f"hash time / write time: {statistics.median(refs['hash']) / statistics.median(refs['write']):.2f}")
        finals.append((threads, block_ratio, tput, bw))
    print()
    print(f"losses of the three trainers over {n_common} common steps: max |difference| = {delta:.2e}")
    print(f"processes left behind: {left or 'none'}")
    for threads, block_ratio, tput, bw in finals:
        verdict = "PASS" if block_ratio <= BLOCK_TARGET else "FAIL"
        print(f"async blocking / sync: {100 * block_ratio:.2f}%  target <= {100 * BLOCK_TARGET:.0f}%  "
              f"{verdict}  (threads {threads})")
    for threads, block_ratio, tput, bw in finals:
        verdict = "PASS" if tput >= THROUGHPUT_TARGET else "FAIL"
        print(f"throughput with checkpoints / without: {tput:.3f}  target >= {THROUGHPUT_TARGET}  "
              f"{verdict}  (threads {threads})")
    for threads, block_ratio, tput, bw in finals:
        print(f"save bandwidth / plain write: {bw:.2f}  (threads {threads})")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
