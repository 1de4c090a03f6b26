"""Hugging Face round trip: atoll exports that transformers loads, transformers models atoll imports.

Every check runs transformers itself (AutoModelForCausalLM.from_pretrained on
the exported folder, save_pretrained for the imported one) and compares
logits (fp32, max abs difference ≤ 1e-5) and greedy generation (identical
tokens) with atoll's model on the same tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from atoll.checkpoint.hf import architecture_for
from atoll.checkpoint.manifest import CheckpointError
from atoll.checkpoint.store import resolve_checkpoint
from atoll.checkpoint.tools import import_hf, load_model_and_moments
from atoll.launch.cli import main
from atoll.trainer.config import model_config, recipe_from_dict
from atoll.trainer.metrics import read_jsonl
from atoll.trainer.model import Transformer, greedy_generate
from conftest import TINY_MOE, events, run_cli, word_level_tokenizer

transformers = pytest.importorskip("transformers")

LOCAL = [*TINY_MOE, "launch.backend=local", "parallel.dp=1", "checkpoint.interval=3", "run.steps=3",
         "checkpoint.memory_interval=0", "optim.lr=0.01"]
ARCHITECTURES = {
    "LlamaForCausalLM": ["model.moe.num_experts=0", "model.kv_heads=2", "model.tie_embeddings=true"],
    "MixtralForCausalLM": ["model.kv_heads=2"],
    "Qwen2MoeForCausalLM": ["model.moe.shared_expert=true", "model.moe.renormalize=false"],
    "Glm4MoeForCausalLM": ["model.moe.score_func=sigmoid", "model.moe.balance=aux_free",
                           "model.moe.bias_update_rate=0.05", "model.moe.shared_expert=true"],
}


def cli(*args: str) -> int:
    saved_env = dict(os.environ)  # an in-process run sets MASTER_ADDR/PORT for its 1-rank group
    try:
        return main(list(args))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_env)


def atoll_model(ckpt: Path) -> Transformer:
    """The checkpoint's model (global names, any layout) as a single-device Transformer."""
    manifest, tensors, _ = load_model_and_moments(resolve_checkpoint(ckpt))
    model = Transformer(model_config(recipe_from_dict(manifest["recipe"])))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    return model.eval()


def hf_model(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def assert_same_function(ours: Transformer, theirs, vocab: int = 256) -> None:
    tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        difference = (ours(tokens)[0] - theirs(tokens).logits).abs().max().item()
    assert difference <= 1e-5, difference
    prompt = tokens[:, :6]
    generated = theirs.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0,
                                attention_mask=torch.ones_like(prompt))
    assert torch.equal(generated, greedy_generate(ours, prompt, 10))


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_export_loads_in_transformers_and_computes_the_same(architecture, tmp_path):
    run = tmp_path / "run"
    assert cli("train", *LOCAL, *ARCHITECTURES[architecture], f"run.dir={run}") == 0
    out = tmp_path / "hf"
    assert cli("ckpt", "export", str(run), "--format", "hf", "--out", str(out)) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture]
    assert (out / "generation_config.json").exists()
    ours = atoll_model(run)
    if architecture == "Glm4MoeForCausalLM":  # the trained selection bias crosses over
        assert ours.layers["0"].feed_forward.router.expert_bias_E.abs().sum() > 0
    assert_same_function(ours, hf_model(out))


def test_large_exports_are_sharded_with_an_index(tmp_path):
    run = tmp_path / "run"
    assert cli("train", *LOCAL, f"run.dir={run}") == 0
    out = tmp_path / "hf"
    assert cli("ckpt", "export", str(run), "--format", "hf", "--out", str(out), "--max-shard-mb", "0.1") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert not (out / "model.safetensors").exists()
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {"0o644"}
    assert_same_function(atoll_model(run), hf_model(out))


@pytest.mark.parametrize("key, value", [("capacity_factor", 1.25), ("groups", 2)])
def test_options_without_an_equivalent_name_their_key(key, value):
    model = {"moe": {"num_experts": 4, "top_k": 2, key: value}}
    with pytest.raises(CheckpointError, match=f"^model.moe.{key}={value} has no transformers equivalent"):
        architecture_for(model)
    with pytest.raises(CheckpointError, match="^model.moe.balance=aux_free with score_func=softmax"):
        architecture_for({"moe": {"num_experts": 4, "top_k": 2, "balance": "aux_free"}})


def tiny_mixtral(folder: Path, **overrides) -> Path:
    config = transformers.MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=512, **overrides)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_imported_mixtral_fine_tunes_under_dp_and_ep_and_goes_back(tmp_path, capsys):
    """A random Mixtral from transformers: imported logits equal transformers'; fine-tuned from
    step 0 under dp=2 × ep=2 (the weights only: fresh optimizer); exported again it loads in
    transformers and computes what atoll's fine-tuned model computes."""
    source = tiny_mixtral(tmp_path / "mixtral")
    assert cli("ckpt", "import", str(source), "--format", "hf", "--out", str(tmp_path / "imported")) == 0
    printed = capsys.readouterr().out
    ckpt = resolve_checkpoint(tmp_path / "imported")
    overrides = printed.split("train it with: atoll train RECIPE ")[1].split()
    assert overrides[0] == f"checkpoint.resume={ckpt}" and "model.kv_heads=2" in overrides
    imported = atoll_model(ckpt)
    assert_same_function(imported, hf_model(source))

    # The recipe's own model is another one: one line with the overrides it needs.
    capsys.readouterr()
    assert cli("train", *LOCAL, f"run.dir={tmp_path / 'wrong'}", f"checkpoint.resume={ckpt}") != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "holds another model; train it with" in error[0], error
    assert "model.kv_heads=2" in error[0] and "model.rope_theta=1000000.0" in error[0]

    # Fine-tuning data: a folder of text and a local tokenizer (the two ranks tokenise it once).
    words = [f"w{i}" for i in range(200)]
    tokenizer = word_level_tokenizer(tmp_path / "tokenizer", words)
    texts = tmp_path / "texts"
    texts.mkdir()
    generator = torch.Generator().manual_seed(0)
    for k in range(3):
        picks = torch.randint(0, len(words), (3000,), generator=generator).tolist()
        (texts / f"{k}.txt").write_text(" ".join(words[i] for i in picks))
    run = tmp_path / "finetune"
    proc = run_cli(["train", *TINY_MOE, *overrides, "parallel.dp=2", "parallel.ep=2", "run.steps=4",
                    "checkpoint.interval=4", "optim.lr=0.01", f"run.dir={run}", "data.source=text",
                    f"data.path={texts}", f"data.tokenizer={tokenizer}"], torchrun_procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("MB in 3 pieces") == 1 and len(list((run / "data").glob("tokens-*"))) == 1
    assert [e["source"] for e in events(run, "resume")] == ["weights"]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4]
    tuned = atoll_model(run)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), imported.parameters()))
    # Under pipeline parallelism each stage takes its own layers' weights.
    staged = run_cli(["train", *TINY_MOE, *overrides, "parallel.pp=2", "parallel.dp=1", "run.steps=1", "checkpoint.interval=1",
                      "optim.lr=1e-30", "optim.warmup_steps=0", f"run.dir={tmp_path / 'staged'}"], torchrun_procs=2)
    assert staged.returncode == 0, staged.stderr[-3000:]
    assert all(torch.equal(a, b) for a, b in zip(atoll_model(tmp_path / "staged").parameters(),
                                                 imported.parameters()))

    out = tmp_path / "back"
    assert cli("ckpt", "export", str(run), "--format", "hf", "--out", str(out)) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    assert_same_function(tuned, hf_model(out))


def test_import_refuses_what_atoll_cannot_represent(tmp_path):
    with pytest.raises(CheckpointError, match="^MixtralForCausalLM with a sliding attention window"):
        import_hf(tiny_mixtral(tmp_path / "windowed", sliding_window=16), tmp_path / "out")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
        import_hf(pickled, tmp_path / "out")


@pytest.mark.slow
def test_tied_grouped_query_model_trains_under_fsdp_like_one_process(tmp_path):
    """Tied embeddings and kv_heads < heads under FSDP dp=2 follow one process with
    grad_accum=2, and the result still exports to the Llama that computes it."""
    dense = [*ARCHITECTURES["LlamaForCausalLM"], "run.steps=4", "checkpoint.interval=4", "optim.lr=0.01",
             "checkpoint.memory_interval=0"]
    sharded = run_cli(["train", *TINY_MOE, *dense, "parallel.dp=2", f"run.dir={tmp_path / 'fsdp'}"],
                      torchrun_procs=2)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert cli("train", *LOCAL, *dense, "data.grad_accum=2", f"run.dir={tmp_path / 'one'}") == 0
    losses = lambda run: [r["loss"] for r in read_jsonl(tmp_path / run / "metrics.jsonl")]
    assert losses("fsdp") == pytest.approx(losses("one"), rel=1e-5, abs=1e-6)
    ours = atoll_model(tmp_path / "fsdp")
    assert ours.output.weight is ours.tok_embeddings.weight
    out = tmp_path / "hf"
    assert cli("ckpt", "export", str(tmp_path / "fsdp"), "--format", "hf", "--out", str(out)) == 0
    assert_same_function(ours, hf_model(out))


# ---------------------------------------------------------------- the tokenizer of an export

# Text whose bytes cover ASCII, control bytes, whitespace runs, 2-, 3- and 4-byte UTF-8, and the
# characters the byte-level alphabet itself uses ("Ā" stands for byte 0, "Ġ" for the space).
AWKWARD_TEXTS = ["def naïve(x):\n\treturn x  # ok\r\n", " leading and trailing ", "\x00\x01\x7f",
                 "Ā Ġ ĉ ÿ ¡", "日本語のテキスト", "emoji 🙂🚀 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "€" * 5]


def random_text(seed: int, length: int = 400) -> str:
    """Code points from every UTF-8 length (surrogates excluded: not encodable)."""
    generator = torch.Generator().manual_seed(seed)
    ranges = [(0, 0x80), (0x80, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x110000)]
    picks = torch.randint(0, len(ranges), (length,), generator=generator).tolist()
    return "".join(chr(int(torch.randint(*ranges[r], (1,), generator=generator))) for r in picks)


def test_byte_tokenizer_gives_exactly_the_ids_atoll_trains_on(tmp_path):
    """The exported byte-level tokenizer, as the tokenizers library and transformers load it,
    encodes any text to the ids atoll's byte sources read from a file (its UTF-8 bytes) and
    decodes them back to the same text."""
    from atoll.checkpoint.hf_tokenizer import write_tokenizer
    from atoll.trainer.config import DataConfig
    from atoll.trainer.data import SEPARATOR, load_tokens

    out = tmp_path / "hf"
    out.mkdir()
    assert write_tokenizer(out, {"source": "folder"}, 4096).startswith("tokenizer: byte-level")
    ours = __import__("tokenizers").Tokenizer.from_file(str(out / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert sorted(ours.get_vocab().values()) == list(range(256)) and len(theirs) == 256
    texts = AWKWARD_TEXTS + [random_text(seed) for seed in range(3)]
    for k, text in enumerate(texts):
        folder = tmp_path / f"data{k}"
        folder.mkdir()
        (folder / "doc.txt").write_text(text, encoding="utf-8")
        trained_on = load_tokens(DataConfig(source="folder", path=str(folder))).tolist()
        assert trained_on[-1] == SEPARATOR  # atoll appends it after every file
        expected = trained_on[:-1]
        assert expected == list(text.encode("utf-8"))
        assert ours.encode(text).ids == expected, text
        assert theirs(text)["input_ids"] == expected, text
        assert ours.decode(expected) == theirs.decode(expected) == text
    assert ours.encode("").ids == [] and theirs("")["input_ids"] == []
    every_byte = list(range(256))  # one token per byte value, whatever the text around it
    assert ours.encode(bytes(every_byte[:128]).decode("ascii")).ids == every_byte[:128]
    assert {ours.token_to_id(ours.id_to_token(b)) for b in every_byte} == set(every_byte)


def test_exported_folder_generates_in_a_pipeline_without_atoll(tmp_path):
    """A byte-level run (vocab 300 > 256 bytes) exported to a folder of 0644 files that
    transformers' text-generation pipeline uses in a Python that cannot import atoll, and
    that continues a prompt with atoll's own greedy tokens."""
    import subprocess
    import sys
    import sysconfig

    from atoll.trainer.inference import generate, load_model

    run = tmp_path / "run"
    assert cli("train", *LOCAL, "model.vocab_size=300", f"run.dir={run}") == 0
    out = tmp_path / "hf"
    assert cli("ckpt", "export", str(run), "--format", "hf", "--out", str(out)) == 0
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {n: "0o644" for n in names}

    # -I: no PYTHONPATH, user site or script folder; -S: no .pth files, so not the editable install's.
    script = (
        "import importlib.util, json, sys\n"
        "sys.path.append(sys.argv[1])\n"
        "assert importlib.util.find_spec('atoll') is None\n"
        "try:\n    import atoll.trainer\nexcept ModuleNotFoundError:\n    pass\n"
        "else:\n    raise SystemExit('atoll is importable')\n"
        "from transformers import pipeline\n"
        "generator = pipeline('text-generation', model=sys.argv[2])\n"
        "result = generator(sys.argv[3], max_new_tokens=8, do_sample=False, return_tensors=True)\n"
        "print(json.dumps([int(i) for i in result[0]['generated_token_ids']]))\n")
    site_packages = sysconfig.get_paths()["purelib"]
    control = subprocess.run([sys.executable, "-I", "-c", "import atoll.trainer"], cwd=tmp_path)
    assert control.returncode == 0  # the same interpreter with its site-packages set up does import it
    prompt = "def naïve(x):\n    return 'ü"
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", script, site_packages, str(out), prompt],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = json.loads(proc.stdout.strip().splitlines()[-1])
    prompt_ids = list(prompt.encode("utf-8"))
    assert ids[:len(prompt_ids)] == prompt_ids and len(ids) == len(prompt_ids) + 8
    assert ids == generate(load_model(run), prompt_ids, 8)


@pytest.mark.parametrize("source", ["text", "tokens"])
def test_export_of_a_tokenised_run_copies_its_tokenizer_or_says_it_has_none(source, tmp_path, capsys):
    """data.source=text: the training tokenizer's files go along and transformers encodes
    as training did, whatever the architecture; data.source=tokens: no tokenizer file, one line saying so."""
    import numpy as np

    words = [f"w{i}" for i in range(100)]
    tokenizer = word_level_tokenizer(tmp_path / "tokenizer", words)
    picks = torch.randint(0, len(words), (4000,), generator=torch.Generator().manual_seed(0)).tolist()
    text = " ".join(words[i] for i in picks)
    if source == "text":
        (tmp_path / "texts").mkdir()
        (tmp_path / "texts" / "a.txt").write_text(text)
        data = [f"data.path={tmp_path / 'texts'}", f"data.tokenizer={tokenizer}"]
    else:
        np.asarray([i + 2 for i in picks], dtype=np.uint16).tofile(tmp_path / "tokens.uint16")
        data = [f"data.path={tmp_path / 'tokens.uint16'}"]
    run = tmp_path / "run"
    # Qwen2Moe: left to itself, transformers would give this tokenizer.json Qwen2's own rules
    qwen2_moe = ARCHITECTURES["Qwen2MoeForCausalLM"]
    assert cli("train", *LOCAL, *qwen2_moe, f"data.source={source}", *data, f"run.dir={run}") == 0
    capsys.readouterr()
    out = tmp_path / "hf"
    assert cli("ckpt", "export", str(run), "--format", "hf", "--out", str(out)) == 0
    printed = capsys.readouterr().out.splitlines()
    assert (out / "model.safetensors").exists()
    if source == "tokens":
        assert [line for line in printed if "tokenizer" in line] == [
            "no tokenizer written: data.source=tokens holds ids of a tokenizer the checkpoint does not name; "
            "copy its files into the folder to use it with a pipeline"]
        assert not (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists()
        return
    assert printed[0].startswith("tokenizer: copied from ") and \
        printed[0].endswith("(tokenizer.json, tokenizer_config.json)")
    assert (out / "tokenizer.json").read_bytes() == (tokenizer / "tokenizer.json").read_bytes()
    assert json.loads((tokenizer / "tokenizer_config.json").read_text()) == {"eos_token": "</s>"}  # untouched
    loaded = transformers.AutoTokenizer.from_pretrained(out)
    training = __import__("tokenizers").Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    sample = text[:300]
    assert loaded(sample, add_special_tokens=False)["input_ids"] == training.encode(sample).ids
    assert loaded.eos_token == "</s>" and loaded.eos_token_id == 1
    assert oct((out / "tokenizer_config.json").stat().st_mode & 0o777) == "0o644"
