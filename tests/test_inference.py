"""A checkpoint used from Python: `load_model` under any layout it was saved with, and `generate`.

The reference is the hf export loaded by transformers: load_model's logits must
equal it (fp32, max abs difference ≤ 1e-5) and its greedy tokens must be
transformers' greedy tokens, for a one-process run, a dp=2 × ep=2 FSDP run and
DiLoCo islands (whose model is the islands' global parameters).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from atoll.checkpoint.dcp_io import read_tensors
from atoll.checkpoint.manifest import read_manifest
from atoll.checkpoint.checkpointer import island_dir
from atoll.checkpoint.store import resolve_checkpoint
from atoll.trainer.inference import generate, load_model, load_tokenizer
from atoll.trainer.model import greedy_generate
from conftest import TINY_MOE, run_cli
from test_hf import LOCAL, cli, hf_model

transformers = pytest.importorskip("transformers")

PROMPT_BS = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(5))


def assert_matches_the_transformers_export(run: Path, tmp_path: Path):
    """load_model(run) computes what the exported folder computes in transformers; returns it."""
    out = tmp_path / "hf"
    assert cli("ckpt", "export", str(run), "--format", "hf", "--out", str(out)) == 0
    ours, theirs = load_model(run), hf_model(out)
    tokens_BS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(tokens_BS)[0] - theirs(tokens_BS).logits).abs().max().item() <= 1e-5
    expected = theirs.generate(PROMPT_BS, max_new_tokens=10, do_sample=False, pad_token_id=0,
                               attention_mask=torch.ones_like(PROMPT_BS))
    assert torch.equal(generate(ours, PROMPT_BS, 10), expected)
    assert generate(ours, PROMPT_BS[1].tolist(), 10) == expected[1].tolist()
    return ours


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("inference") / "run"
    assert cli("train", *LOCAL, "model.vocab_size=300", f"run.dir={run}") == 0
    return run


def test_load_model_from_any_folder_computes_what_transformers_does(trained, tmp_path):
    model = assert_matches_the_transformers_export(trained, tmp_path)
    assert not model.training and model.cfg.vocab_size == 300
    step = resolve_checkpoint(trained)
    for path in (str(step), step.parent):  # a step folder, a checkpoints folder, a run folder
        other = load_model(path)
        assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    saved = read_tensors(step, read_manifest(step)["tensors"], ["model.layers.1.feed_forward.experts.w2"])
    assert torch.equal(model.layers["1"].feed_forward.experts.w2, saved["model.layers.1.feed_forward.experts.w2"])


def test_generate_greedy_and_seeded_sampling(trained):
    model = load_model(trained)
    assert torch.equal(generate(model, PROMPT_BS, 6), greedy_generate(model, PROMPT_BS, 6))
    prompt = PROMPT_BS[0].tolist()
    sampled = generate(model, prompt, 12, temperature=2.0, seed=1)
    assert sampled == generate(model, prompt, 12, temperature=2.0, seed=1)  # the seed fixes the draw
    assert sampled != generate(model, prompt, 12, temperature=2.0, seed=2)
    assert sampled[:8] == prompt and len(sampled) == 20
    # top_k=1 leaves the argmax alone: greedy whatever the temperature and seed
    assert generate(model, prompt, 12, temperature=3.0, top_k=1, seed=4) == generate(model, prompt, 12)
    # top_k=3: every sampled token is among the 3 likeliest after its prefix
    tokens = generate(model, prompt, 8, temperature=5.0, top_k=3, seed=0)
    with torch.no_grad():
        logits_SV = model(torch.tensor([tokens]))[0][0]
    for position in range(8, len(tokens)):
        assert tokens[position] in logits_SV[position - 1].topk(3).indices.tolist()
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(model, prompt, 1, temperature=-1.0)


def test_generate_from_text_with_the_checkpoint_tokenizer(trained):
    model, tokenizer = load_model(trained), load_tokenizer(trained)
    prompt = "def naïve(x):\n    return 'ü"
    text = generate(model, prompt, 10, tokenizer=tokenizer)
    ids = generate(model, list(prompt.encode("utf-8")), 10)  # byte ids: what atoll trained on
    assert text == bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")  # no text above 255
    assert text.startswith(prompt)
    with pytest.raises(ValueError, match="a text prompt needs the checkpoint's tokenizer"):
        generate(model, prompt, 1)


@pytest.mark.slow
def test_load_model_of_a_dp2_ep2_fsdp_checkpoint(tmp_path):
    run = tmp_path / "sharded"
    proc = run_cli(["train", *TINY_MOE, "parallel.dp=2", "parallel.ep=2", "run.steps=3", "checkpoint.interval=3",
                    "checkpoint.memory_interval=0", "optim.lr=0.01", f"run.dir={run}"], torchrun_procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step = resolve_checkpoint(run)
    assert read_manifest(step)["layout"]["world_size"] == 2 and len(list(step.glob("*.distcp"))) == 2
    assert_matches_the_transformers_export(run, tmp_path)


@pytest.mark.slow
def test_load_model_of_diloco_islands_is_the_global_model(tmp_path):
    """Streaming in 2 fragments, the first layer synced at step 1 and its local copy moved on
    for one more step before the step-2 checkpoint (the last step would land everything); the
    checkpoint's model is the global one, as the hf export writes it."""
    run = tmp_path / "islands"
    proc = run_cli(["train", *TINY_MOE, "parallel.dp=1", "diloco.islands=2", "diloco.inner_steps=2",
                    "diloco.fragments=2", "run.steps=4", "checkpoint.interval=2", "checkpoint.memory_interval=0",
                    "optim.lr=0.01", f"run.dir={run}"], torchrun_procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step = run / "checkpoints" / "step-00000002"
    index = read_manifest(step)["tensors"]
    name = "layers.0.attention.wq.weight"
    saved = read_tensors(island_dir(step, 0), index, [f"model.{name}", f"diloco.global.{name}"])
    assert not torch.equal(saved[f"model.{name}"], saved[f"diloco.global.{name}"])
    model = assert_matches_the_transformers_export(step, tmp_path)
    assert torch.equal(model.layers["0"].attention.wq.weight, saved[f"diloco.global.{name}"])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
