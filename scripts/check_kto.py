#!/usr/bin/env python3
"""`prefopt train` with `loss_type = "kto"` beside TRL's own KTOTrainer (not run by CI).

    /work/pyenv/bin/python scripts/check_kto.py [--prefopt target/release/prefopt]
        [--model fixtures/models/qwen2-tied] [--data fixtures/data/kto.jsonl] [--lr 1e-3]

Both train 3 steps of batch 8 (TRL's sequential sampler; prefopt's file order), f32, constant
learning rate, no clipping, beta 0.1, undesirable_weight 1.33, max_length 256, no gradient
checkpointing; every logged loss, grad_norm, kl and reward/log-prob metric must agree
(loss 1e-5, the others 1e-4 relative). Use `--lr 1e-5` for a real checkpoint.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
KEYS = ["loss", "grad_norm", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"]


def run_prefopt(binary: Path, model: Path, data: Path, out: Path, lr: float):
    cfg = out.parent / "kto.toml"
    cfg.write_text(
        "\n".join(
            [
                f'model = "{model}"',
                f'train_data = "{data}"',
                f'output_dir = "{out}"',
                'loss_type = "kto"',
                "undesirable_weight = 1.33",
                f"learning_rate = {lr}",
                'lr_scheduler_type = "constant"',
                "max_grad_norm = 0.0",
                "max_steps = 3",
                "batch_size = 8",
                "max_length = 256",
                "logging_steps = 1",
                "save_steps = 0",
            ]
        )
        + "\n"
    )
    subprocess.run([str(binary), "train", "--config", str(cfg)], check=True, capture_output=True)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def run_trl(model: Path, data: Path, out: Path, lr: float):
    from datasets import load_dataset
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(
        output_dir=str(out),
        per_device_train_batch_size=8,
        max_steps=3,
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        beta=0.1,
        desirable_weight=1.0,
        undesirable_weight=1.33,
        max_length=256,
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=42,
    )
    trainer = KTOTrainer(
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
    ap.add_argument("--model", type=Path, default=ROOT / "fixtures/models/qwen2-tied")
    ap.add_argument("--data", type=Path, default=ROOT / "fixtures/data/kto.jsonl")
    ap.add_argument("--lr", type=float, default=1e-3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours = run_prefopt(a.prefopt, a.model.resolve(), a.data.resolve(), tmp / "ours", a.lr)
        theirs = run_trl(a.model.resolve(), a.data.resolve(), tmp / "trl", a.lr)
    bad = 0
    print(f"TRL KTOTrainer vs prefopt train loss_type=kto ({a.model}, {a.data.name}, lr {a.lr}):")
    print(f"{'step':<4} {'metric':<16} {'prefopt':>13} {'TRL':>13} {'|diff|':>9}")
    for o, t in zip(ours, theirs):
        for k in KEYS:
            if k not in t:
                print(f"{o['step']:<4} {k:<16} {o.get(k, float('nan')):>13.7f} {'(not logged)':>13}")
                continue
            d = abs(o[k] - t[k])
            tol = 1e-5 if k == "loss" else 1e-4 * max(1.0, abs(t[k]))
            bad += d > tol
            print(f"{o['step']:<4} {k:<16} {o[k]:>13.7f} {t[k]:>13.7f} {d:>9.1e}{'  MISMATCH' if d > tol else ''}")
    if len(ours) != len(theirs):
        print(f"logged steps differ: prefopt {len(ours)}, TRL {len(theirs)}")
        bad += 1
    print("OK" if bad == 0 else f"{bad} MISMATCHES")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
