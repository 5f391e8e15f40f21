#!/usr/bin/env python3
"""prefopt's LoRA adapters against PEFT on a real checkpoint (or any local Llama-family folder).

    python scripts/make_real_model.py     # once: builds the model folder
    cargo build --release
    python scripts/check_lora.py [--model DIR] [--prefopt BIN] [--out DIR]

What it checks:
1. `prefopt train` with `use_peft = true` (r 16, alpha 32, every linear layer, 3 DPO steps
   on chat pairs) writes `final/` as a PEFT adapter folder, and
   `PeftModel.from_pretrained(base, final)` loads it: its log-probs (float32 and float64)
   against `prefopt score --adapter final` on chat and long (400+ token) data.
2. `prefopt merge` folds the adapter into a plain folder that `transformers` loads without
   PEFT, with the log-probs of `prefopt score` on it and of base + adapter under PEFT.
3. A stack of that adapter twice (coefficients 1.3 and -0.5, as the APO loop's stacks weigh
   adapters) written as one adapter by `prefopt merge --as-adapter` (concatenated, rank 32):
   PEFT on base + that adapter against transformers on the stack's `prefopt merge` folder.
4. The 3-step DPO trajectory itself (loss, grad norm) against plain torch + PEFT from the
   same fresh adapter (prefopt's seeded initialization, written by a 1-step run at learning
   rate 1e-30: B moves from 0 to +-1e-30) with the adapter disabled as the reference, in
   float32 and float64. Dropout is 0 here, so both sides run the same network.

Writes `<out>/lora_check.json` and prints a markdown table (docs/lora.md holds the recorded
one). Not run in CI (it needs Python and the model folder).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_real_model import (  # noqa: E402
    check_arguments,
    datasets,
    load,
    prefopt,
    prefopt_scores,
    read_jsonl,
    reference_logps,
    write_jsonl,
)
from make_fixtures import tokenize_example  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LR, BETA, STEPS = 1e-3, 0.1, 3


def peft_model(base: Path, adapter: Path, dtype, trainable: bool = False):
    model = PeftModel.from_pretrained(load(base, torch.float32), str(adapter), is_trainable=trainable)
    return model.to(dtype)


def max_diff(got: list[dict], want: list[dict]) -> float:
    return max(abs(g[f"logp_{s}"] - w[s]) for g, w in zip(got, want) for s in ("chosen", "rejected"))


def max_diff_ref(a: list[dict], b: list[dict]) -> float:
    return max(abs(x[s] - y[s]) for x, y in zip(a, b) for s in ("chosen", "rejected"))


def train_config(path: Path, model: Path, data: Path, out: Path, steps: int, pairs: int) -> None:
    path.write_text(
        f'model = "{model}"\ntrain_data = "{data}"\noutput_dir = "{out}"\nloss_type = "sigmoid"\n'
        f"beta = {BETA}\nlearning_rate = {LR}\nlr_scheduler_type = \"constant\"\nmax_grad_norm = 0.0\n"
        f"batch_size = {pairs}\nmax_steps = {steps}\nlogging_steps = 1\nsave_steps = 0\nmax_length = 1024\n"
        "max_prompt_length = 1024\nuse_peft = true\nlora_r = 16\nlora_alpha = 32\nlora_dropout = 0.0\n"
        'lora_target_modules = "all-linear"\n'
    )


def check_trajectory(binary: Path, model_dir: Path, tok, work: Path) -> dict:
    """3 full-batch DPO steps with a fresh adapter, prefopt vs torch + PEFT."""
    rows = datasets()["chat"][:4]
    data = work / "dpo.jsonl"
    write_jsonl(data, rows)
    # The starting adapter: prefopt's fresh init (A Kaiming-uniform from the seed, B zero),
    # as a 1-step run at learning rate 0 writes it.
    start = work / "lora-start"
    if start.exists():
        shutil.rmtree(start)
    config = work / "lora-start.toml"
    train_config(config, model_dir, data, start, 1, len(rows))
    prefopt(binary, "train", "--config", str(config), "--set", "learning_rate=1e-30")
    out = work / "lora-dpo"
    if out.exists():
        shutil.rmtree(out)
    config = work / "lora-dpo.toml"
    train_config(config, model_dir, data, out, STEPS, len(rows))
    prefopt(binary, "train", "--config", str(config))
    got = [line for line in read_jsonl(out / "metrics.jsonl") if "loss" in line]

    toks = [tokenize_example(tok, ex) for ex in rows]

    def torch_run(dtype):
        policy = peft_model(model_dir, start / "final", dtype, trainable=True)
        policy.train()
        params = [p for p in policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=False)

        def logps(model):
            lw, ll = [], []
            for t in toks:
                for ids, s, acc in ((t["chosen_ids"], t["a"], lw), (t["rejected_ids"], t["b"], ll)):
                    logits = model(input_ids=torch.tensor([ids])).logits[0]
                    lp = torch.log_softmax(logits, dim=-1)[s - 1 : len(ids) - 1]
                    acc.append(lp.gather(1, torch.tensor(ids[s:]).unsqueeze(1)).sum())
            return torch.stack(lw), torch.stack(ll)

        with torch.no_grad(), policy.disable_adapter():
            rw, rl = logps(policy)
        steps = []
        for _ in range(STEPS):
            opt.zero_grad(set_to_none=True)
            lw, ll = logps(policy)
            loss = -torch.nn.functional.logsigmoid(BETA * ((lw - rw) - (ll - rl))).mean()
            loss.backward()
            norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))
            steps.append({"loss": float(loss.detach()), "grad_norm": norm})
            opt.step()
        return steps

    f32, f64 = torch_run(torch.float32), torch_run(torch.float64)
    rel = lambda a, b: abs(a - b) / abs(b)  # noqa: E731
    steps = [
        {
            "step": g["step"],
            "loss": g["loss"],
            "torch_f32_loss": w["loss"],
            "torch_f64_loss": x["loss"],
            "grad_norm": g["grad_norm"],
            "torch_f32_grad_norm": w["grad_norm"],
            "torch_f64_grad_norm": x["grad_norm"],
            "prefopt_grad_norm_vs_f64": rel(g["grad_norm"], x["grad_norm"]),
            "torch_f32_grad_norm_vs_f64": rel(w["grad_norm"], x["grad_norm"]),
        }
        for g, w, x in zip(got, f32, f64)
    ]
    return {"pairs": len(rows), "steps": steps, "final_dir": str(out / "final")}


def check_loading(binary: Path, model_dir: Path, adapter: Path, work: Path) -> dict:
    results = {}
    merged = work / "lora-merged"
    if merged.exists():
        shutil.rmtree(merged)
    prefopt(binary, "merge", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(merged))
    tok = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    p32, p64 = peft_model(model_dir, adapter, torch.float32).eval(), peft_model(model_dir, adapter, torch.float64).eval()
    m32 = load(merged, torch.float32)
    base32 = load(model_dir, torch.float32)
    positions = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings", 0)
    # The long data needs ~1600 positions (the tiny fixtures have 256).
    for kind in ("chat", "long") if positions >= 2048 else ("chat", "plain"):
        rows = datasets()[kind]
        path = work / f"lora-{kind}.jsonl"
        write_jsonl(path, rows)
        ours = prefopt_scores(binary, model_dir, path, work / f"lora-{kind}.scores.jsonl", adapter)
        ours_merged = prefopt_scores(binary, merged, path, work / f"lora-{kind}.merged.scores.jsonl")
        want64, want32 = reference_logps(p64, tok, rows), reference_logps(p32, tok, rows)
        merged_tf = reference_logps(m32, tok, rows)
        base = reference_logps(base32, tok, rows)
        results[kind] = {
            "sequences": 2 * len(rows),
            "prefopt_adapter_vs_peft_f64": max_diff(ours, want64),
            "peft_f32_vs_f64": max_diff_ref(want32, want64),
            "prefopt_merged_vs_transformers_on_merged": max_diff(ours_merged, merged_tf),
            "transformers_merged_vs_peft_f64": max_diff_ref(merged_tf, want64),
            "adapter_moves_logps_by": max_diff_ref(want64, base),
        }
        print(f"  {kind}: {results[kind]}", file=sys.stderr)
    return results


def check_concatenated(binary: Path, model_dir: Path, adapter: Path, work: Path) -> dict:
    stack, one, folded = work / "lora-stack", work / "lora-one", work / "lora-folded"
    for d in (stack, one, folded):
        if d.exists():
            shutil.rmtree(d)
    stack.mkdir()
    entries = [{"adapter": str(adapter.resolve()), "coefficient": c} for c in (1.3, -0.5)]
    (stack / "adapter_stack.json").write_text(json.dumps({"base_model": str(model_dir.resolve()), "adapters": entries}))
    prefopt(binary, "merge", "--model", str(stack), "--out", str(one), "--as-adapter")
    prefopt(binary, "merge", "--model", str(stack), "--out", str(folded))
    tok = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    rows = datasets()["chat"]
    concatenated = reference_logps(peft_model(model_dir, one, torch.float64).eval(), tok, rows)
    merged = reference_logps(load(folded, torch.float64), tok, rows)
    return {
        "rank": json.loads((one / "adapter_config.json").read_text())["r"],
        "sequences": 2 * len(rows),
        "peft_concatenated_vs_transformers_merged_stack": max_diff_ref(concatenated, merged),
    }


def markdown(results: dict) -> str:
    lines = [
        "| data | sequences | prefopt `score --adapter` vs PEFT-f64 | PEFT-f32 vs f64 | `prefopt merge` folder: prefopt vs transformers | transformers on merged vs PEFT-f64 | adapter's effect (max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, r in results["loading"].items():
        lines.append(
            f"| {kind} | {r['sequences']} | {r['prefopt_adapter_vs_peft_f64']:.1e} | {r['peft_f32_vs_f64']:.1e} | "
            f"{r['prefopt_merged_vs_transformers_on_merged']:.1e} | {r['transformers_merged_vs_peft_f64']:.1e} | "
            f"{r['adapter_moves_logps_by']:.2f} |"
        )
    lines += [
        "",
        "| LoRA DPO step | loss | torch+PEFT f32 | torch+PEFT f64 | grad norm | torch+PEFT f32 | f64 | prefopt vs f64 (rel.) | torch-f32 vs f64 (rel.) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in results["trajectory"]["steps"]:
        lines.append(
            f"| {s['step']} | {s['loss']:.6f} | {s['torch_f32_loss']:.6f} | {s['torch_f64_loss']:.6f} | "
            f"{s['grad_norm']:.5f} | {s['torch_f32_grad_norm']:.5f} | {s['torch_f64_grad_norm']:.5f} | "
            f"{s['prefopt_grad_norm_vs_f64']:.1e} | {s['torch_f32_grad_norm_vs_f64']:.1e} |"
        )
    return "\n".join(lines)


def main() -> int:
    args = check_arguments(__doc__.split("\n")[0], "out/lora-check")
    tok = PreTrainedTokenizerFast.from_pretrained(str(args.model))
    started = time.time()
    results = {"model": str(args.model), "torch": torch.__version__}
    print("LoRA DPO trajectory ...", file=sys.stderr)
    results["trajectory"] = check_trajectory(args.prefopt, args.model, tok, args.out)
    print("PEFT and transformers loading prefopt's adapter and merge ...", file=sys.stderr)
    results["loading"] = check_loading(args.prefopt, args.model, Path(results["trajectory"]["final_dir"]), args.out)
    print("A stack written as one adapter (merge --as-adapter) under PEFT ...", file=sys.stderr)
    results["concatenated"] = check_concatenated(
        args.prefopt, args.model, Path(results["trajectory"]["final_dir"]), args.out
    )
    print(f"  {results['concatenated']}", file=sys.stderr)
    results["seconds"] = time.time() - started
    (args.out / "lora_check.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    ok = all(r["prefopt_adapter_vs_peft_f64"] <= max(2 * r["peft_f32_vs_f64"], 1e-4) for r in results["loading"].values())
    # The merged folder holds float32 weights; the concatenated adapter f32 A and B.
    ok = ok and results["concatenated"]["peft_concatenated_vs_transformers_merged_stack"] <= 1e-3
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
