#!/usr/bin/env python3
"""TRL's DPOTrainer on a preference file, for `prefopt bench dpo --data` to compare against.

    /work/pyenv/bin/python scripts/bench_trl_dpo.py --model DIR --data FILE --batch B --steps S [--threads N] [--micro-batch M]

Runs `DPOTrainer.train()` for S steps of B pairs on the first S*B rows of FILE (JSONL, TRL's
conversational or standard format), in the order of the file (`train_sampling_strategy =
"sequential"`, so its batches are prefopt's), with the settings prefopt's benchmark uses:
f32 on the CPU, sigmoid loss, beta 0.1, AdamW, max_length 1024 (`truncation_mode =
keep_start`), no gradient checkpointing, reference model on and reference log-probs computed
in every step (`precompute_ref_log_probs = False`), padding (TRL's `padding_free` needs
flash-attention, which the CPU lacks), no logging to trackers, no checkpoints. --micro-batch M
(a divisor of B) runs each step as B/M micro-batches of M with gradient accumulation, as a
TRL user does when a batch of B does not fit in memory (here: B = 8 on 24 GB).

Output: ONE JSON line with TRL's own `train_runtime` and `train_samples_per_second` (from
its log, which times the whole `train()` loop, first step included), `examples_per_s` =
pairs / train_runtime (the same figure unrounded), the mean step time of the steps after
the first (`steady_step_s`, from a callback) and its examples/s (`steady_examples_per_s`, the
field `prefopt bench dpo` reports), and the peak RSS (MiB).
"""

import argparse
import json
import resource
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=None)
    args = ap.parse_args()
    micro = args.batch if args.micro_batch is None else args.micro_batch
    if micro <= 0 or args.batch % micro:
        ap.error(f"--micro-batch {micro} must divide --batch {args.batch}")

    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(l) for l in open(args.data)][: args.batch * args.steps]
    assert len(rows) == args.batch * args.steps, f"{args.data} has fewer than {args.batch * args.steps} rows"
    tok = PreTrainedTokenizerFast.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter())

    steps = StepTimes()
    cfg = DPOConfig(
        output_dir="/tmp/bench-trl-dpo",
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=args.batch // micro,
        max_steps=args.steps,
        learning_rate=1e-6,
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=args.max_length,
        precompute_ref_log_probs=False,
        gradient_checkpointing=False,
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        seed=0,
    )
    trainer = DPOTrainer(
        model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[steps]
    )
    out = trainer.train()
    m = out.metrics
    gaps = [b - a for a, b in zip(steps.times, steps.times[1:])]
    steady = sum(gaps) / len(gaps) if gaps else None
    print(
        json.dumps(
            {
                "impl": "trl",
                "mode": "dpo",
                # TRL logs train_samples_per_second rounded to 3 decimals; the same figure
                # from its train_runtime (4 decimals):
                "examples_per_s": args.batch * args.steps / m["train_runtime"],
                "train_samples_per_second": m["train_samples_per_second"],
                "train_runtime": m["train_runtime"],
                "steady_step_s": steady,
                "steady_examples_per_s": args.batch / steady if steady else None,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "pairs": args.batch,
                "micro_batch": micro,
                "steps": args.steps,
                "threads": args.threads,
                "max_length": args.max_length,
                "data": args.data,
                "model": args.model,
            }
        )
    )


if __name__ == "__main__":
    main()
