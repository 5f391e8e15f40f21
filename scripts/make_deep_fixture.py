#!/usr/bin/env python3
"""A random checkpoint at a real model's depth and vocabulary, for the test that catches a
real-scale precision bias without a real checkpoint.

    /work/pyenv/bin/python scripts/make_deep_fixture.py

The tiny fixtures (2 layers, vocab 512) hid a bias that a 30-layer, 49k-vocabulary model
showed at once: a sequential f32 log-sum-exp dropped the small terms of a 49k-entry row.
This model has the depth and the vocabulary but almost no width, so it stays small:

  fixtures/models/llama-deep-50k/   LlamaForCausalLM, 24 layers, hidden 16, 2 heads, 1 kv
                                    head, intermediate 40, vocab 50,304 (the chatml fixture
                                    tokenizer's 483 tokens, the rest unused rows), tied, bf16
                                    storage; the LM head scaled so logits spread like a trained
                                    model's (a few far above a long tail)
  fixtures/expected/deep/llama-deep-50k__{plain,chat}.jsonl
                                    per-example summed completion log-probs in float64 and in
                                    float32 (transformers), the tokens, and the difference
                                    (transformers' own f32 error, which the test's bound uses)

Deterministic: fixed seeds, single-threaded CPU math.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_real_model import completion_logp  # noqa: E402
from make_fixtures import FIX, copy_tokenizer, dump_json, implicit_prompt, tokenize_example, tok_id  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

NAME = "llama-deep-50k"
SEED = 50_304


def build() -> Path:
    folder = FIX / "models" / NAME
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    chat = FIX / "tokenizers" / "chatml"
    cfg = LlamaConfig(
        vocab_size=50_304,
        hidden_size=16,
        num_hidden_layers=24,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=40,
        max_position_embeddings=512,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok_id(chat, "<|im_end|>"),
        pad_token_id=tok_id(chat, "<|endoftext|>"),
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if "norm" in name:
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif "embed_tokens" in name:
                # Tied: also the LM head. Rows of norm ~6 make logits of std ~6 over the
                # vocabulary: a few tokens tens of nats above a long tail, as in a trained model.
                v = 1.5 * torch.randn(p.shape, generator=g)
            else:
                v = 0.25 * torch.randn(p.shape, generator=g)
            p.copy_(v.to(torch.bfloat16).to(torch.float32))
    model.generation_config = GenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    model.to(torch.bfloat16).save_pretrained(str(folder))
    conf = json.loads((folder / "config.json").read_text())
    dump_json(folder / "config.json", dict(sorted(conf.items())))
    copy_tokenizer("chatml", folder)
    return folder


def expected(folder: Path) -> None:
    out = FIX / "expected" / "deep"
    out.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
    m32 = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    m64 = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(torch.float64).eval()
    for dataset in ["plain", "chat"]:
        rows = []
        for i, line in enumerate(open(FIX / "data" / f"{dataset}.jsonl", encoding="utf-8")):
            ex = json.loads(line)
            ex = ex if "prompt" in ex else implicit_prompt(ex)
            t = tokenize_example(tok, ex)
            row = {"index": i}
            for side, ids, start in (("chosen", t["chosen_ids"], t["a"]), ("rejected", t["rejected_ids"], t["b"])):
                f64, f32 = completion_logp(m64, ids, start), completion_logp(m32, ids, start)
                row[f"logp_{side}"] = f64
                row[f"logp_{side}_f32"] = f32
                row[f"n_tokens_{side}"] = len(ids) - start
            rows.append(row)
        path = out / f"{NAME}__{dataset}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        worst = max(abs(r[f"logp_{s}"] - r[f"logp_{s}_f32"]) for r in rows for s in ("chosen", "rejected"))
        print(f"{path.relative_to(FIX.parent)}: {len(rows)} rows, transformers f32 vs f64 max {worst:.2e}")


def main() -> None:
    folder = build()
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"{folder.relative_to(FIX.parent)}: {size / 1e6:.1f} MB")
    expected(folder)


if __name__ == "__main__":
    main()
