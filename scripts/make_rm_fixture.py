#!/usr/bin/env python3
"""Build the reward-model fixture of prefopt-loop's `rm:` judge.

Run from the repository root:

    /work/pyenv/bin/python scripts/make_rm_fixture.py

Writes (rerunning with the versions pinned in scripts/requirements.txt gives the same files):

  fixtures/models/qwen2-rm/         a tiny random Qwen2ForSequenceClassification (num_labels 1,
                                    pad_token_id 480 = <|endoftext|>, untied, 2 layers, hidden 32,
                                    4 heads, 2 kv heads, intermediate 64, vocab 512), saved with
                                    save_pretrained, plus the chatml tokenizer of
                                    fixtures/tokenizers/chatml
  fixtures/expected/rm_scores.json  transformers' reward for each case below: the token ids the
                                    model scores and `logits[0, 0]` of the classification model

How a (prompt, completion) pair becomes token ids is TRL's RewardTrainer convention (TRL 1.16):
  - plain text: prompt + completion, with the tokenizer's eos_token text appended to the
    completion unless it already ends with it, tokenized with the tokenizer's own special-token
    rule (`tokenizer(text=...)`);
  - conversation: the prompt messages plus `{"role": "assistant", "content": completion}`,
    rendered and tokenized by `apply_chat_template(tokenize=True)` (no generation prompt).
The reward is read where transformers reads it: at the rightmost token that is not
`config.pad_token_id`. The `ids` cases give token ids directly (trailing and inner pad tokens)
to pin that rule down.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
OUT_MODEL = FIX / "models" / "qwen2-rm"
OUT_EXPECTED = FIX / "expected" / "rm_scores.json"
TOKENIZER = FIX / "tokenizers" / "chatml"

PAD = 480  # <|endoftext|>, the chatml tokenizer's pad token

CASES = [
    {"name": "plain_arithmetic", "prompt": "What is 37 + 48?\n", "completion": "Answer: 85"},
    {"name": "plain_wrong", "prompt": "What is 37 + 48?\n", "completion": "Answer: 84"},
    {"name": "plain_reverse", "prompt": "Reverse the letters: abc\n", "completion": "Answer: cba"},
    # Already ends with the EOS text: TRL does not append a second one.
    {"name": "plain_has_eos", "prompt": "Hello", "completion": " world<|im_end|>"},
    # The pad token's text inside the completion: the reward is still read at the last token.
    {"name": "plain_inner_pad", "prompt": "Say hi", "completion": " hi<|endoftext|> there"},
    {
        "name": "chat_user",
        "prompt": [{"role": "user", "content": "What is 7 x 8?"}],
        "completion": "Answer: 56",
    },
    {
        "name": "chat_system",
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Which is larger, 17 or 42?"},
        ],
        "completion": "Answer: 42",
    },
    {
        "name": "chat_multi_turn",
        "prompt": [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello. How can I help?"},
            {"role": "user", "content": "Reverse the letters: xyz"},
        ],
        "completion": "Answer: zyx",
    },
]

# Token ids scored as given: right padding (trailing pad ids), a pad id inside, all pad.
ID_CASES = [
    {"name": "ids_right_padded", "input_ids": [87, 104, 97, 116, 32, 105, 115, PAD, PAD, PAD]},
    {"name": "ids_inner_pad", "input_ids": [72, 105, PAD, 33, 482, PAD]},
    {"name": "ids_all_pad", "input_ids": [PAD, PAD, PAD]},
]


def build_model() -> Qwen2ForSequenceClassification:
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
        num_labels=1,
        pad_token_id=PAD,
        bos_token_id=None,
        eos_token_id=482,
    )
    config.architectures = ["Qwen2ForSequenceClassification"]
    torch.manual_seed(20240611)
    model = Qwen2ForSequenceClassification(config).to(torch.float32)
    # Every weight random and O(1)-scaled so that rewards are O(1) and a 1e-4 check means
    # something (transformers' default init would give rewards of about 1e-3).
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(0.25 * torch.randn(p.shape, generator=gen))
            elif name == "score.weight":
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    model.eval()
    return model


def tokenize(tok, prompt, completion) -> list[int]:
    if isinstance(prompt, str):
        if not completion.endswith(tok.eos_token):
            completion = completion + tok.eos_token
        return list(tok(text=prompt + completion)["input_ids"])
    messages = prompt + [{"role": "assistant", "content": completion}]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def reward(model, ids: list[int]) -> float:
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0].item())


def main() -> None:
    if OUT_MODEL.exists():
        shutil.rmtree(OUT_MODEL)
    model = build_model()
    model.save_pretrained(OUT_MODEL, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / f, OUT_MODEL / f)

    tok = AutoTokenizer.from_pretrained(OUT_MODEL)
    model = Qwen2ForSequenceClassification.from_pretrained(OUT_MODEL, dtype=torch.float32)
    model.eval()

    cases = []
    for case in CASES:
        ids = tokenize(tok, case["prompt"], case["completion"])
        cases.append({**case, "input_ids": ids, "score": reward(model, ids)})
    for case in ID_CASES:
        cases.append({**case, "score": reward(model, case["input_ids"])})

    # A right-padded batch must give the same rewards (the Rust side batches this way).
    batch = [c["input_ids"] for c in cases]
    width = max(len(b) for b in batch)
    padded = torch.tensor([b + [PAD] * (width - len(b)) for b in batch])
    with torch.no_grad():
        batched = model(input_ids=padded).logits[:, 0].tolist()
    for c, b in zip(cases, batched):
        assert abs(c["score"] - b) < 1e-5, (c["name"], c["score"], b)

    scores = [c["score"] for c in cases]
    assert max(scores) - min(scores) > 0.5, f"rewards too alike to test anything: {scores}"
    expected = {
        "generated_by": "scripts/make_rm_fixture.py",
        "model": "fixtures/models/qwen2-rm",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "pad_token_id": PAD,
        "cases": cases,
    }
    # One case per line, so a diff shows which case changed.
    head = json.dumps({k: v for k, v in expected.items() if k != "cases"}, ensure_ascii=False)[:-1]
    lines = ",\n  ".join(json.dumps(c, ensure_ascii=False) for c in cases)
    OUT_EXPECTED.write_text(f'{head}, "cases": [\n  {lines}\n]}}\n')
    size = sum(f.stat().st_size for f in OUT_MODEL.iterdir())
    print(f"wrote {OUT_MODEL} ({size} bytes) and {OUT_EXPECTED} ({len(cases)} cases)")
    for c in cases:
        print(f"  {c['name']:>18}: {len(c['input_ids']):3d} tokens, reward {c['score']:+.6f}")


if __name__ == "__main__":
    main()
