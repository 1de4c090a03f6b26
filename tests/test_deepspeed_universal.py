"""atoll.checkpoint.deepspeed_universal against real DeepSpeed ZeRO engines (CPU, gloo).

One 2-rank ZeRO-1 engine run covers both directions: it loads a universal
checkpoint that `atoll ckpt export` made from an atoll training run, then
trains on and saves a native checkpoint that DeepSpeed's own
`ds_to_universal` converts; `atoll ckpt import` brings that back and atoll
resumes training from it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from atoll.checkpoint.dcp_io import read_tensors
from atoll.checkpoint.deepspeed_universal import UniversalState, read_universal, write_universal
from atoll.checkpoint.manifest import verify
from atoll.checkpoint.store import resolve_checkpoint
from atoll.launch.cli import main
from atoll.trainer.config import DataConfig, as_dataclass, load_recipe
from atoll.trainer.data import build_data
from atoll.trainer.metrics import read_jsonl
from conftest import free_port, subprocess_env
from ds_engine_script import build_model, build_optimizer, group_names, loss_fn

SCRIPT = Path(__file__).with_name("ds_engine_script.py")
EXPORT_LR = 2e-3  # differs from the engine's own lr, so restoring param_groups shows


def make_state(steps: int = 4) -> UniversalState:
    """A few plain-PyTorch AdamW steps on the tiny atoll model, as a UniversalState."""
    model = build_model(seed=0)
    opt = build_optimizer(model, lr=EXPORT_LR)
    generator = torch.Generator().manual_seed(7)
    for _ in range(steps):
        loss_fn(model, torch.randint(0, 256, (2, 17), generator=generator)).backward()
        opt.step()
        opt.zero_grad()
    named = dict(model.named_parameters())
    state = {n: opt.state[p] for n, p in named.items()}
    groups = [{"lr": g["lr"], "betas": g["betas"], "eps": g["eps"],
               "weight_decay": g["weight_decay"], "params": names}
              for g, names in zip(opt.param_groups, group_names(model))]
    return UniversalState(
        params={n: p.detach().clone() for n, p in named.items()},
        exp_avg={n: s["exp_avg"].clone() for n, s in state.items()},
        exp_avg_sq={n: s["exp_avg_sq"].clone() for n, s in state.items()},
        step=int(state["output.weight"]["step"]), param_groups=groups,
        extra={"model": {"dim": 32, "layers": 2}, "global_steps": steps, "train_step": steps})


def assert_same_tensors(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def assert_same_state(got: UniversalState, want: UniversalState) -> None:
    for field in ("params", "exp_avg", "exp_avg_sq"):
        assert_same_tensors(getattr(got, field), getattr(want, field))
    assert (got.step, got.param_groups, got.extra, got.tags) == \
        (want.step, want.param_groups, want.extra, want.tags)


def run(cmd: list[str], timeout: float = 240) -> str:
    """Run in its own session; on timeout end that whole process group (ours)."""
    env = subprocess_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out: {' '.join(cmd)}\n{out[-3000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-3000:]}"
    return out


# --- fast: no engine -------------------------------------------------------
def test_round_trip_keeps_everything(tmp_path):
    state = make_state(steps=2)
    # Tags DeepSpeed may attach: row-parallel cat_dim, a vocab tensor, a stacked expert weight.
    state.params["layers.0.feed_forward.experts.w1"] = torch.randn(4, 32, 8)
    state.exp_avg["layers.0.feed_forward.experts.w1"] = torch.randn(4, 32, 8)
    state.exp_avg_sq["layers.0.feed_forward.experts.w1"] = torch.rand(4, 32, 8)
    state.param_groups[0]["params"].append("layers.0.feed_forward.experts.w1")
    state.tags = {"layers.0.attention.wo.weight": {"cat_dim": 1},
                  "tok_embeddings.weight": {"vocab_tensor": True},
                  "layers.0.feed_forward.experts.w1": {"is_expert_param": True, "ep_num_experts": 4}}
    root = tmp_path / "uc"
    folder = write_universal(state, root)
    assert folder == root / "global_step2" and (root / "latest_universal").read_text() == "global_step2"
    assert_same_state(read_universal(root), state)
    assert_same_state(read_universal(folder), state)  # the tag folder itself
    # Everything written is plain: the strictest torch.load takes every file.
    files = list(root.rglob("*.pt"))
    assert len(files) == 2 + 4 * len(state.params)
    for path in files:
        torch.load(path, weights_only=True)
    wo = torch.load(folder / "zero" / "layers.0.attention.wo.weight" / "fp32.pt", weights_only=True)
    assert wo["cat_dim"] == 1 and torch.equal(wo["param"], state.params["layers.0.attention.wo.weight"])
    assert torch.load(folder / "zero" / "norm.weight" / "step.pt", weights_only=True).item() == 2.0
    with pytest.raises(ValueError, match="already exists"):
        write_universal(state, root)


def test_weights_only_state(tmp_path):
    state = make_state(steps=1)
    state.exp_avg, state.exp_avg_sq = {}, {}
    write_universal(state, tmp_path, tag="w")
    assert not (tmp_path / "w" / "zero" / "norm.weight" / "exp_avg.pt").exists()
    got = read_universal(tmp_path)
    assert got.exp_avg == {} and got.step == 0
    assert_same_tensors(got.params, state.params)


def test_sub_param_shape_tag_round_trips(tmp_path):
    pytest.importorskip("deepspeed")
    state = make_state(steps=1)
    shape = {"patterns": [r".*wq\.weight$"], "shape": ((16, 16), 32), "partition_dim": 0}
    state.tags = {"layers.0.attention.wq.weight": {"sub_param_shape": shape}}
    write_universal(state, tmp_path)
    assert read_universal(tmp_path).tags == state.tags


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "latest_universal"))):
        read_universal(tmp_path)
    folder = write_universal(make_state(steps=1), tmp_path)
    missing = folder / "zero" / "layers.1.attention.wk.weight" / "fp32.pt"
    missing.unlink()
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        read_universal(tmp_path)


def test_unsafe_pickle_is_refused(tmp_path):
    folder = write_universal(make_state(steps=1), tmp_path)
    bad = folder / "zero" / "norm.weight" / "exp_avg.pt"
    torch.save({"param": torch.zeros(32), "hook": tempfile.TemporaryDirectory}, bad)
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*weights_only"):
        read_universal(tmp_path)


def test_aux_free_bias_that_deepspeed_would_drop_stops_the_export(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *ATOLL_TINY_DENSE, "model.moe.num_experts=4", "model.moe.balance=aux_free",
                 "model.moe.bias_update_rate=0.05", "run.steps=2", "checkpoint.interval=2",
                 "launch.backend=local", f"run.dir={run}"]) == 0
    capsys.readouterr()
    assert main(["ckpt", "export", str(run), "--format", "deepspeed-universal", "--out", str(tmp_path / "ds")]) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "model.moe.balance=aux_free: DeepSpeed's universal loader" in error[0], error
    assert not (tmp_path / "ds").exists()


# --- slow: real DeepSpeed engines, through atoll's own CLI ------------------
ATOLL_TINY_DENSE = ["dense_tiny", "model.dim=32", "model.layers=2", "model.heads=2",
                    "data.seq_len=16", "data.micro_batch=2", "data.max_bytes=200000",
                    f"optim.lr={EXPORT_LR}", "optim.warmup_steps=0", "logging.wandb=disabled",
                    "logging.eval_interval=0", "logging.log_interval=1",
                    "launch.threads_per_worker=1"]


# MoE as the default recipe has it: stacked experts [E, ...] are one DeepSpeed parameter each
# (tagged as expert weights); the router bias buffer rides in the module's state.
MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.balance=aux_loss"]
EXPERTS = {"dense": 0, "moe": 4}


def atoll_args(kind: str) -> list[str]:
    return ATOLL_TINY_DENSE + (MOE if kind == "moe" else [])


def first_batch_tokens(kind: str) -> torch.Tensor:
    """The token windows [B, S+1] of the first step of an atoll run of this recipe whose data
    starts at sample 0 (as a run resumed from a DeepSpeed import does)."""
    cfg = load_recipe(ATOLL_TINY_DENSE[0], atoll_args(kind)[1:])
    _, loader = build_data(as_dataclass(cfg.data, DataConfig), cfg.run.seed, 0, 1, cfg.model.vocab_size)
    (inputs_BS, targets_BS), = loader.next_step()
    assert torch.equal(inputs_BS[:, 1:], targets_BS[:, :-1])
    return torch.cat([inputs_BS, targets_BS[:, -1:]], dim=1)


@pytest.fixture(scope="module", params=["dense", "moe"])
def engine_run(request):
    """atoll trains and exports; a 2-rank ZeRO-1 engine loads it, trains on and saves;
    DeepSpeed's `ds_to_universal` converts that, and atoll imports the result."""
    kind = request.param
    with tempfile.TemporaryDirectory(prefix="atoll-dsuc-") as tmp:
        tmp = Path(tmp)
        assert main(["train", *atoll_args(kind), "run.steps=4", "checkpoint.interval=4",
                     f"run.dir={tmp / 'atoll'}"]) == 0
        assert main(["ckpt", "export", str(tmp / "atoll"), "--format", "deepspeed-universal",
                     "--out", str(tmp / "export")]) == 0
        state = read_universal(tmp / "export")
        torch.save(first_batch_tokens(kind), tmp / "eval_tokens.pt")
        run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
             "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(SCRIPT),
             str(tmp / "result.pt"), "--load", str(tmp / "export"), "--save", str(tmp / "native"),
             "--steps", "2", "--stage", "1", "--experts", str(EXPERTS[kind]),
             "--eval-tokens", str(tmp / "eval_tokens.pt")])
        result = torch.load(tmp / "result.pt", weights_only=True)
        tag = f"global_step{result['trained']['global_steps']}"
        run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
             "--input_folder", str(tmp / "native" / tag),
             "--output_folder", str(tmp / "native" / f"{tag}_universal"),
             "--num_extract_workers", "1", "--num_merge_workers", "1"])
        yield kind, state, result, tmp, tag


@pytest.mark.slow
def test_export_loads_into_deepspeed_engine(engine_run):
    kind, state, result, tmp, _ = engine_run
    manifest = verify(resolve_checkpoint(tmp / "atoll"))
    trained = read_tensors(resolve_checkpoint(tmp / "atoll"), manifest["tensors"])
    loaded = result["loaded"]
    assert loaded["world_size"] == 2
    # Not vacuous: the engine started from other weights, and the moments are non-trivial.
    assert not torch.equal(build_model(seed=1).output.weight, state.params["output.weight"])
    if kind == "moe":
        experts = [n for n in state.params if ".experts." in n]
        assert len(experts) == 6 and all(state.params[n].shape[0] == 4 for n in experts)
        assert all(state.tags[n] == {"is_expert_param": True, "ep_num_experts": 4} for n in experts)
        assert set(state.buffers) == {f"layers.{i}.feed_forward.router.expert_bias_E" for i in (0, 1)}
        for name, value in state.buffers.items():
            assert torch.equal(value, trained[f"model.{name}"]), name
    assert_same_tensors(loaded["buffers"], state.buffers)
    assert state.step == 4 and all(t.abs().sum() > 0 for t in state.exp_avg_sq.values())
    for name, value in state.params.items():  # the export is atoll's trained state, exactly
        assert torch.equal(value, trained[f"model.{name}"]), name
        assert torch.equal(state.exp_avg[name], trained[f"optim.state.{name}.exp_avg"]), name
    assert_same_tensors(loaded["module"], state.params)
    assert_same_tensors(loaded["fp32"], state.params)
    assert_same_tensors(loaded["exp_avg"], state.exp_avg)
    assert_same_tensors(loaded["exp_avg_sq"], state.exp_avg_sq)
    assert loaded["steps"] == [float(state.step)] * 2
    assert [g["lr"] for g in loaded["param_groups"]] == [g["lr"] for g in state.param_groups]
    assert [g["weight_decay"] for g in loaded["param_groups"]] == [0.1, 0.0]


@pytest.mark.slow
def test_deepspeed_checkpoint_imports_and_resumes(engine_run):
    kind, state, result, tmp, tag = engine_run
    trained = result["trained"]
    native = tmp / "native"
    got = read_universal(native / f"{tag}_universal")
    assert_same_tensors(got.params, trained["fp32"])
    assert_same_tensors(got.exp_avg, trained["exp_avg"])
    assert_same_tensors(got.exp_avg_sq, trained["exp_avg_sq"])
    assert [float(got.step)] * 2 == trained["steps"] == [float(state.step + 2)] * 2

    assert main(["ckpt", "import", str(native / f"{tag}_universal"), "--format",
                 "deepspeed-universal", "--out", str(tmp / "imported")]) == 0
    imported = resolve_checkpoint(tmp / "imported")
    tensors = read_tensors(imported, verify(imported)["tensors"])
    for name in got.params:
        assert torch.equal(tensors[f"model.{name}"], trained["fp32"][name]), name
        assert torch.equal(tensors[f"optim.state.{name}.exp_avg_sq"], trained["exp_avg_sq"][name])
    assert_same_tensors(got.buffers, trained["buffers"])
    for name, value in trained["buffers"].items():
        assert torch.equal(tensors[f"model.{name}"], value), name

    # atoll resumes from it: the next step is DeepSpeed's step + 1, and training goes on.
    resumed = tmp / "resumed"
    assert main(["train", *atoll_args(kind), "run.steps=9", "checkpoint.interval=3",
                 f"checkpoint.resume={imported}",
                 f"run.dir={resumed}"]) == 0
    records = read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in records] == [7, 8, 9]
    # Step 7 is DeepSpeed's trained weights on the run's first batch (the data starts over):
    # its loss is the one the engine itself computed on those tokens.
    assert records[0]["loss"] == pytest.approx(trained["eval_loss"], rel=1e-5)
    # Not a value other weights give: the engine's fresh start, atoll's weights before the 2 steps.
    tokens = torch.load(tmp / "eval_tokens.pt", weights_only=True)
    exported = build_model(seed=1, experts=EXPERTS[kind])
    exported.load_state_dict({**state.params, **state.buffers})
    with torch.no_grad():
        for model in (build_model(seed=1, experts=EXPERTS[kind]), exported):
            assert abs(loss_fn(model, tokens).item() - trained["eval_loss"]) > 1e-4
    final = resolve_checkpoint(resumed)
    assert verify(final)["step"] == 9
