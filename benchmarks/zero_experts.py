"""Experts that cost nothing: the default run with MoE++ and AdaMoE experts vs a vanilla MoE.

What it measures
    `atoll train` on the default recipe (Ray launcher, 2 workers, its data, its 200
    steps, checkpoints and snapshots as shipped, kernel auto) in three shapes of its
    MoE layers, all at the recipe's dims (dim 128, 4 layers, expert hidden 352):
    - vanilla: 8 FFN experts, top-2 (the recipe as it is);
    - moe++: 8 FFN + 1 zero + 1 copy + 2 constant experts, top-2, gating residual,
      tau 0.75, the two gates renormalised (MoE++'s shape, arXiv 2410.07348);
    - adamoe: 8 FFN + 4 null (zero) experts, top-3, the true experts' gates renormalised
      (renormalize_over=nonzero: AdaMoE's shape, arXiv 2406.13233).
    Per shape: training tokens/s (global) as the tokens of steps 21-200 over their seconds
    (from the metrics rows of steps 20 and 200: every step counts, slow ones too); FFN
    experts run per token (each layer's `ffn_experts_per_token`, mean over the layers and
    the logged steps 20-200); expert FLOPs per token (6 × the parameters of one expert ×
    FFN experts per token, summed over layers: training FLOPs); and the eval loss at step
    200 (the recipe's held-out batches): the same number of tokens for every shape.
    The shapes run one after another in each of --rounds rounds (the first moves on every
    round); the ratios are each shape's median tokens/s over vanilla's.

Targets (issue [12/13]): moe++ >= 1.15x vanilla's tokens/s; moe++ runs <= 1.7 of its 2
FFN experts per token.

Run (from the repository root; about 3 minutes per round on 2 cores):
    python benchmarks/zero_experts.py [--rounds 1] [--steps 200] [key=value ...]
Extra key=value overrides go to every shape. Compare timings only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPES = {
    "vanilla": [],
    "moe++": ["model.moe.zero_experts=1", "model.moe.copy_experts=1", "model.moe.constant_experts=2",
              "model.moe.gating_residual=true", "model.moe.zero_compute_tau=0.75"],
    "adamoe": ["model.moe.zero_experts=4", "model.moe.top_k=3", "model.moe.renormalize_over=nonzero"],
}
DIM, HIDDEN, LAYERS = 128, 352, 4  # the default recipe's model
FIRST_TIMED = 20  # the metrics row whose time starts the window


def run_shape(name: str, steps: int, tmp: Path, overrides: list[str]) -> dict:
    run_dir = tmp / f"{name}-{len(list(tmp.iterdir()))}"
    cmd = [sys.executable, "-m", "atoll.launch", "train", f"run.steps={steps}", f"run.dir={run_dir}",
           *SHAPES[name], *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{name}: atoll train failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {row["step"]: row for row in rows}
    start, end = by_step[FIRST_TIMED], by_step[steps]
    seconds = sum(row["step_time_s"] * (row["step"] - prev) for prev, row in
                  zip([r["step"] for r in rows], rows[1:]) if row["step"] > FIRST_TIMED)
    timed = [row for row in rows if row["step"] >= FIRST_TIMED]
    per_token = statistics.mean(row[key] for row in timed for key in row if key.endswith(".ffn_experts_per_token"))
    return {"tokens_per_s": (end["tokens"] - start["tokens"]) / seconds,
            "ffn_experts_per_token": per_token,
            "expert_gflops_per_token": 6 * 3 * DIM * HIDDEN * per_token * LAYERS / 1e9,
            "eval_loss": end.get("eval_loss"),
            "shares": {key.split(".", 2)[2]: statistics.mean(row[key] for row in timed)
                       for key in timed[-1] if key.startswith("moe.0.share.")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200)
    args, overrides = parser.parse_known_args()
    names = list(SHAPES)
    results: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="atoll-zero-experts-") as tmp:
        for round_index in range(args.rounds):
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for name in order:
                result = run_shape(name, args.steps, Path(tmp), overrides)
                results[name].append(result)
                print(f"round {round_index + 1} {name}: {result['tokens_per_s']:.0f} tokens/s, "
                      f"{result['ffn_experts_per_token']:.2f} FFN experts/token, "
                      f"eval loss {result['eval_loss']}", flush=True)
    base = statistics.median(r["tokens_per_s"] for r in results["vanilla"])
    print(f"\n{'shape':8} {'tokens/s':>9} {'vs vanilla':>10} {'FFN experts/token':>18} "
          f"{'expert GFLOPs/token':>20} {'eval loss':>9}  shares (layer 0)")
    for name in names:
        rate = statistics.median(r["tokens_per_s"] for r in results[name])
        per_token = statistics.median(r["ffn_experts_per_token"] for r in results[name])
        gflops = statistics.median(r["expert_gflops_per_token"] for r in results[name])
        losses = [r["eval_loss"] for r in results[name] if r["eval_loss"] is not None]
        loss = f"{statistics.median(losses):.4f}" if losses else "-"
        shares = ", ".join(f"{k} {v:.2f}" for k, v in results[name][-1]["shares"].items())
        print(f"{name:8} {rate:9.0f} {rate / base:9.3f}x {per_token:18.2f} {gflops:20.4f} {loss:>9}  {shares}")
    moepp = statistics.median(r["tokens_per_s"] for r in results["moe++"]) / base
    per_token = statistics.median(r["ffn_experts_per_token"] for r in results["moe++"])
    print(f"\ntarget moe++ >= 1.15x vanilla: {moepp:.3f}x ({'met' if moepp >= 1.15 else 'not met'}); "
          f"moe++ FFN experts per token <= 1.7: {per_token:.2f} ({'met' if per_token <= 1.7 else 'not met'})")


if __name__ == "__main__":
    main()
