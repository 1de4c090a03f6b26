"""The `atoll` command line (also `python -m atoll.launch`).

`atoll train [RECIPE] [key=value ...] [--dry-run]` resolves the recipe, picks
the backend (torchrun when started by torchrun, else `launch.backend`) and
starts the entry function. `atoll ckpt inspect|verify|export|import` work on
checkpoints offline. Problems a user can fix (recipe, layout, data, a
checkpoint that does not fit) print one line and exit 2; a failed run or a
checkpoint that fails `verify` exits 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atoll", description="Fault-tolerant MoE training.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a recipe",
                                description="Train RECIPE (a path or a name in recipes/; "
                                            "default: the default recipe) with key=value overrides.")
    train.add_argument("args", nargs="*", metavar="[RECIPE] [key=value ...]")
    train.add_argument("--dry-run", action="store_true",
                       help="print the resolved recipe, the layout and the memory plan, then exit")

    ckpt = commands.add_parser("ckpt", help="inspect, verify, export or import checkpoints")
    ckpt_commands = ckpt.add_subparsers(dest="ckpt_command", required=True)
    inspect = ckpt_commands.add_parser("inspect", help="summary of a checkpoint (--json: its full index)")
    inspect.add_argument("path", type=Path, help="checkpoint, checkpoints folder or run folder")
    inspect.add_argument("--json", action="store_true",
                         help="print the JSON index: step, samples, layout, every tensor's global "
                              "shape and dtype, bytes, files")
    verify = ckpt_commands.add_parser("verify", help="re-hash every file against the manifest")
    verify.add_argument("path", type=Path)
    export = ckpt_commands.add_parser("export", help="write a checkpoint in another format")
    export.add_argument("path", type=Path)
    export.add_argument("--format", required=True, choices=["hf", "deepspeed-universal"])
    export.add_argument("--out", required=True, type=Path)
    export.add_argument("--max-shard-mb", type=float, default=5 * 1024,
                        help="hf: split the weights into safetensors shards of at most this size")
    imp = ckpt_commands.add_parser("import", help="make an atoll checkpoint from another format")
    imp.add_argument("src", type=Path)
    imp.add_argument("--format", required=True, choices=["hf", "deepspeed-universal"])
    imp.add_argument("--out", required=True, type=Path, help="checkpoints folder to commit into")
    return parser


def split_recipe_args(args: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """The first argument is the recipe unless it is already an override."""
    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return None, list(args)


def user_errors() -> tuple[type[BaseException], ...]:
    from atoll.checkpoint.manifest import CheckpointError
    from atoll.parallel.kernels import KernelUnavailable
    from atoll.parallel.layout import LayoutError
    from atoll.trainer.config import RecipeError
    from atoll.trainer.data import DataError

    return RecipeError, LayoutError, DataError, CheckpointError, KernelUnavailable


def fail(message: str, code: int) -> int:
    print(f"atoll: error: {message}", file=sys.stderr, flush=True)
    return code


def train_command(args: argparse.Namespace) -> int:
    from atoll.parallel.layout import Layout, ProcessEnv, running_under_torchrun
    from atoll.trainer.config import load_recipe, run_dir, to_dict, to_yaml
    from atoll.trainer.run_dir import check_inputs, check_run_dir, prepare_data

    recipe, overrides = split_recipe_args(args.args)
    cfg = load_recipe(recipe, overrides)
    torchrun = running_under_torchrun()
    if torchrun:
        cfg.launch.backend = "torchrun"
    layout = Layout.from_recipe(cfg)
    if torchrun:
        layout.check_world(ProcessEnv.from_environ())
    check_inputs(cfg)  # before Ray or any worker starts: a wrong path is one line, at once
    if args.dry_run:
        print(to_yaml(cfg), end="")
        print(f"# layout: {layout.describe()}; backend: {cfg.launch.backend}; "
              f"run dir: {run_dir(cfg)}")
        print("\n".join(memory_plan_lines(cfg)))
        return 0
    # Workers may start elsewhere (another cwd, another node): give them absolute paths.
    cfg.run.dir = str(run_dir(cfg).resolve())
    for section in [cfg.data, *(cfg.data.mixture or [])]:
        for key in ("path", "tokenizer"):
            if section.get(key):
                section[key] = str(Path(section[key]).resolve())
    if cfg.checkpoint.resume not in ("auto", "none"):
        cfg.checkpoint.resume = str(Path(cfg.checkpoint.resume).resolve())
    restarting = torchrun and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    check_run_dir(cfg, restarting=restarting)
    if restarting:
        cfg.run.overwrite = False  # a restart resumes; only the first start may overwrite
    # Tokenise here, once, before any worker starts: a bad record stops the run in one line.
    prepare_data(cfg)

    if cfg.launch.backend == "torchrun" and not torchrun:
        raise user_errors()[0]("launch.backend=torchrun is set by torchrun itself; "
                               "start with `torchrun --nproc-per-node N -m atoll.launch train ...`")
    from atoll.launch.outcome import RunOutcome
    from atoll.launch.signals import GracefulStop, exit_now
    from atoll.launch.supervisor import StopIncomplete
    from atoll.trainer.run_dir import checkpoints_dir

    stop = GracefulStop(cfg.fault_tolerance.stop_grace_s)
    # One process speaks for the run: the driver, the local process, or torchrun's rank 0.
    outcome = RunOutcome(run_dir(cfg), checkpoints_dir(cfg), enabled=os.environ.get("RANK", "0") == "0")
    if cfg.launch.backend == "ray":
        from atoll.trainer.run_dir import prepare_run_dir

        # The driver prepares the run directory once; workers (and any restart) never wipe it.
        prepare_run_dir(cfg)
        cfg.run.overwrite = False
        from atoll.launch.ray_backend import run_on_ray

        try:
            results = run_on_ray(cfg, stop)
        except StopIncomplete as exc:
            return outcome.incomplete(stop, str(exc))
        except KeyboardInterrupt:
            return outcome.incomplete(stop, "a second signal aborted the stop")
        except BaseException:
            outcome.end("failed")
            raise
        return outcome.finished(results)
    from atoll.trainer.hooks import RunControl
    from atoll.trainer.train import train

    control = torchrun_control(cfg) if torchrun else RunControl()
    control.stop_request = stop.reason

    def give_up() -> None:  # the step in progress never reached its boundary: leave now
        exit_now(outcome.incomplete(stop, "the stop did not finish within "
                                          f"fault_tolerance.stop_grace_s={stop.grace_s:g}"))

    stop.watch(give_up)
    try:
        with stop.installed():
            result = train(to_dict(cfg), control)
    except BaseException as exc:
        # torchrun restarts a failed attempt while restarts remain, and the restart resumes
        # from these snapshots; after the last one nothing will read them.
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if attempt >= int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")):
            clear_snapshots(control)
            if isinstance(exc, KeyboardInterrupt):
                return outcome.incomplete(stop, "a second signal aborted the stop")
            outcome.end("failed")
        raise
    clear_snapshots(control)  # the run is done (or stopped with a checkpoint): nothing left in /dev/shm
    return outcome.finished([result])


def memory_plan_lines(cfg) -> list[str]:
    """The memory plan of the recipe, for this machine's GPU when it has one (or for the GPU
    `launch.device_memory_gb` names)."""
    import torch

    from atoll.parallel.memory_plan import GIB, describe, plan_memory

    local_gb = torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else None
    return describe(plan_memory(cfg, local_device_gb=local_gb))


def clear_snapshots(control) -> None:
    """Remove this node's memory snapshots of a torchrun job (once per node: local rank 0)."""
    if control is not None and control.snapshot_store is not None and os.environ.get("LOCAL_RANK", "0") == "0":
        control.snapshot_store.clear()


def torchrun_control(cfg):
    """Under torchrun the memory tier is /dev/shm, shared by the ranks of a node and by
    the restarts torchrun makes of them (same run id), so a restart resumes from memory."""
    from atoll.checkpoint.snapshot_store import ShmSnapshotStore, shm_root
    from atoll.trainer.config import memory_tier_on, run_dir
    from atoll.trainer.hooks import RunControl

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not memory_tier_on(cfg):
        return RunControl(attempt=attempt)
    root = shm_root(str(run_dir(cfg)), os.environ.get("TORCHELASTIC_RUN_ID", "none"))
    if os.environ.get("LOCAL_RANK", "0") == "0" and attempt == 0:
        # A job that failed for good cannot clean up after itself; the next one of this run does.
        ShmSnapshotStore.remove_stale(root)
    return RunControl(snapshot_store=ShmSnapshotStore(root), attempt=attempt)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def print_to_reader(text: str) -> int:
    """Print `text` to stdout; a reader that stops early (`| head`) ends the command quietly,
    with the exit code of a process ended by SIGPIPE, as a shell reports it."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Nothing more reaches the reader; stdout goes to /dev/null so that the
        # interpreter's own flush at exit does not fail on the closed pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return 0


def ckpt_command(args: argparse.Namespace) -> int:
    import json

    from atoll.checkpoint import tools
    from atoll.checkpoint.manifest import CheckpointError

    if args.ckpt_command == "inspect":
        if args.json:
            return print_to_reader(json.dumps(tools.inspect(args.path), indent=2))
        return print_to_reader("\n".join(tools.describe(args.path)))
    if args.ckpt_command == "verify":
        try:
            ckpt = tools.verify_path(args.path)
        except CheckpointError as exc:
            return fail(str(exc), EXIT_FAILED)
        print(f"ok: {ckpt} (every file matches its hash)")
        return 0
    if args.ckpt_command == "export":
        if args.format == "hf":
            out = tools.export_hf(args.path, args.out, int(args.max_shard_mb * 1024**2))
        else:
            out = tools.export_deepspeed(args.path, args.out)
        print(f"exported {args.format} to {out}")
        return 0
    if args.format == "hf":
        ckpt, overrides = tools.import_hf(args.src, args.out)
        print(f"imported into {ckpt} (weights only: a run started from it begins at step 0)\n"
              f"train it with: atoll train RECIPE checkpoint.resume={ckpt} {' '.join(overrides)}")
        return 0
    print(f"imported into {tools.import_deepspeed(args.src, args.out)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (scheduler, `ray job stop`, torchrun) tears down like Ctrl-C.
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.command == "train":
            return train_command(args)
        if args.command == "ckpt":
            return ckpt_command(args)
    except KeyboardInterrupt:
        return fail("interrupted", EXIT_INTERRUPTED)
    except user_errors() as exc:
        return fail(str(exc), EXIT_USAGE)
    except Exception as exc:
        from atoll.launch.ray_backend import WorkerFailed
        from atoll.trainer.train import TrainingError

        if isinstance(exc, (WorkerFailed, TrainingError)):
            return fail(str(exc), EXIT_FAILED)
        raise
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
