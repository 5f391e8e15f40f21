#!/usr/bin/env python3
"""KTO fixtures: TRL's KTO formula on fixed tensors, and plain-PyTorch trajectories.

Run from the repository root:

    /work/pyenv/bin/python scripts/make_kto_fixtures.py

Writes (rerunning with the versions pinned in scripts/requirements.txt gives the same files):

  fixtures/data/kto.jsonl                    data/plain.jsonl unpaired (TRL's format): each pair
                                             becomes two rows, `label` true for the chosen
                                             completion, false for the rejected, in alternating
                                             order, 24 rows
  fixtures/expected/train/kto_crosscheck.json  TRL 1.16's KTOTrainer loss lines
                                             (kto_trainer.py `_compute_loss`) on fixed tensors
  fixtures/expected/train/kto_traj_<model>.json
                                             3 optimizer steps, batch 8 in file order (TRL's
                                             sequential sampler for KTO), float32 and float64

The trajectory follows TRL's KTOTrainer: tokens as its `_prepare_dataset` makes them (plain
text: EOS text appended when missing; prompt ids cut to the longest prefix they share with
the prompt + completion ids), the mismatched ("KL") completions rotated within consecutive
chunks of batch-size rows (row i gets row i-1's completion, row 0 the last row's), summed
completion log-probs, and per batch z0 = clamp(mean(KL logps - reference KL logps), 0)
without gradient; loss = mean over rows of w_d (1 - sigmoid(beta (r - z0))) for desirable
and w_u (1 - sigmoid(beta (z0 - r))) for undesirable rows. AdamW lr 1e-3 constant, no
clipping, beta 0.1, w_d 1.0, w_u 1.33.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
OUT = FIX / "expected" / "train"
DATA = FIX / "data" / "kto.jsonl"

LR, BETAS, EPS, STEPS, BATCH = 1e-3, (0.9, 0.999), 1e-8, 3, 8
BETA, W_D, W_U, MAX_LENGTH = 0.1, 1.0, 1.33, 256
MODELS = ["qwen2-tied", "llama-untied"]


def trl_kto_loss(pol, ref, kl_pol, kl_ref, labels, beta, w_d, w_u):
    """TRL 1.16 kto_trainer.py lines 1442-1482 and 1548, for loss_type "kto"."""
    kl = (kl_pol - kl_ref).mean().detach()
    kl = kl.mean().clamp(min=0)
    logratios = pol - ref
    chosen = logratios[labels]
    rejected = logratios[~labels]
    chosen_losses = 1 - F.sigmoid(beta * (chosen - kl))
    rejected_losses = 1 - F.sigmoid(beta * (kl - rejected))
    losses = torch.cat((w_d * chosen_losses, w_u * rejected_losses), 0)
    return losses.nanmean(), kl, chosen_losses, rejected_losses


def crosscheck() -> dict:
    gen = torch.Generator().manual_seed(3)
    cases = []
    for name, n, beta, w_d, w_u, kl_shift in [
        ("mixed", 6, 0.1, 1.0, 1.0, 0.5),
        ("weighted", 7, 0.5, 1.0, 1.33, 0.2),
        ("negative_kl_clamped", 5, 0.1, 0.8, 1.0, -3.0),
        ("large_beta", 4, 5.0, 1.0, 2.0, 1.0),
    ]:
        pol = -10 * torch.rand(n, generator=gen, dtype=torch.float64) - 1
        ref = pol + torch.randn(n, generator=gen, dtype=torch.float64)
        kl_ref = -10 * torch.rand(n, generator=gen, dtype=torch.float64) - 1
        kl_pol = kl_ref + kl_shift + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)
        labels = torch.tensor([i % 3 != 1 for i in range(n)])
        loss, kl, cl, rl = trl_kto_loss(pol, ref, kl_pol, kl_ref, labels, beta, w_d, w_u)
        per_row = torch.empty(n, dtype=torch.float64)
        per_row[labels] = w_d * cl
        per_row[~labels] = w_u * rl
        cases.append(
            {
                "name": name,
                "beta": beta,
                "desirable_weight": w_d,
                "undesirable_weight": w_u,
                "policy": pol.tolist(),
                "reference": ref.tolist(),
                "kl_policy": kl_pol.tolist(),
                "kl_reference": kl_ref.tolist(),
                "desirable": labels.tolist(),
                "kl": float(kl),
                "losses": per_row.tolist(),
                "loss": float(loss),
            }
        )
    return {"generated_by": "scripts/make_kto_fixtures.py", "trl": "1.16.0 kto_trainer.py _compute_loss", "cases": cases}


def write_data() -> None:
    rows = [json.loads(line) for line in (FIX / "data" / "plain.jsonl").read_text().splitlines() if line.strip()]
    out = []
    for i, r in enumerate(rows):
        good = {"prompt": r["prompt"], "completion": r["chosen"], "label": True}
        bad = {"prompt": r["prompt"], "completion": r["rejected"], "label": False}
        out.extend([good, bad] if i % 2 == 0 else [bad, good])
    DATA.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in out))


def common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize(tok, rows):
    """TRL's KTO `_prepare_dataset` for the standard format, then the KL rotation."""
    items = []
    for r in rows:
        completion = r["completion"]
        if not completion.endswith(tok.eos_token):
            completion += tok.eos_token
        prompt_ids = list(tok(text=r["prompt"])["input_ids"])
        full = list(tok(text=r["prompt"] + completion)["input_ids"])
        n = common_prefix(prompt_ids, full)
        items.append({"prompt": prompt_ids[:n], "completion": full[n:], "label": r["label"]})
    items = [x for x in items if len(x["prompt"]) < MAX_LENGTH]
    for start in range(0, len(items), BATCH):
        chunk = items[start : start + BATCH]
        rotated = [chunk[-1]["completion"]] + [x["completion"] for x in chunk[:-1]]
        for x, c in zip(chunk, rotated):
            x["kl_completion"] = c
    return items


def seq_logp(model, prompt, completion, dtype):
    ids = (prompt + completion)[:MAX_LENGTH]
    n_prompt = len(prompt)
    logits = model(input_ids=torch.tensor([ids])).logits[0].to(dtype)
    logp = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(ids[n_prompt:])
    return logp[n_prompt - 1 : len(ids) - 1].gather(1, targets[:, None]).sum()


def run(model_name: str, items, dtype) -> dict:
    folder = FIX / "models" / model_name
    policy = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(dtype)
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(dtype)
    policy.train()
    ref.eval()
    named = list(policy.named_parameters())
    opt = torch.optim.AdamW([p for _, p in named], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, foreach=False)
    with torch.no_grad():
        ref_t = [seq_logp(ref, x["prompt"], x["completion"], dtype) for x in items]
        ref_kl = [seq_logp(ref, x["prompt"], x["kl_completion"], dtype) for x in items]
    steps = []
    for step in range(STEPS):
        batch = list(range(step * BATCH, min((step + 1) * BATCH, len(items))))
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            kl_pol = torch.stack([seq_logp(policy, items[i]["prompt"], items[i]["kl_completion"], dtype) for i in batch])
        pol = torch.stack([seq_logp(policy, items[i]["prompt"], items[i]["completion"], dtype) for i in batch])
        labels = torch.tensor([items[i]["label"] for i in batch])
        refs = torch.stack([ref_t[i] for i in batch])
        loss, kl, _, _ = trl_kto_loss(pol, refs, kl_pol, torch.stack([ref_kl[i] for i in batch]), labels, BETA, W_D, W_U)
        loss.backward()
        sq = sum(float(p.grad.double().pow(2).sum()) for _, p in named if p.grad is not None)
        r = (pol - refs).detach().double()
        lp = pol.detach().double()
        steps.append(
            {
                "step": step + 1,
                "rows": batch,
                "loss": float(loss.detach()),
                "grad_norm": math.sqrt(sq),
                "kl": float(kl),
                "rewards/chosen": float(BETA * r[labels].mean()),
                "rewards/rejected": float(BETA * r[~labels].mean()),
                "logps/chosen": float(lp[labels].mean()),
                "logps/rejected": float(lp[~labels].mean()),
            }
        )
        opt.step()
    return {"steps": steps}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "kto_crosscheck.json").write_text(json.dumps(crosscheck(), indent=1) + "\n")
    write_data()
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    for model_name in MODELS:
        tok = PreTrainedTokenizerFast.from_pretrained(str(FIX / "models" / model_name))
        items = tokenize(tok, rows)
        r32 = run(model_name, items, torch.float32)
        r64 = run(model_name, items, torch.float64)
        out = {
            "generated_by": "scripts/make_kto_fixtures.py",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "model": f"fixtures/models/{model_name}",
            "data": "fixtures/data/kto.jsonl",
            "setup": {"lr": LR, "betas": BETAS, "eps": EPS, "batch": BATCH, "beta": BETA,
                      "desirable_weight": W_D, "undesirable_weight": W_U, "max_length": MAX_LENGTH},
            "tokens": [{"prompt": x["prompt"], "completion": x["completion"], "kl_completion": x["kl_completion"]}
                       for x in items],
            "steps": r32["steps"],
            "float64": {"steps": r64["steps"]},
        }
        path = OUT / f"kto_traj_{model_name}.json"
        path.write_text(json.dumps(out, indent=1) + "\n")
        s = r32["steps"]
        print(f"{path.name}: loss {[round(x['loss'], 5) for x in s]}, kl {[round(x['kl'], 5) for x in s]}")


if __name__ == "__main__":
    main()
