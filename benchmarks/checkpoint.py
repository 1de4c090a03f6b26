"""Asynchronous checkpoint cost: blocking time, training throughput and save bandwidth.

What it measures (one run, single process, CPU or one GPU)
    (a) Step blocking time of an asynchronous save vs a synchronous save of the
        same state: the time `Trainer.train_step()` spends inside the
        checkpointer (`trainer.checkpointer.take_blocked_s()`: `save()`, plus
        `wait_staging()` before the next optimizer steps, plus any wait for the
        previous save to commit) summed over the steps from one save to the
        next. A `checkpoint.async=true` trainer against a `checkpoint.async=false`
        trainer, both saving every 10 steps from their own `train_step()`, and a
        plain `torch.distributed.checkpoint.save` of the same tensors
        (`split_state(trainer.states)`, default FileSystemWriter) as the "sync
        dcp.save" reference. The first save of each trainer is reported apart
        (the first asynchronous save spawns atoll's writer process and allocates
        the shared staging buffer). Target: async <= 5% of sync.
    (b) Training throughput (tokens/s) with a checkpoint every 10 steps vs none:
        the same recipe with `checkpoint.interval=10` vs `checkpoint.interval=0`,
        N steps per trainer per round (default 40), interleaved. Measured for
        each `--threads` setting (default: all cores, then 1, which leaves a
        core to the checkpoint thread and the writer process, as on a GPU machine
        whose CPU is mostly idle). Target: >= 0.97.
    (c) Save bandwidth: checkpoint bytes / (save() start to commit), the
        `checkpoint_commit` events' `seconds` and `bytes_per_s` in
        `<run.dir>/events.jsonl`, vs one `open(..., "wb").write()` + fsync of
        the same number of bytes in the same folder; for asynchronous saves the
        time is split into planning + staging, writer process (write, sha256,
        fsync; then `.metadata`) and commit (hash exchange, manifest, rename,
        retention). Measured twice: for the saves every 10 steps, beside
        training (which shares the cores), and once per round for a save the
        async trainer makes and waits for with training paused (the save
        pipeline alone, right after the plain write it is compared with).
        Target: paused save >= 0.6x the plain write. Also sha256 of a
        committed checkpoint's files (what `atoll ckpt verify` and a resume
        compute), against that write.

How
    Three `Trainer(load_recipe(RECIPE, overrides))` from the same recipe and
    seed, so they follow the same trajectory (the script checks that their
    losses agree): async every 10 steps, sync every 10 steps, no checkpoints;
    single process (`launch.backend=local parallel.dp=1`, no wandb, no eval),
    run directories in a temporary folder under /tmp. Default model: dim 256,
    4 layers, 12 experts top-2 (26.6M parameters: ~320 MB of fp32 weights and
    Adam moments). All three warm up to the step before a save (through their
    first save). Then, per thread setting and round, each trainer runs its N
    steps as N/10 windows of 10 steps that start with a saving step and end
    when that save has committed (waiting for it, if it has not, counts), the
    trainers taking turns window by window in a rotating order, then the
    references run once. Tables show medians and 10th/90th percentiles; the
    throughput ratio is the median over rounds of tokens/s. CPU time is shown
    too (the training thread's, the writer process's, the checkpoint
    threads'), since wall time on a shared machine also measures other load.
    At the end every checkpointer is closed as `Trainer.run()` does (which
    ends its writer process) and the temporary folder removed.

Run (from the repository root):
    python benchmarks/checkpoint.py                  # ~10 min on an idle 2-core machine
    python benchmarks/checkpoint.py --quick          # smoke run: small model, 1 round
    python benchmarks/checkpoint.py --threads 2,1 --rounds 3 --steps 40 [--recipe NAME] [key=value ...]

It always exits 0: it is a benchmark, not a test; the last lines say PASS/FAIL.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cores, load_line, machine_line, percentile  # noqa: E402

from atoll.checkpoint.manifest import data_files, hash_file
from atoll.checkpoint.state import split_state
from atoll.trainer.config import load_recipe
from atoll.trainer.metrics import read_jsonl
from atoll.trainer.train import Trainer

BLOCK_TARGET = 0.05
THROUGHPUT_TARGET = 0.97
BANDWIDTH_TARGET = 0.6
INTERVAL = 10
MODEL = ["model.dim=256", "model.layers=4", "model.moe.num_experts=12"]
QUICK_MODEL = ["model.dim=128", "model.layers=2", "model.moe.num_experts=8"]
SIDES = ("async", "none", "sync")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Blocking time, throughput cost and bandwidth of atoll's asynchronous checkpoints.")
    parser.add_argument("--quick", action="store_true",
                        help="small model (~28 MB of state), 1 round of 20 steps: a smoke run")
    parser.add_argument("--threads", default=None,
                        help="comma-separated torch thread settings, measured in turn (default: all cores, then 1)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds per thread setting (default 3; --quick 1)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"steps per trainer per round, a multiple of {INTERVAL} (default 40; --quick 20)")
    parser.add_argument("--recipe", default=None, help="recipe path or shipped name (default: default recipe)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides (they win over the model chosen here)")
    args = parser.parse_args(argv)
    try:
        args.threads = ([int(t) for t in args.threads.split(",")] if args.threads
                        else sorted({cores(), 1}, reverse=True))
    except ValueError:
        parser.error("--threads takes integers separated by commas, e.g. 2,1")
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.steps = args.steps or (20 if args.quick else 40)
    if args.steps % INTERVAL or args.steps < INTERVAL or args.rounds < 1 or min(args.threads) < 1:
        parser.error(f"--steps must be a positive multiple of {INTERVAL}; --rounds and --threads positive")
    return args


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------- CPU accounting


def writer_processes() -> list[psutil.Process]:
    """atoll's checkpoint writer: a child process of this one."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "atoll.checkpoint.writer_process" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
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


# ---------------------------------------------------------------- one trainer


class Side:
    """One trainer and what its windows measured under the current thread setting."""

    def __init__(self, name: str, trainer: Trainer):
        self.name, self.trainer = name, trainer
        self.losses: dict[int, float] = {}
        self.timeline: dict[int, dict] = {}  # async saves: step -> wall-clock marks
        self._tracked = None
        self.reset()

    def reset(self) -> None:
        self.round_tokens = self.round_wall = 0.0
        self.tokens_per_s: list[float] = []  # one per round
        self.step_s: list[float] = []
        self.train_cpu_per_step: list[float] = []  # the training (main) thread's CPU
        self.proc_cpu = self.writer_cpu = self.thread_cpu = 0.0
        self.steps = 0
        self.saves: list[dict] = []

    @property
    def saving(self) -> bool:
        return bool(self.trainer.checkpointer.interval)

    def step(self) -> tuple[float, float, float]:
        start, cpu = time.perf_counter(), time.thread_time()
        result = self.trainer.one_step()  # the step and its hooks (the checkpoint save among them)
        elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu
        self.losses[self.trainer.step] = result.loss
        self._track()
        return elapsed, cpu, self.trainer.checkpointer.take_blocked_s()

    def _track(self) -> None:
        """Wall-clock marks of a new asynchronous save (staged, written) for the breakdown."""
        save = getattr(self.trainer.checkpointer, "in_flight", None)
        if save is None or save is self._tracked or getattr(save, "staged", None) is None:
            return
        self._tracked = save
        marks = self.timeline.setdefault(save.step, {"started": save.started})
        save.staged.add_done_callback(lambda _f, m=marks: m.setdefault("staged", time.time()))
        save.written.add_done_callback(lambda _f, m=marks: m.setdefault("written", time.time()))
        save.done.add_done_callback(lambda _f, m=marks, s=save, side=self: side._count_thread(s))

    def _count_thread(self, save) -> None:
        self.thread_cpu += save.thread_cpu_s

    def drain(self) -> float:
        """Wait, polling as training would, until no save is in flight."""
        ckpt = self.trainer.checkpointer
        start = time.perf_counter()
        while ckpt.in_flight is not None:
            ckpt.poll()
            if ckpt.in_flight is not None:
                time.sleep(0.005)
        return time.perf_counter() - start

    def warm_up(self, steps: int) -> dict:
        """Untimed steps through the first save; returns that save's blocking (a one-off)."""
        blocked = [self.step()[2] for _ in range(steps)]
        drain = self.drain() if self.saving else 0.0
        self.trainer.checkpointer.take_blocked_s()
        if not self.saving:
            return {}
        return {"in_save": blocked[INTERVAL - 1], "after": sum(blocked[INTERVAL:]), "drain": drain}

    def window(self) -> None:
        """INTERVAL steps starting with a saving step, until that save has committed."""
        assert not self.saving or self.trainer.step % INTERVAL == INTERVAL - 1, self.trainer.step
        cpu0, wcpu0 = time.process_time(), writer_cpu_s()
        start = time.perf_counter()
        blocked = []
        for _ in range(INTERVAL):
            step_s, cpu_s, blocked_s = self.step()
            self.step_s.append(step_s)
            self.train_cpu_per_step.append(cpu_s)
            blocked.append(blocked_s)
        drain = self.drain() if self.saving else 0.0
        wall = time.perf_counter() - start
        self.round_wall += wall
        self.round_tokens += INTERVAL * self.trainer.tokens_per_step
        self.steps += INTERVAL
        self.proc_cpu += time.process_time() - cpu0
        self.writer_cpu += writer_cpu_s() - wcpu0
        if self.saving:
            self.saves.append({"step": self.trainer.step - INTERVAL + 1, "in_save": blocked[0],
                               "after": sum(blocked[1:]), "drain": drain,
                               "blocked": sum(blocked) + drain})

    def end_round(self) -> None:
        self.tokens_per_s.append(self.round_tokens / self.round_wall)
        self.round_tokens = self.round_wall = 0.0


# ---------------------------------------------------------------- references


def commit_events(run_dir: Path) -> dict[int, dict]:
    return {e["step"]: e for e in read_jsonl(run_dir / "events.jsonl") if e.get("event") == "checkpoint_commit"}


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


def paused_save(trainer: Trainer) -> float:
    """Seconds from `save()` to commit of an asynchronous save while training waits for it:
    the save pipeline alone (staging, writer process, commit), without training beside it."""
    ckpt = trainer.checkpointer
    start = time.perf_counter()
    ckpt.save(trainer.step, trainer.states, trainer.loader.samples_consumed)
    ckpt.wait()
    elapsed = time.perf_counter() - start
    ckpt.take_blocked_s()
    return elapsed


def plain_write(buffer: memoryview, path: Path) -> float:
    """One write() of the whole buffer + fsync: the disk's plain sequential write."""
    start = time.perf_counter()
    with open(path, "wb") as f:
        f.write(buffer)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def hash_checkpoint(run_dir: Path) -> float:
    """Seconds to sha256 the data files of the run's latest checkpoint, as a resume does."""
    root = run_dir / "checkpoints"
    files = data_files(root / (root / "latest").read_text().strip())
    start = time.perf_counter()
    for path in files:
        hash_file(path)
    return time.perf_counter() - start


def close_all(sides: dict) -> tuple[list[int], list[int]]:
    """Close every checkpointer as `Trainer.run()` ends (that stops its writer process);
    returns the writer pids seen before and those still alive after."""
    pids = [p.pid for p in writer_processes()]
    for side in sides.values():
        side.trainer.checkpointer.close()
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return pids, alive


# ---------------------------------------------------------------- main


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="atoll-ckpt-bench-", dir="/tmp")
    root = Path(tmp.name)
    chosen = [*(QUICK_MODEL if args.quick else MODEL), *args.overrides]
    base = [*chosen, "launch.backend=local", "parallel.dp=1", "logging.wandb=disabled",
            "logging.eval_interval=0", "logging.progress=false", "run.steps=1000000",
            "checkpoint.keep=2", "checkpoint.keep_every=0", "checkpoint.resume=none",
            f"launch.threads_per_worker={args.threads[0]}"]
    extra = {"async": ["checkpoint.async=true", f"checkpoint.interval={INTERVAL}"],
             "none": ["checkpoint.async=true", "checkpoint.interval=0"],
             "sync": ["checkpoint.async=false", f"checkpoint.interval={INTERVAL}"]}
    print(f"machine: {machine_line()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M')}; {load_line()}")
    print(f"recipe: {args.recipe or 'default'} {' '.join(chosen)}")

    sides: dict[str, Side] = {}
    results: dict[int, dict] = {}
    processes = ([], [])
    try:
        for name in SIDES:
            cfg = load_recipe(args.recipe, [*base, *extra[name], f"run.dir={root / name}"])
            sides[name] = Side(name, Trainer(cfg))
        t0 = sides["async"].trainer
        n_params = sum(p.numel() for p in t0.model.parameters())
        print(f"model: dim {t0.cfg.model.dim}, {t0.cfg.model.layers} layers, "
              f"{t0.cfg.model.moe.num_experts} experts top-{t0.cfg.model.moe.top_k}, {n_params:,} params; "
              f"batch {t0.cfg.data.micro_batch}x{t0.cfg.data.grad_accum}x{t0.cfg.data.seq_len} tokens; "
              f"device {t0.device}", flush=True)

        torch.set_num_threads(args.threads[0])
        warm = 2 * INTERVAL - 1  # through the first save, to the step before the next
        first = {name: side.warm_up(warm) for name, side in sides.items()}
        tensors, _ = split_state(t0.states)  # after steps: the Adam moments exist
        state_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        n_tensors = len(tensors)
        del tensors
        ckpt_bytes = commit_events(root / "async")[INTERVAL]["bytes"]
        print(f"checkpoint state: {n_tensors} tensors, {state_bytes / 1e6:.1f} MB (params + 2 Adam moments, "
              f"fp32); checkpoint files {ckpt_bytes / 1e6:.1f} MB")
        print(f"plan: {warm} warm-up steps per trainer, then per thread setting {args.rounds} rounds x "
              f"{args.steps} steps per trainer in windows of {INTERVAL}; threads {args.threads}", flush=True)

        buffer = memoryview(torch.randint(0, 256, (ckpt_bytes,), dtype=torch.uint8).numpy())
        windows = args.steps // INTERVAL
        for threads in args.threads:
            torch.set_num_threads(threads)
            for side in sides.values():
                side.reset()
            refs = {"dcp_save": [], "split_state": [], "write": [], "hash": [], "paused_save": []}
            load_start = load_line()
            turn = 0
            for r in range(args.rounds):
                for w in range(windows + 1):
                    if w == (r % (windows + 1)):  # the references once per round, at a moving slot
                        split_s, save_s = plain_dcp_save(sides["sync"].trainer, root / "plain-dcp")
                        refs["split_state"].append(split_s)
                        refs["dcp_save"].append(save_s)
                        refs["write"].append(plain_write(buffer, root / "plain-write.bin"))
                        refs["paused_save"].append(paused_save(sides["async"].trainer))
                        refs["hash"].append(hash_checkpoint(root / "sync"))
                    if w == windows:
                        continue
                    order = SIDES[turn % 3:] + SIDES[:turn % 3]
                    turn += 1
                    for name in order:
                        sides[name].window()
                for side in sides.values():
                    side.end_round()
                print(f"  threads {threads} round {r + 1}/{args.rounds}: tokens/s "
                      + ", ".join(f"{n} {sides[n].tokens_per_s[-1]:.0f}" for n in SIDES)
                      + f"; {load_line()}", flush=True)
            results[threads] = {
                "sides": {n: {k: v for k, v in vars(s).items() if k not in ("trainer", "losses", "timeline",
                                                                              "_tracked")}
                          for n, s in sides.items()},
                "refs": refs, "load": (load_start, load_line()),
                "events": {n: commit_events(root / n) for n in ("async", "sync")},
                "timeline": dict(sides["async"].timeline)}

        losses = {n: s.losses for n, s in sides.items()}
        common = sorted(set.intersection(*(set(v) for v in losses.values())))
        delta = max(abs(losses[n][s] - losses["none"][s]) for n in ("async", "sync") for s in common)
    finally:
        processes = close_all(sides)
        if sides:
            next(iter(sides.values())).trainer.close()  # the process group all three share
        tmp.cleanup()

    report(args, first, results, ckpt_bytes, state_bytes, delta, len(common), processes)
    return 0


# ---------------------------------------------------------------- report


def row(label: str, values: list[float], scale: float = 1.0, fmt: str = ".1f") -> str:
    if not values:
        return f"{label:<54}{'-':>10}{'-':>10}{'-':>10}{0:>5}"
    v = [x * scale for x in values]
    return (f"{label:<54}{statistics.median(v):>10{fmt}}{percentile(v, 0.1):>10{fmt}}"
            f"{percentile(v, 0.9):>10{fmt}}{len(v):>5}")


def report(args, first, results, ckpt_bytes, state_bytes, delta, n_common, processes) -> None:
    mb = ckpt_bytes / 1e6
    print()
    f = first["async"]
    print(f"first async save (one-off: spawns the writer, allocates the shared buffers): blocked "
          f"{1e3 * f['in_save']:.1f} ms in save() + {1e3 * f['after']:.1f} ms in the next {INTERVAL - 1} steps; "
          f"committed {1e3 * f['drain']:.0f} ms after them")
    print(f"first sync save: blocked {1e3 * first['sync']['in_save']:.1f} ms")
    finals = []
    for threads, res in results.items():
        a, n, s = (res["sides"][k] for k in SIDES)
        refs = res["refs"]
        a_steps = {save["step"] for save in a["saves"]}
        s_steps = {save["step"] for save in s["saves"]}
        a_events = [e for step, e in res["events"]["async"].items() if step in a_steps]
        s_events = [e for step, e in res["events"]["sync"].items() if step in s_steps]
        parts = {"staging": [], "writer": [], "commit": []}
        for e in a_events:
            marks = res["timeline"].get(e["step"], {})
            if {"staged", "written"} <= set(marks):
                parts["staging"].append(marks["staged"] - marks["started"])
                parts["writer"].append(marks["written"] - marks["staged"])
                parts["commit"].append(e["time"] - marks["written"])
        print()
        print(f"threads {threads}  ({res['load'][0]} at start; {res['load'][1]} at end)")
        print(f"{'':<54}{'median':>10}{'p10':>10}{'p90':>10}{'n':>5}")
        print(row("(a) async: blocked per save, ms", [x["blocked"] for x in a["saves"]], 1e3))
        print(row("      in save(): split_state, start the save thread", [x["in_save"] for x in a["saves"]], 1e3))
        print(row("      in the 9 next steps: wait_staging", [x["after"] for x in a["saves"]], 1e3))
        print(row("      not committed after 10 steps: wait", [x["drain"] for x in a["saves"]], 1e3))
        print(row("(a) sync: blocked per save, ms", [x["blocked"] for x in s["saves"]], 1e3))
        print(row("(a) plain dcp.save of the same tensors, ms", refs["dcp_save"], 1e3))
        print(row("      split_state (get_state_dict), ms", refs["split_state"], 1e3))
        print(row("(b) tokens/s, async checkpoint every 10 steps", a["tokens_per_s"], fmt=".0f"))
        print(row("(b) tokens/s, no checkpoint", n["tokens_per_s"], fmt=".0f"))
        print(row("(b) tokens/s, sync checkpoint every 10 steps", s["tokens_per_s"], fmt=".0f"))
        print(row("    step time, async checkpoints, ms", a["step_s"], 1e3))
        print(row("    step time, no checkpoint, ms", n["step_s"], 1e3))
        print(row("    training thread CPU per step, async, ms", a["train_cpu_per_step"], 1e3))
        print(row("    training thread CPU per step, none, ms", n["train_cpu_per_step"], 1e3))
        saves = max(len(a["saves"]), 1)
        print(f"    CPU s per save: writer process {a['writer_cpu'] / saves:.2f}, checkpoint thread (plan, "
              f"staging copy, commit) {a['thread_cpu'] / saves:.2f}; process CPU per 10 steps: async "
              f"{a['proc_cpu'] / saves:.2f}, none {n['proc_cpu'] * INTERVAL / max(n['steps'], 1):.2f}")
        a_mbs = [e["bytes_per_s"] / 1e6 for e in a_events]
        s_mbs = [e["bytes_per_s"] / 1e6 for e in s_events]
        w_mbs = [mb / t for t in refs["write"]]
        print(row("(c) async save() -> commit, MB/s", a_mbs, fmt=".0f"))
        print(row("      seconds", [e["seconds"] for e in a_events], fmt=".2f"))
        print(row("      planning + staging (copy to shared memory), s", parts["staging"], fmt=".2f"))
        print(row("      writer process (write + sha256 + fsync), .metadata, s", parts["writer"], fmt=".2f"))
        print(row("      commit (hash exchange, manifest, rename), s", parts["commit"], fmt=".2f"))
        p_mbs = [mb / t for t in refs["paused_save"]]
        print(row("(c) async save() -> commit, training paused, MB/s", p_mbs, fmt=".0f"))
        print(row("      seconds", refs["paused_save"], fmt=".2f"))
        print(row("(c) sync save() -> commit, MB/s", s_mbs, fmt=".0f"))
        print(row("(c) plain write + fsync of the same bytes, MB/s", w_mbs, fmt=".0f"))
        print(row("      seconds", refs["write"], fmt=".2f"))
        print(row("(c) sha256 of a checkpoint's files, MB/s", [mb / t for t in refs["hash"]], fmt=".0f"))
        print(row("      seconds", refs["hash"], fmt=".2f"))
        block = median([x["blocked"] for x in a["saves"]]) / median([x["blocked"] for x in s["saves"]])
        tput = median(a["tokens_per_s"]) / median(n["tokens_per_s"])
        bw = (median(a_mbs) / median(w_mbs), median(p_mbs) / median(w_mbs))
        paired = median([x / y for x, y in zip(a["tokens_per_s"], n["tokens_per_s"])])
        print(f"    async blocking / plain dcp.save: "
              f"{100 * median([x['blocked'] for x in a['saves']]) / median(refs['dcp_save']):.2f}%; "
              f"throughput, median of per-round ratios: {paired:.3f}; sync checkpoints: "
              f"{median(s['tokens_per_s']) / median(n['tokens_per_s']):.3f}; training thread CPU per step "
              f"none / async: {median(n['train_cpu_per_step']) / median(a['train_cpu_per_step']):.3f}")
        print(f"    sync save bandwidth / plain write: {median(s_mbs) / median(w_mbs):.2f}; "
              f"sha256 time / plain write time: {median(refs['hash']) / median(refs['write']):.2f}")
        finals.append((threads, block, tput, bw))
    print()
    print(f"losses of the three trainers over {n_common} common steps: max |difference| = {delta:.2e}")
    pids, alive = processes
    print(f"writer processes: {pids or 'none'}; still alive at the end: {alive or 'none'}")
    for threads, block, tput, bw in finals:
        print(f"async blocking / sync: {100 * block:.2f}%  target <= {100 * BLOCK_TARGET:.0f}%  "
              f"{'PASS' if block <= BLOCK_TARGET else 'FAIL'}  (threads {threads})")
    for threads, block, tput, bw in finals:
        print(f"throughput with checkpoints / without: {tput:.3f}  target >= {THROUGHPUT_TARGET}  "
              f"{'PASS' if tput >= THROUGHPUT_TARGET else 'FAIL'}  (threads {threads})")
    for threads, block, tput, bw in finals:
        print(f"save bandwidth / plain write: {bw[1]:.2f} with training paused  target >= {BANDWIDTH_TARGET}  "
              f"{'PASS' if bw[1] >= BANDWIDTH_TARGET else 'FAIL'}; {bw[0]:.2f} beside training  (threads {threads})")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
