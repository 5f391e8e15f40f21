#!/usr/bin/env python3
"""PEFT-made LoRA adapters on the tiny fixtures, and the numbers PEFT and plain torch compute
with them: the reference for prefopt's LoRA (scoring, training continuing an adapter).

    /work/pyenv/bin/python scripts/make_lora_fixtures.py

Writes (deterministic: fixed seeds, single-threaded CPU math):

  fixtures/adapters/<base>-lora/        adapter_config.json + adapter_model.safetensors, as
                                        PEFT's save_pretrained writes them: r 4, lora_alpha 8,
                                        all seven linear modules of every layer, dropout 0,
                                        A and B random (not PEFT's zero-B init, so the adapter
                                        changes the outputs); bases llama-untied and qwen2-tied
  fixtures/expected/lora/<base>-lora__{plain,chat}.jsonl
                                        per-example summed completion log-probs of base +
                                        adapter under PEFT, in float32 (logp_*) and float64
                                        (logp_*_f64)
  fixtures/expected/lora/<base>-lora__dpo.json, __sft.json
                                        3 full-batch steps continuing the adapter (plain.jsonl):
                                        DPO sigmoid beta 0.1 with the starting policy (base +
                                        starting adapter) as reference, and SFT (TRL's token-mean
                                        loss on prompt/chosen); AdamW over the adapter only
                                        (lr 1e-3, betas 0.9/0.999, eps 1e-3, no decay), no
                                        clipping; loss and grad norm (over the adapter's
                                        parameters) per step, in float32 and float64
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import FIX, implicit_prompt, tokenize_example  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASES = {"llama-untied": 11, "qwen2-tied": 12}
# Adam's epsilon is 1e-3, not 1e-8: with 1e-8 the first step moves every element by +-lr
# whatever its size, so a gradient element of 4e-6 whose sign float32 noise flips (torch's
# own float32 gradient is up to 1e-4 off float64 here) moves the trajectory by 2 lr. With
# 1e-3, elements below 1e-3 move in proportion to their gradient and the trajectories
# compare the gradients, not the signs of their noise.
LR, BETAS, EPS, STEPS, BETA = 1e-3, (0.9, 0.999), 1e-3, 3, 0.1


def make_adapter(base: str, seed: int) -> Path:
    out = FIX / "adapters" / f"{base}-lora"
    if out.exists():
        shutil.rmtree(out)
    model = AutoModelForCausalLM.from_pretrained(str(FIX / "models" / base), dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    peft = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft.named_parameters(), key=lambda kv: kv[0]):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    peft.save_pretrained(str(out))
    # A stable, relative base path instead of this machine's absolute one.
    conf = json.loads((out / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = f"fixtures/models/{base}"
    (out / "adapter_config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    readme = out / "README.md"
    if readme.exists():
        readme.unlink()
    return out


def load_peft(base: str, adapter: Path, dtype, trainable: bool):
    model = AutoModelForCausalLM.from_pretrained(str(FIX / "models" / base), dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    return peft.to(dtype)


def seq_logp(model, ids, start):
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    lp = torch.log_softmax(logits, dim=-1)[start - 1 : len(ids) - 1]
    return lp.gather(1, torch.tensor(ids[start:]).unsqueeze(1)).sum()


def expected_logps(base: str, adapter: Path) -> None:
    out = FIX / "expected" / "lora"
    out.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast.from_pretrained(str(FIX / "models" / base))
    models = {dtype: load_peft(base, adapter, dtype, False).eval() for dtype in (torch.float32, torch.float64)}
    for dataset in ["plain", "chat"]:
        rows = []
        for i, line in enumerate(open(FIX / "data" / f"{dataset}.jsonl", encoding="utf-8")):
            ex = json.loads(line)
            ex = ex if "prompt" in ex else implicit_prompt(ex)
            t = tokenize_example(tok, ex)
            row = {"index": i}
            with torch.no_grad():
                for dtype, suffix in ((torch.float32, ""), (torch.float64, "_f64")):
                    row[f"logp_chosen{suffix}"] = float(seq_logp(models[dtype], t["chosen_ids"], t["a"]))
                    row[f"logp_rejected{suffix}"] = float(seq_logp(models[dtype], t["rejected_ids"], t["b"]))
            rows.append(row)
        (out / f"{adapter.name}__{dataset}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def batch(base: str):
    tok = PreTrainedTokenizerFast.from_pretrained(str(FIX / "models" / base))
    rows = [json.loads(line) for line in open(FIX / "data" / "plain.jsonl", encoding="utf-8")]
    return [tokenize_example(tok, ex) for ex in rows]


def trajectory(base: str, adapter: Path, kind: str, dtype) -> list[dict]:
    pairs = batch(base)
    policy = load_peft(base, adapter, dtype, True)
    policy.train()
    params = [p for n, p in policy.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n, p in policy.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, foreach=False)
    if kind == "dpo":
        ref = load_peft(base, adapter, dtype, False).eval()
        with torch.no_grad():
            ref_w = torch.stack([seq_logp(ref, t["chosen_ids"], t["a"]) for t in pairs])
            ref_l = torch.stack([seq_logp(ref, t["rejected_ids"], t["b"]) for t in pairs])
    steps = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        lw = torch.stack([seq_logp(policy, t["chosen_ids"], t["a"]) for t in pairs])
        if kind == "dpo":
            ll = torch.stack([seq_logp(policy, t["rejected_ids"], t["b"]) for t in pairs])
            h = (lw - ref_w) - (ll - ref_l)
            loss = -torch.nn.functional.logsigmoid(BETA * h).mean()
        else:
            tokens = sum(len(t["chosen_ids"]) - t["a"] for t in pairs)
            loss = -lw.sum() / tokens
        loss.backward()
        norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))
        steps.append({"step": step, "loss": float(loss.detach()), "grad_norm": norm})
        opt.step()
    return steps


def main() -> None:
    for base, seed in BASES.items():
        adapter = make_adapter(base, seed)
        expected_logps(base, adapter)
        for kind in ["dpo", "sft"]:
            doc = {
                "setup": f"{kind}: 3 full-batch steps on data/plain.jsonl continuing {adapter.name}; AdamW lr {LR}, eps {EPS}, "
                "no clipping, constant lr; reference (dpo) = base + starting adapter",
                "float32": trajectory(base, adapter, kind, torch.float32),
                "float64": trajectory(base, adapter, kind, torch.float64),
            }
            path = FIX / "expected" / "lora" / f"{adapter.name}__{kind}.json"
            path.write_text(json.dumps(doc, indent=2) + "\n")
            f32, f64 = doc["float32"], doc["float64"]
            gap = max(abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] for a, b in zip(f32, f64))
            print(f"{path.relative_to(FIX.parent)}: losses {[round(s['loss'], 5) for s in f32]}, f32-vs-f64 grad norm {gap:.1e}")


if __name__ == "__main__":
    main()
