#!/usr/bin/env python3
"""Reward-model training fixtures: plain-PyTorch trajectories that `prefopt reward` must follow.

Run from the repository root:

    /work/pyenv/bin/python scripts/make_reward_fixtures.py

Writes (rerunning with the versions pinned in scripts/requirements.txt gives the same files):

  fixtures/models/llama-rm/          LlamaForSequenceClassification built from models/llama-tied
                                     (tied embeddings, the llama tokenizer: BOS, no pad token),
                                     num_labels 1, pad_token_id 484 = <|eot_id|>, the EOS: what TRL
                                     sets when the tokenizer has no pad token, so the appended EOS
                                     counts as padding and the reward is read one token before it
  fixtures/data/plain_margin.jsonl   data/plain.jsonl with a `margin` column
  fixtures/expected/train/reward_<model>__<data>.json
                                     3 steps of AdamW on the whole file as one batch, float32 and
                                     float64: loss, grad_norm, TRL's metrics, every pair's rewards,
                                     and the token ids of every sequence

The reference is plain PyTorch: transformers' *ForSequenceClassification forward (which pools at
the rightmost non-pad token itself), TRL's RewardTrainer loss written out
(`-logsigmoid(r_w - r_l - margin).mean() + c * ((r_w + r_l) ** 2).mean()`), torch's AdamW.
Tokenization follows TRL's RewardTrainer (TRL 1.16): plain text is prompt + completion with the
EOS text appended when missing, tokenized with the tokenizer's special tokens; conversations are
the prompt's messages plus the completion's, rendered by apply_chat_template (no generation
prompt). Setup as the DPO trajectories: lr 1e-3 constant, betas (0.9, 0.999), eps 1e-8, no weight
decay, no clipping.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
OUT = FIX / "expected" / "train"
LLAMA_RM = FIX / "models" / "llama-rm"
MARGIN_DATA = FIX / "data" / "plain_margin.jsonl"

LR, BETAS, EPS, STEPS = 1e-3, (0.9, 0.999), 1e-8, 3
MARGINS = [0.5, 0.0, 1.0, -0.25, 0.75, 0.1, 0.0, 2.0, 0.3, -0.5, 1.5, 0.2]

# (model, data file, center_rewards_coefficient)
TRAJECTORIES = [
    ("qwen2-rm", "chat.jsonl", None),
    ("qwen2-rm", "chat_implicit.jsonl", None),
    ("llama-rm", "plain_margin.jsonl", 0.01),
]


def build_llama_rm() -> None:
    """A reward model on the llama-tied backbone with an O(1) head, so rewards differ."""
    if LLAMA_RM.exists():
        shutil.rmtree(LLAMA_RM)
    src = FIX / "models" / "llama-tied"
    torch.manual_seed(0)
    model = LlamaForSequenceClassification.from_pretrained(
        str(src), num_labels=1, pad_token_id=484, dtype=torch.float32
    )
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        model.score.weight.copy_(0.5 * torch.randn(model.score.weight.shape, generator=gen))
    model.config.architectures = ["LlamaForSequenceClassification"]
    model.save_pretrained(LLAMA_RM, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / f, LLAMA_RM / f)


def write_margin_data() -> None:
    rows = [json.loads(line) for line in (FIX / "data" / "plain.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == len(MARGINS)
    text = "".join(json.dumps({**r, "margin": m}, ensure_ascii=False) + "\n" for r, m in zip(rows, MARGINS))
    MARGIN_DATA.write_text(text)


def split_implicit(chosen: list, rejected: list):
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def tokenize(tok, prompt, completion) -> list[int]:
    if isinstance(prompt, str):
        if not completion.endswith(tok.eos_token):
            completion = completion + tok.eos_token
        return list(tok(text=prompt + completion)["input_ids"])
    out = tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def load_pairs(model_dir: Path, data: Path):
    """Every pair of `data` as TRL's RewardTrainer tokenizes it for `model_dir`'s tokenizer."""
    tok = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    pairs = []
    for line in data.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "prompt" in row:
            prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        else:
            prompt, chosen, rejected = split_implicit(row["chosen"], row["rejected"])
        pairs.append(
            {
                "chosen": tokenize(tok, prompt, chosen),
                "rejected": tokenize(tok, prompt, rejected),
                "margin": row.get("margin"),
            }
        )
    return pairs


def rewards(model, seqs: list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return model(input_ids=ids, attention_mask=mask).logits[:, 0]


def run(model_name: str, pairs, center, dtype) -> dict:
    model = AutoModelForSequenceClassification.from_pretrained(
        str(FIX / "models" / model_name), dtype=torch.float32
    ).to(dtype)
    model.train()  # no dropout in these configs
    pad = model.config.pad_token_id
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([p for _, p in named], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, foreach=False)
    seqs = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    m = len(pairs)
    margin = None
    if pairs[0]["margin"] is not None:
        margin = torch.tensor([p["margin"] for p in pairs], dtype=dtype)
    steps = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        r = rewards(model, seqs, pad)
        r_w, r_l = r[:m], r[m:]
        diff = r_w - r_l if margin is None else r_w - r_l - margin
        loss = -torch.nn.functional.logsigmoid(diff).mean()
        if center is not None:
            loss = loss + center * ((r_w + r_l) ** 2).mean()
        loss.backward()
        sq = sum(float(p.grad.double().pow(2).sum()) for _, p in named if p.grad is not None)
        rd = r.detach().double()
        steps.append(
            {
                "step": step + 1,
                "loss": float(loss.item()),
                "grad_norm": math.sqrt(sq),
                "accuracy": float((r_w > r_l).double().mean()),
                "margin": float((r_w - r_l).detach().double().mean()),
                "mean_reward": float(rd.mean()),
                "min_reward": float(rd.min()),
                "max_reward": float(rd.max()),
                "rewards_chosen": [float(x) for x in r_w.detach().tolist()],
                "rewards_rejected": [float(x) for x in r_l.detach().tolist()],
            }
        )
        opt.step()
    return {"steps": steps, "n_trainable_tensors": len(named)}


def main() -> None:
    build_llama_rm()
    write_margin_data()
    OUT.mkdir(parents=True, exist_ok=True)
    for model_name, data, center in TRAJECTORIES:
        pairs = load_pairs(FIX / "models" / model_name, FIX / "data" / data)
        r32 = run(model_name, pairs, center, torch.float32)
        r64 = run(model_name, pairs, center, torch.float64)
        out = {
            "generated_by": "scripts/make_reward_fixtures.py",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "model": f"fixtures/models/{model_name}",
            "data": f"fixtures/data/{data}",
            "setup": {"lr": LR, "betas": BETAS, "eps": EPS, "steps": STEPS, "batch": "whole file",
                      "center_rewards_coefficient": center},
            "input_ids": [{"chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs],
            "steps": r32["steps"],
            "float64": {"steps": r64["steps"]},
            "n_trainable_tensors": r32["n_trainable_tensors"],
        }
        path = OUT / f"reward_{model_name}__{Path(data).stem}.json"
        path.write_text(json.dumps(out, indent=1) + "\n")
        s = r32["steps"]
        print(f"{path.name}: {len(pairs)} pairs, loss {s[0]['loss']:.5f} -> {s[-1]['loss']:.5f}, "
              f"accuracy {s[0]['accuracy']:.2f} -> {s[-1]['accuracy']:.2f}, "
              f"f32 vs f64 loss {abs(s[-1]['loss'] - r64['steps'][-1]['loss']):.1e}")


if __name__ == "__main__":
    main()
