#!/usr/bin/env python3
"""`prefopt reward` against transformers and TRL (not run by CI).

    /work/pyenv/bin/python scripts/check_reward_model.py [--prefopt target/release/prefopt]
        [--model fixtures/models/llama-tied] [--data fixtures/data/plain.jsonl] [--steps 4]

1. Load check: `prefopt reward` trains `--model` (a causal LM gets a new score head) for
   `--steps` steps with the data as eval data too; transformers'
   `AutoModelForSequenceClassification` loads `final/`, scores every pair (tokenized as TRL's
   RewardTrainer does), and its loss, accuracy, margin and mean/min/max reward must equal the
   `eval_*` line prefopt logged after the last step (1e-4).
2. TRL check (`--trl-model`, default fixtures/models/llama-rm, a reward model so both start
   from the same head): TRL's `RewardTrainer` and `prefopt reward` each train 3 steps on the
   whole file as one batch (f32, constant lr 1e-3, no clipping, centering 0.01); every logged
   loss, grad_norm, accuracy, margin and reward statistic must agree (1e-5 loss, 1e-4 others).
   For a real checkpoint as `--trl-model` (e.g. a `prefopt reward` output from SmolLM2-135M),
   use `--trl-lr 1e-5`.

Prints a table and exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_reward_fixtures import load_pairs  # noqa: E402

KEYS = ["loss", "accuracy", "margin", "mean_reward", "min_reward", "max_reward"]


def transformers_metrics(model_dir: Path, data: Path, center: float | None) -> dict:
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    rw, rl, margins = [], [], []
    with torch.no_grad():
        for pair in load_pairs(model_dir, data):
            rw.append(float(model(input_ids=torch.tensor([pair["chosen"]])).logits[0, 0]))
            rl.append(float(model(input_ids=torch.tensor([pair["rejected"]])).logits[0, 0]))
            margins.append(pair["margin"] or 0.0)
    w, l, m = (torch.tensor(x, dtype=torch.float64) for x in (rw, rl, margins))
    loss = -torch.nn.functional.logsigmoid(w - l - m).mean()
    if center is not None:
        loss = loss + center * ((w + l) ** 2).mean()
    every = torch.cat([w, l])
    return {
        "loss": float(loss),
        "accuracy": float((w > l).double().mean()),
        "margin": float((w - l).mean()),
        "mean_reward": float(every.mean()),
        "min_reward": float(every.min()),
        "max_reward": float(every.max()),
    }


def run_prefopt(
    binary: Path, model: Path, data: Path, out: Path, steps: int, batch: int, center: float | None, lr: float = 1e-3
):
    lines = [
        f'model = "{model}"',
        f'train_data = "{data}"',
        f'eval_data = "{data}"',
        f'output_dir = "{out}"',
        f"learning_rate = {lr}",
        'lr_scheduler_type = "constant"',
        "max_grad_norm = 0.0",
        f"max_steps = {steps}",
        f"batch_size = {batch}",
        "logging_steps = 1",
        "save_steps = 0",
    ]
    if center is not None:
        lines.append(f"center_rewards_coefficient = {center}")
    cfg = out.parent / f"{out.name}.toml"
    cfg.write_text("\n".join(lines) + "\n")
    subprocess.run([str(binary), "reward", "--config", str(cfg)], check=True, capture_output=True)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def run_trl(model: Path, data: Path, out: Path, steps: int, batch: int, center: float | None, lr: float):
    from datasets import load_dataset
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        center_rewards_coefficient=center,
        seed=42,
        dataloader_drop_last=False,
    )
    trainer = RewardTrainer(
        model=str(model),
        args=args,
        train_dataset=load_dataset("json", data_files=str(data), split="train"),
        processing_class=PreTrainedTokenizerFast.from_pretrained(str(model)),
    )
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefopt", type=Path, default=ROOT / "target/release/prefopt")
    ap.add_argument("--model", type=Path, default=ROOT / "fixtures/models/llama-tied")
    ap.add_argument("--data", type=Path, default=ROOT / "fixtures/data/plain.jsonl")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--trl-model", type=Path, default=ROOT / "fixtures/models/llama-rm")
    ap.add_argument("--trl-data", type=Path, default=ROOT / "fixtures/data/plain_margin.jsonl")
    ap.add_argument("--trl-lr", type=float, default=1e-3, help="1e-5 for a real checkpoint: at 1e-3 a 30-layer "
                    "model's steps amplify float32 rounding past the tolerances")
    ap.add_argument("--no-trl", action="store_true")
    a = ap.parse_args()
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        center = 0.01
        n = sum(1 for x in a.data.read_text().splitlines() if x.strip())
        logged = run_prefopt(a.prefopt, a.model.resolve(), a.data.resolve(), tmp / "load", a.steps, min(n, 8), center)
        ev = [x for x in logged if "eval_loss" in x][-1]
        want = transformers_metrics(tmp / "load" / "final", a.data, center)
        print(f"1. transformers loads prefopt's final/ ({a.model.name}, {a.steps} steps, {n} pairs):")
        print(f"   {'metric':<12} {'prefopt eval':>14} {'transformers':>14} {'|diff|':>9}")
        for k in KEYS:
            d = abs(ev[f"eval_{k}"] - want[k])
            bad += d > 1e-4
            print(f"   {k:<12} {ev[f'eval_{k}']:>14.7f} {want[k]:>14.7f} {d:>9.1e}")
        if not a.no_trl:
            m = sum(1 for x in a.trl_data.read_text().splitlines() if x.strip())
            ours = run_prefopt(
                a.prefopt, a.trl_model.resolve(), a.trl_data.resolve(), tmp / "ours", 3, m, center, a.trl_lr
            )
            ours = [x for x in ours if "loss" in x]
            theirs = run_trl(a.trl_model.resolve(), a.trl_data.resolve(), tmp / "trl", 3, m, center, a.trl_lr)
            print(f"2. TRL RewardTrainer vs prefopt reward ({a.trl_model}, {a.trl_data.name}, 3 steps, lr {a.trl_lr}):")
            print(f"   {'step':<4} {'metric':<12} {'prefopt':>13} {'TRL':>13} {'|diff|':>9}")
            for o, t in zip(ours, theirs):
                for k in KEYS + ["grad_norm"]:
                    d = abs(o[k] - t[k])
                    tol = 1e-5 if k == "loss" else 1e-4 * max(1.0, abs(t[k]))
                    bad += d > tol
                    print(f"   {o['step']:<4} {k:<12} {o[k]:>13.7f} {t[k]:>13.7f} {d:>9.1e}")
            if len(ours) != len(theirs):
                print(f"   logged steps differ: prefopt {len(ours)}, TRL {len(theirs)}")
                bad += 1
    print("OK" if bad == 0 else f"{bad} MISMATCHES")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
