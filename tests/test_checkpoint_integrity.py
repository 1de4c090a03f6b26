"""Checkpoint integrity on real files: the commit protocol, retention, damage and fallback.

One tiny run (4 steps, a checkpoint every 2) is trained once per module;
tests that damage it work on a copy. Damage must be reported in one line
naming the file, by `atoll ckpt verify` and by resume, which falls back to
the newest checkpoint that verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from atoll.checkpoint import dcp_io, manifest, store
from atoll.checkpoint.manifest import CheckpointError
from atoll.launch.cli import main
from atoll.trainer.metrics import read_jsonl
from conftest import TINY_MOE, subprocess_env

BASE = [*TINY_MOE, "launch.backend=local", "parallel.dp=1", "checkpoint.interval=2",
        "checkpoint.keep=5"]
DATA = "__0_0.distcp"  # DCP's one data file per rank
S2, S4 = "step-00000002", "step-00000004"
WQ = "layers.0.attention.wq.weight"


def train(run_dir: Path, *extra: str, steps: int = 4) -> int:
    """`atoll train` in this process; returns the exit code."""
    saved_env = dict(os.environ)  # the run sets MASTER_ADDR/PORT for its 1-rank group
    try:
        return main(["train", *BASE, f"run.steps={steps}", f"run.dir={run_dir}", *extra])
    finally:
        if dist.is_initialized():  # a run that fails while starting leaves its group behind
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_env)


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("atoll: error: "), lines
    return lines[0]


def logged_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained").resolve() / "run"
    assert train(run) == 0
    return run


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path.resolve() / "run"))


# ---------------------------------------------------------------- damage

def truncate(ckpt: Path) -> None:
    path = ckpt / DATA
    path.write_bytes(path.read_bytes()[:-1000])


def flip_byte(ckpt: Path) -> None:
    path = ckpt / DATA
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {  # kind -> (damage, the file the message must name)
    "truncated": (truncate, DATA),
    "flipped_byte": (flip_byte, DATA),
    "missing_file": (lambda ckpt: (ckpt / DATA).unlink(), DATA),
    "missing_manifest": (lambda ckpt: (ckpt / manifest.MANIFEST).unlink(), manifest.MANIFEST),
    "invalid_json": (lambda ckpt: (ckpt / manifest.MANIFEST).write_text('{"format_version": 1, "st'),
                     manifest.MANIFEST),
}


# ---------------------------------------------------------------- layout of a commit

def test_committed_checkpoint_layout(trained):
    ckpts = trained / "checkpoints"
    assert (ckpts / store.LATEST).read_text() == S4 + "\n"
    assert sorted(p.name for p in ckpts.iterdir()) == [store.LATEST, S2, S4]  # no .partial left
    commits = [e for e in read_jsonl(trained / "events.jsonl") if e["event"] == "checkpoint_commit"]
    assert [e["step"] for e in commits] == [2, 4]
    for step, event in zip((2, 4), commits):
        folder = ckpts / store.step_dir_name(step)
        m = json.loads((folder / manifest.MANIFEST).read_text())
        on_disk = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
        assert set(m["files"]) == set(on_disk) - {manifest.MANIFEST} >= {DATA, ".metadata"}
        for name, info in m["files"].items():
            assert info["size"] == on_disk[name].stat().st_size
            assert info["sha256"] == hashlib.sha256(on_disk[name].read_bytes()).hexdigest()
        assert m["format_version"] == manifest.FORMAT_VERSION
        assert (m["step"], m["samples"]) == (step, 2 * step)  # micro_batch 2 × grad_accum 1 × dp 1
        assert m["layout"]["world_size"] == 1 and m["layout"]["dp"] == 1
        assert m["recipe"]["model"]["dim"] == 64 and m["recipe"]["checkpoint"]["interval"] == 2
        assert m["tensors"]["model." + WQ] == {"shape": [64, 64], "dtype": "float32"}
        assert m["tensors"][f"optim.state.{WQ}.exp_avg"]["shape"] == [64, 64]
        params = [k[len("model."):] for k in m["tensors"]
                  if k.startswith("model.") and not k.endswith("expert_bias_E")]  # a buffer
        assert len(params) > 10 and all(f"optim.state.{p}.exp_avg" in m["tensors"] for p in params)
        assert m["state"]["train"]["step"] == step
        assert m["state"]["data"]["samples_consumed"] == 2 * step
        assert m["state"]["scheduler"]["last_epoch"] == step
        assert event["path"] == str(folder) and event["seconds"] >= 0
        assert event["bytes"] == sum(p.stat().st_size for p in on_disk.values())
    metrics = read_jsonl(trained / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    # A save after step 2 blocks training until its copy is staged: seen in the next row.
    assert all(r["ckpt_block_s"] >= 0 for r in metrics) and metrics[2]["ckpt_block_s"] > 0


# ---------------------------------------------------------------- retention

def fake_checkpoint(root: Path, step: int) -> Path:
    part = store.partial_dir(root, step)
    part.mkdir(parents=True)
    (part / "data.bin").write_bytes(bytes([step]) * 16)
    manifest.write_manifest(part, step=step, samples=2 * step, layout={"world_size": 1},
                            recipe={}, tensors={}, state={})
    return store.commit(root, step)


@pytest.mark.parametrize("keep, keep_every, kept", [
    (2, 4, {4, 8, 9}), (2, 0, {8, 9}), (1, 0, {9}), (1, 5, {5, 9})])
def test_retention(tmp_path, keep, keep_every, kept):
    removed = []
    for step in range(1, 10):  # as the checkpointer does: retention after each commit
        fake_checkpoint(tmp_path, step)
        removed += store.apply_retention(tmp_path, keep, keep_every)
    assert {step for step, _ in store.committed(tmp_path)} == kept
    assert sorted(p.name for p in removed) == [store.step_dir_name(s) for s in range(1, 10)
                                               if s not in kept]
    assert store.read_latest(tmp_path) == tmp_path / "step-00000009"  # the newest stays
    assert manifest.verify(tmp_path / "step-00000009")["samples"] == 18


def test_retention_keeps_what_latest_names(tmp_path):
    """Resumed past a corrupt step 4, a run commits step 3: retention must keep it."""
    for step in (2, 4):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "step-00000004" / "data.bin").write_bytes(b"rotten" * 2)
    fake_checkpoint(tmp_path, 3)
    store.apply_retention(tmp_path, keep=1, keep_every=0)
    assert store.read_latest(tmp_path).is_dir()
    assert store.find_resumable(tmp_path, lambda message: None)[0] == tmp_path / "step-00000003"


# ---------------------------------------------------------------- damage is found

@pytest.mark.parametrize("kind", DAMAGE)
def test_damage_is_reported_and_skipped(run_copy, kind, capsys):
    damage, bad_file = DAMAGE[kind]
    ckpts = run_copy / "checkpoints"
    damage(ckpts / S4)
    for path in (ckpts / S4, run_copy):  # the step folder, and the run folder via `latest`
        assert main(["ckpt", "verify", str(path)]) == 1
        line = one_error_line(capsys)
        assert S4 in line and bad_file in line
    assert main(["ckpt", "verify", str(ckpts / S2)]) == 0
    warnings: list[str] = []
    path, found = store.find_resumable(ckpts, warnings.append)
    assert path == ckpts / S2 and found["step"] == 2
    assert len(warnings) == 1 and S4 in warnings[0] and bad_file in warnings[0], warnings
    if kind == "missing_manifest":  # without a manifest the folder is not a checkpoint
        assert [step for step, _ in store.committed(ckpts)] == [2]


def test_manifest_with_a_flipped_bit_in_a_key_is_reported_and_skipped(run_copy, capsys):
    """A one-bit flip ("size" -> "sizf") leaves valid JSON that lacks a field."""
    ckpts = run_copy / "checkpoints"
    path = ckpts / S4 / manifest.MANIFEST
    path.write_text(path.read_text().replace('"size"', '"sizf"', 1))
    assert main(["ckpt", "verify", str(ckpts / S4)]) == 1
    assert S4 in one_error_line(capsys)
    assert store.find_resumable(ckpts, lambda message: None)[0] == ckpts / S2


@pytest.mark.parametrize("kind", ["flipped_byte", "missing_manifest"])
def test_resume_auto_falls_back_to_the_older_checkpoint(run_copy, kind, capsys):
    DAMAGE[kind][0](run_copy / "checkpoints" / S4)
    assert train(run_copy) == 0
    out = capsys.readouterr().out
    assert f"warning: skipping checkpoint: checkpoint {run_copy / 'checkpoints' / S4}" in out
    assert f"resumed from {run_copy / 'checkpoints' / S2} at step 2 (4 samples consumed)" in out
    assert logged_steps(run_copy) == [1, 2, 3, 4]
    assert main(["ckpt", "verify", str(run_copy)]) == 0  # step 4 was saved again
    events = read_jsonl(run_copy / "events.jsonl")
    skipped, = [e for e in events if e["event"] == "checkpoint_skipped"]
    assert skipped["path"] == str(run_copy / "checkpoints" / S4) and S4 in skipped["reason"]
    start = [e for e in events if e["event"] == "run_start"][-1]
    assert start["resume"] == {"source": "disk", "step": 2, "path": str(run_copy / "checkpoints" / S2)}
    assert [e for e in events if e["event"] == "run_end"][-1]["status"] == "done"


def test_leftover_partial_is_ignored_and_removed(run_copy, capsys):
    ckpts = run_copy / "checkpoints"
    partial = store.partial_dir(ckpts, 6)
    partial.mkdir()
    (partial / DATA).write_bytes(b"half a save")
    warnings: list[str] = []
    assert store.find_resumable(ckpts, warnings.append)[0] == ckpts / S4
    assert any(partial.name in w and "never committed" in w for w in warnings), warnings
    assert main(["ckpt", "verify", str(partial)]) == 1
    assert partial.name in one_error_line(capsys)
    assert train(run_copy) == 0  # already at step 4: nothing to train, but the partial goes
    out = capsys.readouterr().out
    assert f"warning: removed {partial.name}: a save that never committed" in out
    assert f"resumed from {ckpts / S4} at step 4" in out
    assert not partial.exists() and store.read_latest(ckpts) == ckpts / S4


# ---------------------------------------------------------------- checkpoint.resume

def test_resume_from_a_damaged_path_stops_with_one_line(run_copy, tmp_path, capsys):
    flip_byte(run_copy / "checkpoints" / S4)
    assert train(tmp_path / "new", f"checkpoint.resume={run_copy / 'checkpoints' / S4}") == 2
    line = one_error_line(capsys)
    assert S4 in line and DATA in line and "does not match its hash" in line


def test_resume_from_another_runs_checkpoint(trained, tmp_path, capsys):
    new = tmp_path.resolve() / "new"
    assert train(new, f"checkpoint.resume={trained / 'checkpoints' / S2}") == 0
    assert f"resumed from {trained / 'checkpoints' / S2} at step 2" in capsys.readouterr().out
    assert logged_steps(new) == [3, 4]
    assert store.read_latest(new / "checkpoints") == new / "checkpoints" / S4
    assert main(["ckpt", "verify", str(new)]) == 0
    assert store.read_latest(trained / "checkpoints") == trained / "checkpoints" / S4  # untouched


def test_resume_into_a_model_of_another_shape(trained, tmp_path, capsys):
    assert train(tmp_path / "new", "model.dim=32", f"checkpoint.resume={trained}") == 2
    line = one_error_line(capsys)
    match = re.search(r"checkpoint (\S+) does not fit this model \((\d+) mismatched tensors\): ", line)
    assert match and match.group(1) == str(trained / "checkpoints" / S4), line
    assert f"model.{WQ} [64, 64] vs [32, 32]" in line
    assert int(match.group(2)) > 8 and f"and {int(match.group(2)) - 8} more" in line


MOMENT = f"optim.state.{WQ}.exp_avg_sq"


def without_moment(ckpt: Path, out: Path, listed: bool) -> Path:
    """A committed copy of `ckpt` whose files lack one Adam moment; `listed`: the manifest's
    tensor index still names it (index and files disagree), else it is gone from both."""
    saved = manifest.verify(ckpt)
    tensors = dcp_io.read_tensors(ckpt, saved["tensors"])
    index = dcp_io.tensor_index(tensors)
    del tensors[MOMENT]
    target = store.partial_dir(out, saved["step"])
    dcp_io.write_tensors(target, tensors)
    manifest.write_manifest(target, step=saved["step"], samples=saved["samples"], layout=saved["layout"],
                            recipe=saved["recipe"], tensors=index if listed else dcp_io.tensor_index(tensors),
                            state=saved["state"])
    return store.commit(out, saved["step"])


@pytest.mark.parametrize("listed", [True, False], ids=["missing-from-files", "missing-from-index-and-files"])
def test_optimizer_moment_missing_from_a_full_checkpoint_stops_with_one_line(trained, tmp_path, capsys, listed):
    """A full checkpoint (not weights-only) without one parameter's exp_avg_sq is never
    resumed with a fresh moment: the run stops with one line naming that tensor."""
    damaged = without_moment(trained / "checkpoints" / S4, tmp_path / "damaged", listed)
    assert train(tmp_path / "new", f"checkpoint.resume={damaged}") == 2
    line = one_error_line(capsys)
    assert str(damaged) in line and MOMENT in line, line
    assert not (tmp_path / "new" / "metrics.jsonl").exists() or logged_steps(tmp_path / "new") == []


def test_optimizer_state_missing_a_key_is_refused():
    """Loading model and optimizer state that lacks an optimizer entry raises CheckpointError
    naming it instead of keeping this optimizer's fresh value."""
    from atoll.checkpoint.state import ModelOptimizerState

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = ModelOptimizerState([(model, optimizer)])
    saved = state.state_dict()
    del saved["optim"]["state.0.weight.exp_avg"]
    with pytest.raises(CheckpointError, match=r"state\.0\.weight\.exp_avg"):
        state.load_state_dict(saved)


def test_resume_none_on_a_used_run_dir_needs_overwrite(run_copy, capsys):
    assert train(run_copy, "checkpoint.resume=none") == 2
    assert "run.overwrite" in one_error_line(capsys)
    assert logged_steps(run_copy) == [1, 2, 3, 4]  # nothing was touched
    assert train(run_copy, "checkpoint.resume=none", "run.overwrite=true", steps=1) == 0
    assert "resumed" not in capsys.readouterr().out
    assert logged_steps(run_copy) == [1]
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["latest", "step-00000001"]
    commits = [e["step"] for e in read_jsonl(run_copy / "events.jsonl") if e["event"] == "checkpoint_commit"]
    assert commits == [1]


# ---------------------------------------------------------------- safe loading

class _RunsCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _smuggled(command: str) -> bytes:
    """Protocol 4 resolves dotted names by getattr, and the allowed module imports `os`."""
    def text(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()
    return (b"\x80\x04" + text("torch.distributed.checkpoint.metadata") + text("os.system")
            + b"\x93" + text(command) + b"\x85R.")  # STACK_GLOBAL, TUPLE1, REDUCE


@pytest.mark.parametrize("payload, named", [
    (lambda command: pickle.dumps(_RunsCommand(command)), f"{os.system.__module__}.system"),
    (_smuggled, "os.system")], ids=["foreign_global", "dotted_name_in_allowed_module"])
def test_metadata_naming_a_foreign_global_is_refused(tmp_path, payload, named):
    pwned = tmp_path / "pwned"
    (tmp_path / ".metadata").write_bytes(payload(f"touch {pwned}"))
    with pytest.raises(Exception) as caught:
        dcp_io.SafeFileSystemReader(str(tmp_path)).read_metadata()
    assert not pwned.exists(), "unpickling the checkpoint metadata ran a shell command"
    assert caught.type is CheckpointError and named in str(caught.value), caught.value


def test_real_metadata_loads_through_the_safe_reader(trained):
    ckpt = trained / "checkpoints" / S4
    m = manifest.read_manifest(ckpt)
    metadata = dcp_io.SafeFileSystemReader(str(ckpt)).read_metadata()
    assert set(metadata.state_dict_metadata) == set(m["tensors"])
    tensors = dcp_io.read_tensors(ckpt, m["tensors"], keys=["model." + WQ, f"optim.state.{WQ}.exp_avg"])
    assert tensors["model." + WQ].shape == (64, 64)
    assert torch.isfinite(tensors["model." + WQ]).all() and tensors[f"optim.state.{WQ}.exp_avg"].abs().sum() > 0


# ---------------------------------------------------------------- tools

@pytest.mark.parametrize("where, step", [("run", 4), ("checkpoints", 4), ("step2", 2)])
def test_inspect(trained, where, step, capsys):
    ckpts = trained / "checkpoints"
    path = {"run": trained, "checkpoints": ckpts, "step2": ckpts / S2}[where]
    assert main(["ckpt", "inspect", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    folder = ckpts / store.step_dir_name(step)
    m = manifest.read_manifest(folder)
    assert (info["path"], info["step"], info["samples"]) == (str(folder), step, 2 * step)
    assert info["layout"] == m["layout"] and info["tensors"] == m["tensors"]
    assert info["tensors"]["model." + WQ]["shape"] == [64, 64]
    assert info["bytes"] == sum(p.stat().st_size for p in folder.iterdir()
                                if p.name != manifest.MANIFEST)


def test_inspect_summary_for_people(trained, capsys):
    assert main(["ckpt", "inspect", str(trained)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    folder = trained / "checkpoints" / S4
    m = manifest.read_manifest(folder)
    size = sum(f["size"] for f in m["files"].values())
    assert len(lines) <= 10
    assert lines[0] == f"checkpoint  {folder}"
    assert "step        4 (8 samples consumed)" in lines
    assert "layout      world=1 pp=1 dp=1 ep=1 dp_shard=fsdp" in lines
    assert "recipe      default" in lines
    assert any(line.startswith(f"tensors     {len(m['tensors'])} (") for line in lines)
    assert any(line.startswith("size ") and f"({size:,} bytes) in 2 files" in line for line in lines)
    assert any(line.startswith("saved ") and time.strftime("%Y-%m-%d", time.localtime(m["created"])) in line
               for line in lines)
    assert lines[-1].startswith("files       sizes match the manifest")


def test_inspect_summary_names_a_damaged_file(run_copy, capsys):
    truncate(run_copy / "checkpoints" / S4)
    assert main(["ckpt", "inspect", str(run_copy)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"files       DAMAGED: {DATA} has ")


def test_inspect_piped_into_head_ends_quietly(tmp_path):
    """A reader that stops after one line (`| head -1`) while inspect still writes."""
    ckpt = tmp_path / store.step_dir_name(7)
    ckpt.mkdir()
    (ckpt / DATA).write_bytes(b"0" * 16)
    tensors = {f"model.layers.{i}.w": {"shape": [4, 4], "dtype": "float32"} for i in range(5000)}
    manifest.write_manifest(ckpt, step=7, samples=14, layout={"world_size": 1}, recipe={},
                            tensors=tensors, state={})  # an index far larger than a pipe's buffer
    for extra in (["--json"], []):
        command = " ".join([sys.executable, "-m", "atoll.launch", "ckpt", "inspect", *extra, str(ckpt)])
        proc = subprocess.run(["bash", "-c", f"set -o pipefail; {command} | head -1"],
                              capture_output=True, text=True, timeout=60, env=subprocess_env())
        assert proc.stdout.strip() in ("{", f"checkpoint  {ckpt}"), proc.stdout
        assert proc.stderr == "", proc.stderr
        assert proc.returncode in (0, 141), proc.returncode  # 141: inspect ended by the closed pipe


def test_export_hf(trained, tmp_path, capsys):
    """The weights under transformers' names (tests/test_hf.py loads them in transformers)."""
    out = tmp_path / "hf"
    assert main(["ckpt", "export", str(trained), "--format", "hf", "--out", str(out)]) == 0
    ckpt = trained / "checkpoints" / S4
    saved = dcp_io.read_tensors(ckpt, manifest.read_manifest(ckpt)["tensors"])
    weights = load_file(str(out / "model.safetensors"))
    assert torch.equal(weights["model.layers.0.self_attn.q_proj.weight"], saved["model." + WQ])
    experts = saved["model.layers.1.feed_forward.experts.w2"]  # [E, H, D] -> per expert [D, H]
    assert torch.equal(weights["model.layers.1.block_sparse_moe.experts.3.w2.weight"], experts[3].t())
    assert len(weights) == len([k for k in saved if k.startswith("model.") and "expert_bias" not in k]) + \
        2 * 3 * (4 - 1)  # each stacked expert tensor became 4
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_local_experts"]) == (64, 2, 4)


def test_fine_tuning_takes_only_the_weights_then_its_own_state(trained, tmp_path):
    """checkpoint.load_optimizer=false: step 0 with the checkpoint's weights and a fresh
    optimizer; once the new run has checkpoints of its own it resumes from those."""
    source = store.resolve_checkpoint(trained)
    saved = dcp_io.read_tensors(source, manifest.verify(source)["tensors"])
    tuned = tmp_path / "tuned"
    # A learning rate far below fp32 resolution: the weights after one step are the loaded ones.
    assert train(tuned, f"checkpoint.resume={source}", "checkpoint.load_optimizer=false", "optim.lr=1e-30",
                 "optim.warmup_steps=0", steps=2) == 0
    events = [e for e in read_jsonl(tuned / "events.jsonl") if e["event"] == "resume"]
    assert [(e["source"], e["step"]) for e in events] == [("weights", 0)]
    assert logged_steps(tuned) == [1, 2]
    after = store.resolve_checkpoint(tuned)
    got = dcp_io.read_tensors(after, manifest.verify(after)["tensors"])
    weights = [k for k in saved if k.startswith("model.")]
    assert weights and all(torch.equal(got[k], saved[k]) for k in weights)
    assert {float(v) for k, v in got.items() if k.endswith(".step")} == {2.0}  # fresh: 2 steps, not 6
    # The same command again, longer: it goes on from its own step 2, not from the source.
    assert train(tuned, f"checkpoint.resume={source}", "checkpoint.load_optimizer=false", "optim.lr=1e-30",
                 "optim.warmup_steps=0", steps=3) == 0
    events = [e for e in read_jsonl(tuned / "events.jsonl") if e["event"] == "resume"]
    assert [(e["source"], e["step"]) for e in events] == [("weights", 0), ("disk", 2)]
    assert logged_steps(tuned) == [1, 2, 3]


def test_async_save_commits_without_waiting_for_the_next_step(tmp_path):
    """The commit starts when the writer is done, not at the next step: with training
    paused after the saving step, the checkpoint still commits."""
    import time

    from atoll.trainer.config import load_recipe
    from atoll.trainer.train import Trainer

    trainer = Trainer(load_recipe(None, [*BASE, "run.steps=100", "checkpoint.async=true",
                                         "checkpoint.memory_interval=0", f"run.dir={tmp_path / 'run'}"]))
    try:
        for _ in range(2):  # step 2 saves (checkpoint.interval=2); no step follows it
            trainer.one_step()
        commits = lambda: [e["step"] for e in read_jsonl(tmp_path / "run" / "events.jsonl")
                           if e["event"] == "checkpoint_commit"]
        deadline = time.monotonic() + 60
        while not commits() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert commits() == [2] and trainer.step == 2
        assert store.resolve_checkpoint(tmp_path / "run").name == S2
    finally:
        trainer.close()
