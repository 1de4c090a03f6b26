"""Recipe validation: every malformed recipe is one line naming the key, exit 2."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from atoll.launch.cli import main, split_recipe_args
from atoll.trainer.config import (RecipeError, load_recipe, recipe_from_dict, resolve_recipe_path,
                                  to_dict, to_yaml)

BAD_OVERRIDES = [
    (["model.dimm=64"], "unknown recipe key 'model.dimm'"),
    (["trainer.steps=3"], "unknown recipe key 'trainer'"),
    (["model.dim=abc"], "recipe key 'model.dim' must be an integer, got 'abc'"),
    (["run.steps=1.5"], "recipe key 'run.steps' must be an integer, got '1.5'"),
    (["run.overwrite=maybe"], "recipe key 'run.overwrite' must be true or false, got 'maybe'"),
    (["model.moe.top_k=null"], "recipe key 'model.moe.top_k' must not be null"),
    (["model=3"], "recipe key 'model' must be a section of keys, got '3'"),
    (["model.moe.kernel=fast"], "recipe key 'model.moe.kernel' must be one of auto, naive, sorted, grouped_mm, triton, got 'fast'"),
    (["data.seq_len=0"], "recipe key 'data.seq_len' must be at least 1, got 0"),
    (["optim.lr=-1"], "recipe key 'optim.lr' must be positive, got -1.0"),
    (["parallel.dp=3", "parallel.ep=2"], "parallel.ep=2 must divide parallel.dp=3"),
    (["model.dim=100", "model.heads=3"], "model.dim=100 must be divisible by model.heads=3"),
    (["model.moe.top_k=9"], "model.moe.top_k=9 must not exceed model.moe.num_experts=8"),
    (["launch.backend=local"], "launch.backend=local runs one process, but the layout needs 2 (parallel.dp=2, parallel.pp=1)"),
    (["data.source=folder"], "data.path is required when data.source=folder"),
    (["diloco.quantize=int3"], "recipe key 'diloco.quantize' must be one of none, bf16, int8, int4, got 'int3'"),
    (["diloco.islands=2", "diloco.inner_steps=10", "run.steps=25", "checkpoint.interval=0"],
     "run.steps=25 and run.stop_at=0 must be multiples of diloco.inner_steps=10 (a run ends at an outer step)"),
    (["diloco.islands=2", "diloco.inner_steps=10", "diloco.fragments=3", "run.steps=20", "checkpoint.interval=0"],
     "diloco.fragments=3 must divide diloco.inner_steps=10 (fragments sync on evenly staggered steps)"),
    (["diloco.islands=2", "diloco.inner_steps=10", "diloco.wait_timeout_s=90", "run.steps=20", "checkpoint.interval=0"],
     "fault_tolerance.hang_timeout_s=60 must exceed diloco.wait_timeout_s=90 (islands wait that long for a lost one)"),
    (["diloco.islands=0"], "recipe key 'diloco.islands' must be at least 1, got 0"),
    (["checkpoint.asynch=true"], "unknown recipe key 'checkpoint.asynch'"),
    (["run"], "override 'run' must look like key=value"),
]


@pytest.mark.parametrize("overrides, message", BAD_OVERRIDES)
def test_bad_override_is_one_line_error(overrides, message):
    with pytest.raises(RecipeError) as info:
        load_recipe(None, overrides)
    assert str(info.value) == message


def test_cli_prints_one_line_and_exits_2(capsys):
    assert main(["train", "model.dimm=64"]) == 2
    err = capsys.readouterr().err
    assert err == "atoll: error: unknown recipe key 'model.dimm'\n"


def test_cli_subprocess_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dim: [1, 2\n")  # broken YAML
    proc = subprocess.run([sys.executable, "-m", "atoll.launch", "train", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"atoll: error: cannot parse recipe {bad}")


def test_unknown_key_in_recipe_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run:\n  steps: 5\noptim:\n  learning_rate: 0.1\n")
    with pytest.raises(RecipeError, match=r"^unknown recipe key 'optim.learning_rate'$"):
        load_recipe(str(recipe))


def test_unknown_recipe_name():
    with pytest.raises(RecipeError, match="recipe 'nope' is neither a file nor a shipped recipe"):
        resolve_recipe_path("nope")


def test_overrides_win_and_keyword_key_round_trips():
    cfg = load_recipe("default", ["run.steps=7", "checkpoint.async=false", "parallel.dp_shard=ddp"])
    assert cfg.run.steps == 7 and cfg.parallel.dp_shard == "ddp"
    data = to_dict(cfg)
    assert data["checkpoint"]["async"] is False and "async_" not in data["checkpoint"]
    assert "async: false" in to_yaml(cfg)
    assert recipe_from_dict(data) == cfg


def test_shipped_recipes_validate():
    for name in ("default", "dense_tiny", "moe_1b_8gpu"):
        load_recipe(name)


def test_recipe_and_overrides_split():
    assert split_recipe_args(["dense_tiny", "run.steps=3"]) == ("dense_tiny", ["run.steps=3"])
    assert split_recipe_args(["run.steps=3"]) == (None, ["run.steps=3"])
    assert split_recipe_args([]) == (None, [])


def test_dry_run_prints_resolved_recipe(capsys):
    assert main(["train", "--dry-run", "run.steps=3"]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and "# layout: world=2 (pp=1 × dp=2, ep=1)" in out


def _missing_input(tmp_path, case):
    """Overrides naming a path that is not there (or not what the key needs), and the error."""
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("some text")
    (tmp_path / "no_tokenizer").mkdir()
    missing, texts = tmp_path / "missing", tmp_path / "texts"
    return {
        "folder": (["data.source=folder", f"data.path={missing}"],
                   f"data.path {missing} does not exist"),
        "text-path": (["data.source=text", f"data.path={missing}", f"data.tokenizer={tmp_path}"],
                      f"data.path {missing} does not exist"),
        "text-file": (["data.source=text", f"data.path={texts / 'a.txt'}", f"data.tokenizer={tmp_path}"],
                      f"data.path {texts / 'a.txt'} is not a folder (data.source=text reads every file in it)"),
        "tokens-folder": (["data.source=tokens", f"data.path={texts}"],
                          f"data.path {texts} is not a file (data.source=tokens reads a flat token file)"),
        "tokenizer": (["data.source=text", f"data.path={texts}", f"data.tokenizer={missing}"],
                      f"data.tokenizer {missing} does not exist"),
        "tokenizer-json": (["data.source=text", f"data.path={texts}", f"data.tokenizer={tmp_path / 'no_tokenizer'}"],
                           f"data.tokenizer {tmp_path / 'no_tokenizer'} has no tokenizer.json "
                           "(a local folder as save_pretrained writes it)"),
        "resume": ([f"checkpoint.resume={missing}"], f"checkpoint.resume {missing} does not exist"),
        "resume-empty": ([f"checkpoint.resume={texts}"],
                         f"checkpoint.resume={texts}: no checkpoint at {texts} (no manifest.json, no latest)"),
    }[case]


@pytest.mark.parametrize("mode", ["dry-run", "ray", "torchrun"])
@pytest.mark.parametrize("case", ["folder", "text-path", "text-file", "tokens-folder", "tokenizer",
                                  "tokenizer-json", "resume", "resume-empty"])
def test_missing_input_is_one_line_before_anything_starts(tmp_path, monkeypatch, capsys, case, mode):
    """A path the recipe names that is not there stops the driver (each rank under torchrun)
    at once: one line naming the key and the path, exit 2, no Ray cluster, no worker."""
    import atoll.launch.ray_backend
    import atoll.trainer.train

    def started(*args, **kwargs):
        raise AssertionError("a backend started despite a missing input")

    monkeypatch.setattr(atoll.launch.ray_backend, "run_on_ray", started)
    monkeypatch.setattr(atoll.trainer.train, "train", started)
    if mode == "torchrun":
        for name, value in {"TORCHELASTIC_RUN_ID": "test", "RANK": "1", "WORLD_SIZE": "2",
                            "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
            monkeypatch.setenv(name, value)
    overrides, message = _missing_input(tmp_path, case)
    args = ["train", *overrides, "checkpoint.memory_interval=0", f"run.dir={tmp_path / 'run'}"]
    start = time.monotonic()
    assert main(args[:1] + ["--dry-run"] + args[1:] if mode == "dry-run" else args) == 2
    assert time.monotonic() - start < 1
    assert capsys.readouterr().err == f"atoll: error: {message}\n"
    assert not (tmp_path / "run").exists()
