#!/usr/bin/env python3
"""PyTorch (CPU) baseline throughput for prefopt's benchmarks.

    /work/pyenv/bin/python scripts/bench_torch.py MODE [--model DIR] [--threads N] [options]

MODE:
  forward    no-grad forward of a B x T batch                     tokens = B*T per step
  fwd-bwd    forward + backward (no optimizer) of a B x T batch    tokens = B*T per step
  dpo        one DPO training step: reference forward (no grad) and policy forward + backward on
             2P sequences (chosen + rejected, shared prompt of A tokens, completions of C tokens),
             sigmoid DPO loss (beta 0.1) on completion tokens, AdamW step
                                                                   tokens = 2P*(A+C) per step
  generate   HF model.generate(do_sample=True, use_cache=True), batch B, prompt A,
             exactly N new tokens (min_new_tokens = max_new_tokens = N)
                                                                   tokens = B*N new tokens per call

--model DIR: a Hugging Face Llama folder. If DIR does not exist it is created: 4 layers,
hidden 256, 8 heads (8 kv heads), intermediate 688, vocab 512, random (torch.manual_seed(0),
transformers' default init), f32, saved with save_pretrained, with the tokenizer files of
fixtures/models/llama-untied copied in. Keep DIR out of git (target-bench/ or /tmp).

Timing: W warm-up steps, then S timed steps (time.perf_counter); tokens_per_s = tokens per
step / median step time; tokens_per_s_best uses the fastest step (more robust when other
processes share the CPU; loadavg_1m records the 1-minute load before and after).

Output: ONE JSON line
  {"impl": "pytorch", "mode", "tokens_per_s", "peak_rss_mb", "gflops", "gflop_per_step",
   "threads", ...config}
  peak_rss_mb = resource.getrusage(RUSAGE_SELF).ru_maxrss / 1024 (Linux reports KiB).

FLOP estimate (the standard one):
  N  = parameters excluding the input embedding table (the lm_head matmul is counted; for a
       tied model the shared matrix counts once, as the lm_head)
  forward of one sequence of T tokens = 2*N*T + 2*2*L*T^2*d      (attention scores QK^T and
       the weighted sum AV, each 2*T^2*d per layer, counted without the causal halving)
  fwd-bwd = 3 x forward;  dpo = 3 x policy forward + 1 x reference forward (over the 2P sequences)
  generate = prefill forward of the B prompts + per new token 2*N + 2*2*L*ctx*d (ctx = tokens in
       the KV cache including the new one), summed over the N new tokens of the B sequences
  gflop_per_step = that count / 1e9;  gflops = gflop_per_step / median step time (GFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "target-bench" / "torch-llama-4x256"
TOKENIZER_SRC = ROOT / "fixtures" / "models" / "llama-untied"


def create_model(folder: Path) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=688,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=480,
        eos_token_id=484,
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        src = TOKENIZER_SRC / name
        if src.is_file():
            shutil.copyfile(src, folder / name)


def count_params(model) -> tuple[int, int]:
    """(all parameters, parameters excluding the input embedding table; lm_head counted once)."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb
    n = total - (0 if tied else emb.numel())
    return total, n


def forward_flops(n: int, layers: int, d: int, seq_len: int) -> float:
    return 2.0 * n * seq_len + 2.0 * 2.0 * layers * seq_len * seq_len * d


def timed(fn, warmup: int, steps: int, device: torch.device) -> list[float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["forward", "fwd-bwd", "dpo", "generate"])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--batch", "-B", type=int, default=8, help="forward/fwd-bwd/generate batch")
    ap.add_argument("--seq", "-T", type=int, default=128, help="forward/fwd-bwd sequence length")
    ap.add_argument("--pairs", "-P", type=int, default=4, help="dpo: pairs per step")
    ap.add_argument("--prompt-len", "-A", type=int, default=64, help="dpo/generate: prompt tokens")
    ap.add_argument("--completion-len", "-C", type=int, default=64, help="dpo: completion tokens")
    ap.add_argument("--new-tokens", "-N", type=int, default=64, help="generate: new tokens")
    ap.add_argument("--steps", "-S", type=int, default=None, help="timed steps (default 10; generate 3)")
    ap.add_argument("--warmup", "-W", type=int, default=None, help="warm-up steps (default 2; generate 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--bf16", action="store_true",
                    help="autocast the forward passes to bf16 (f32 master weights, as the HF Trainer's bf16=True)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="dpo: model.gradient_checkpointing_enable() (recompute each layer in backward)")
    ap.add_argument("--lora", action="store_true",
                    help="dpo: a fresh PEFT LoRA adapter on the frozen model; the reference is the base "
                         "with the adapter disabled (no second model), as TRL does with a PeftModel")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--lora-target-modules", default="all-linear", help="comma-separated, or all-linear")
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    args = ap.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    steps = args.steps if args.steps is not None else (3 if args.mode == "generate" else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.mode == "generate" else 2)
    if not args.model.exists():
        create_model(args.model)
    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32).to(device)
    cfg = model.config
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    layers, d = cfg.num_hidden_layers, cfg.hidden_size
    total_params, n = count_params(model)
    g = torch.Generator().manual_seed(args.seed)
    vocab_hi = min(480, cfg.vocab_size)  # ids the tokenizer can produce

    info: dict = {}
    if args.mode in ("forward", "fwd-bwd"):
        B, T = args.batch, args.seq
        ids = torch.randint(0, vocab_hi, (B, T), generator=g).to(device)
        if args.mode == "forward":
            model.eval()

            def step():
                with torch.no_grad(), amp:
                    model(ids, use_cache=False).logits.sum().item()

            flops = B * forward_flops(n, layers, d, T)
        else:
            model.train()

            def step():
                model.zero_grad(set_to_none=True)
                with amp:
                    logits = model(ids, use_cache=False).logits.float()
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
                loss.backward()

            flops = 3 * B * forward_flops(n, layers, d, T)
        tokens = B * T
        info.update(batch=B, seq_len=T)
    elif args.mode == "dpo":
        P, A, C = args.pairs, args.prompt_len, args.completion_len
        T = A + C
        prompt = torch.randint(0, vocab_hi, (P, A), generator=g)
        chosen = torch.randint(0, vocab_hi, (P, C), generator=g)
        rejected = torch.randint(0, vocab_hi, (P, C), generator=g)
        ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)], 0).to(device)  # [2P, T]
        if args.lora:
            from peft import LoraConfig, get_peft_model

            modules = args.lora_target_modules
            lcfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias="none",
                              target_modules=modules if modules == "all-linear" else modules.split(","),
                              task_type="CAUSAL_LM")
            model = get_peft_model(model, lcfg)
            ref = None
        else:
            ref = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32).to(device)
            ref.eval()
            for p in ref.parameters():
                p.requires_grad_(False)
        model.train()
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            if args.lora:
                model.enable_input_require_grads()  # PEFT's recipe: checkpointed blocks need a grad input
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        beta = 0.1
        targets = ids[:, A:]  # completion tokens, predicted from positions A-1 .. T-2

        def seq_logps(m):
            with amp:
                logits = m(ids, use_cache=False).logits[:, A - 1 : T - 1].float()
            return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1)

        def step():
            with torch.no_grad():
                if ref is None:
                    with model.disable_adapter():
                        ref_lp = seq_logps(model)
                else:
                    ref_lp = seq_logps(ref)
            opt.zero_grad(set_to_none=True)
            lp = seq_logps(model)
            h = (lp[:P] - ref_lp[:P]) - (lp[P:] - ref_lp[P:])
            loss = -F.logsigmoid(beta * h).mean()
            loss.backward()
            opt.step()

        tokens = 2 * P * T
        flops = 4 * 2 * P * forward_flops(n, layers, d, T)
        info.update(pairs=P, prompt_len=A, completion_len=C, seq_len=T, sequences=2 * P, beta=beta, optimizer="AdamW",
                    gradient_checkpointing=args.gradient_checkpointing,
                    lora=({"r": args.lora_r, "alpha": args.lora_alpha, "target_modules": args.lora_target_modules,
                           "dropout": args.lora_dropout, "trainable_params": sum(p.numel() for p in trainable)}
                          if args.lora else None))
    else:  # generate
        B, A, N = args.batch, args.prompt_len, args.new_tokens
        model.eval()
        ids = torch.randint(0, vocab_hi, (B, A), generator=g).to(device)
        mask = torch.ones_like(ids)
        torch.manual_seed(args.seed)

        def step():
            with amp:
                out = _generate()
            assert out.shape == (B, A + N), out.shape

        def _generate():
            return model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                max_new_tokens=N,
                min_new_tokens=N,
                use_cache=True,
                pad_token_id=cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else 0,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
            )

        tokens = B * N
        flops = B * forward_flops(n, layers, d, A) + sum(
            B * (2.0 * n + 2.0 * 2.0 * layers * (A + i + 1) * d) for i in range(N)
        )
        info.update(batch=B, prompt_len=A, new_tokens=N, do_sample=True, kv_cache=True)

    load_before = os.getloadavg()[0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = timed(step, warmup, steps, device)
    med = statistics.median(times)
    load_after = os.getloadavg()[0]
    res = {
        "impl": "pytorch",
        "mode": args.mode,
        "tokens_per_s": tokens / med,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "gflops": flops / 1e9 / med,
        "gflop_per_step": flops / 1e9,
        # best step: less sensitive to other processes on a shared machine
        "tokens_per_s_best": tokens / min(times),
        "threads": torch.get_num_threads(),
        **info,
        "tokens_per_step": tokens,
        "median_step_s": med,
        "min_step_s": min(times),
        "steps": steps,
        "warmup": warmup,
        "model": str(args.model),
        "layers": layers,
        "hidden": d,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "intermediate": cfg.intermediate_size,
        "vocab": cfg.vocab_size,
        "params": total_params,
        "params_nonembedding": n,
        "dtype": "bfloat16 autocast" if args.bf16 else "float32",
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "loadavg_1m": [round(load_before, 2), round(load_after, 2)],  # other work on the machine
    }
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
