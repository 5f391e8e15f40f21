#!/usr/bin/env python3
"""Build prefopt's tiny deterministic test fixtures (Part 1: foundation fixtures).

Run from the repository root:

    /work/pyenv/bin/python scripts/make_fixtures.py

Everything under fixtures/ that this script owns is rewritten; rerunning it with the
pinned versions of scripts/requirements.txt gives byte-identical files (fixed seeds,
single-threaded CPU math, a pure-Python BPE trainer, hand-written JSON).

What it makes (see fixtures/README.md for the conventions):

  fixtures/tokenizers/chatml/   Qwen2-like byte-level BPE tokenizer (NFC + Qwen2 split
                                regex + ByteLevel, no BOS, ChatML template inside
                                tokenizer_config.json)
  fixtures/tokenizers/llama/    Llama-3-like byte-level BPE tokenizer (Llama-3 split regex,
                                ignore_merges, TemplateProcessing adds <|begin_of_text|>,
                                Llama-3 template in a separate chat_template.jinja)
  fixtures/models/<name>/       tiny random checkpoints (2 layers, hidden 64, 4 heads,
                                2 kv heads, intermediate 128, vocab 512), every weight random
                                (norms 1 + 0.1*randn, biases random), saved with
                                save_pretrained + tokenizer files + generation_config.json:
                                  llama-untied  LlamaForCausalLM f32, rope_theta 1e4, legacy config keys
                                  llama-tied    tied, bf16, sharded in 2 files, llama3 rope scaling,
                                                legacy config keys (rope_theta / rope_scaling / torch_dtype)
                                  qwen2-tied    Qwen2ForCausalLM, q/k/v bias, tied, f32, legacy keys,
                                                sliding_window 32 with use_sliding_window false (must be ignored)
                                  qwen2-untied  untied, f32, transformers-5 config layout (rope_parameters, dtype)
                                  mistral       MistralForCausalLM, head_dim 32 != 64/4, f32, transformers-5 layout
  fixtures/data/                plain.jsonl, chat.jsonl, chat_implicit.jsonl, plain.parquet,
                                chat.parquet, chat_bad_prefix.jsonl
  fixtures/expected/<model>__<dataset>__<maxlen>.jsonl
                                per-example token ids, completion starts and f32 HF log-probs
  fixtures/expected/<model>__logits.json
                                full logits of one fixed 12-token sequence
  fixtures/expected/<model>__chat_bad_prefix.json
                                what the bad-prefix example does with that model's template
  fixtures/manifest.json        versions used and the max_length values per dataset
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import unicodedata
from collections import Counter
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors  # noqa: E402
from tokenizers.models import BPE  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"

# --------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------

# Qwen2's split regex, exactly as in transformers' tokenization_qwen2.py and Qwen2's tokenizer.json
# (digits split one by one).
QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Llama-3's split regex, as in Meta-Llama-3's tokenizer.json (digits in groups of up to 3).
LLAMA3_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

BPE_VOCAB_SIZE = 480  # 256 bytes + 224 merges; special tokens get ids 480.. ; models have vocab 512

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

# Simplified Qwen2.5 ChatML template: default system message when the conversation does not
# start with one; every message is <|im_start|>role\ncontent<|im_end|>\n.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Llama-3 style template (content is trimmed, as in Meta's template); emits BOS itself.
LLAMA_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

# Small built-in corpus for the BPE merges. Plain ASCII prose, chat-shaped text, a little
# code, numbers and some non-ASCII text so that multi-byte characters appear in merges.
CORPUS = """
The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.
What is the capital of Spain? The capital of Spain is Madrid.
You are a helpful assistant. You are a helpful assistant that answers questions.
The user asks a question and the assistant answers the question with a short answer.
The answer is yes. The answer is no. The answer is blue. The sky is blue and the sea is blue.
Please write a short poem about the sea. Waves fold into foam, and the tide keeps its time.
Translate to German: good morning. Guten Morgen! Good night. Gute Nacht.
Translate to French: thank you. Merci beaucoup. The café is open. Le café est ouvert.
Summarize the following paragraph in one sentence. The committee met on Tuesday to review
the budget and discussed the proposals for the new library.
Compute 12 + 30. The result is 42. Compute 7 * 6. The result is 42. 100 - 58 = 42.
def add(a, b):
    return a + b

def mul(a, b):
    return a * b

for i in range(10):
    print(i)

system

You are a helpful assistant. Be brief. Be polite.

system
You answer in one word.
user
Is the sky blue?
assistant
Yes.

user

What is the capital of France?

assistant

The capital of France is Paris.

user

Thank you! That is a good answer.

assistant

You are welcome. I am happy to help.

Name a primary color. Red, blue and yellow are the primary colors.
The quick brown fox jumps over the lazy dog. The lazy dog sleeps in the sun.
I think that this is a good idea, but I am not sure. It is not a good idea.
Hello! How can I help you today? Hello, how are you? I am fine, thank you.
¿Cómo estás? Muy bien, gracias. Größe, Straße, Übung, naïve, résumé, déjà vu.
日本語のテキスト。ありがとうございます。こんにちは、世界。
Emoji: 👋 🙂 🚀. Math: α + β = γ, x² + y² = z².
The following sentence is short. Write the following sentence again. Review the budget.
The library is new. The committee will vote on the library budget next month.
Hi! Hello! How can I help you? Tell me a color. Tell me a number. Good night! Sleep well.
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def make_pre_tokenizer(regex: str):
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


def train_bpe(corpus: str, regex: str, normalize_nfc: bool, vocab_size: int):
    """Deterministic pure-Python byte-level BPE training (ties broken by the smallest pair)."""
    if normalize_nfc:
        corpus = unicodedata.normalize("NFC", corpus)
    pre = make_pre_tokenizer(regex)
    words = Counter()
    for piece, _ in pre.pre_tokenize_str(corpus):
        words[piece] += 1
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    seqs = {w: list(w) for w in words}
    merges = []
    while len(vocab) < vocab_size:
        pairs = Counter()
        for w, c in words.items():
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merged = best[0] + best[1]
        merges.append(best)
        vocab[merged] = len(vocab)
        for w in words:
            s = seqs[w]
            i = 0
            out = []
            while i < len(s):
                if i + 1 < len(s) and s[i] == best[0] and s[i + 1] == best[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return vocab, merges


def build_tokenizer(style: str) -> Tokenizer:
    if style == "chatml":
        regex, nfc, specials = QWEN2_REGEX, True, CHATML_SPECIALS
    else:
        regex, nfc, specials = LLAMA3_REGEX, False, LLAMA_SPECIALS
    vocab, merges = train_bpe(CORPUS, regex, nfc, BPE_VOCAB_SIZE)
    model = BPE(
        vocab=vocab,
        merges=merges,
        dropout=None,
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=(style == "llama"),  # Llama-3's tokenizer.json has ignore_merges: true
    )
    tok = Tokenizer(model)
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = make_pre_tokenizer(regex)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if style == "chatml":
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    else:
        bos = "<|begin_of_text|>"
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
                processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0",
                    pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                    special_tokens=[(bos, bos_id)],
                ),
            ]
        )
    return tok


def dump_json(path: Path, obj, indent=2):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False, sort_keys=False)
        f.write("\n")


def added_tokens_decoder(tok: Tokenizer, specials: list[str]) -> dict:
    out = {}
    for s in specials:
        out[str(tok.token_to_id(s))] = {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    return out


TOKENIZER_SETTINGS = {
    "chatml": {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
    },
    "llama": {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": None,
        "unk_token": None,
    },
}


def write_tokenizer(style: str, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(style)
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
    # the Python binding ignores the ByteLevel decoder's flags; write them as Qwen2's file has them
    # (they do not change decoding)
    tj = json.loads((out_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tj["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    dump_json(out_dir / "tokenizer.json", tj)
    st = TOKENIZER_SETTINGS[style]
    if style == "chatml":
        cfg = {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added_tokens_decoder(tok, CHATML_SPECIALS),
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": None,
            "chat_template": CHATML_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": st["eos_token"],
            "errors": "replace",
            "model_max_length": 256,
            "pad_token": st["pad_token"],
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        }
        dump_json(out_dir / "tokenizer_config.json", cfg)
    else:
        cfg = {
            "added_tokens_decoder": added_tokens_decoder(tok, LLAMA_SPECIALS),
            "bos_token": st["bos_token"],
            "clean_up_tokenization_spaces": False,
            "eos_token": st["eos_token"],
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 256,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        dump_json(out_dir / "tokenizer_config.json", cfg)
        with open(out_dir / "chat_template.jinja", "w", encoding="utf-8") as f:
            f.write(LLAMA_TEMPLATE)


def load_tokenizer(folder: Path):
    """The tokenizer as the reference sees it: AutoTokenizer on the folder.

    Checked against PreTrainedTokenizerFast(tokenizer_file=...) in verify_tokenizer()."""
    return AutoTokenizer.from_pretrained(str(folder))


TOKENIZER_PROBES = [
    "Hello world! How are you today?",
    "The capital of France is Paris.<|im_end|>",
    "Spell cafe\u0301 and caf\u00e9 and na\u00efve   with  spaces\n\n\nand newlines\r\n",
    "日本語のテキスト 👋🚀 ¿Cómo? x² 1234567 12+30=42",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "  leading spaces and trailing ones   ",
    "don't I'LL we've 'S",
]


def verify_tokenizer(folder: Path) -> None:
    auto = AutoTokenizer.from_pretrained(str(folder))
    raw = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    core = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for s in TOKENIZER_PROBES:
        for add in (True, False):
            a = auto(s, add_special_tokens=add)["input_ids"]
            b = raw(s, add_special_tokens=add)["input_ids"]
            c = core.encode(s, add_special_tokens=add).ids
            if not (a == b == c):
                raise SystemExit(f"tokenizer mismatch in {folder} for {s!r} add={add}:\n{a}\n{b}\n{c}")
        if auto.decode(auto(s, add_special_tokens=False)["input_ids"]) != (
            unicodedata.normalize("NFC", s) if core.normalizer is not None else s
        ):
            raise SystemExit(f"decode round trip failed in {folder} for {s!r}")


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=256,
    hidden_act="silu",
    attention_dropout=0.0,
    initializer_range=0.02,
    use_cache=True,
)

EMBED_STD = 0.25
LINEAR_STD = 0.12
BIAS_STD = 0.1
NORM_NOISE = 0.1


def tok_id(folder: Path, token: str) -> int:
    return Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id(token)


def model_specs():
    chat_dir = FIX / "tokenizers" / "chatml"
    llama_dir = FIX / "tokenizers" / "llama"
    l_bos = tok_id(llama_dir, "<|begin_of_text|>")
    l_eot = tok_id(llama_dir, "<|eot_id|>")
    l_eos = tok_id(llama_dir, "<|end_of_text|>")
    q_end = tok_id(chat_dir, "<|endoftext|>")
    q_imend = tok_id(chat_dir, "<|im_end|>")
    llama_gen = dict(bos_token_id=l_bos, eos_token_id=[l_eot, l_eos], do_sample=True, temperature=0.6, top_p=0.9)
    qwen_gen = dict(
        bos_token_id=q_end,
        pad_token_id=q_end,
        eos_token_id=[q_imend, q_end],
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.05,
    )
    return [
        dict(
            name="llama-untied",
            seed=1001,
            cls=LlamaForCausalLM,
            config=LlamaConfig(
                **COMMON,
                tie_word_embeddings=False,
                rope_theta=10000.0,
                rms_norm_eps=1e-5,
                attention_bias=False,
                mlp_bias=False,
                bos_token_id=l_bos,
                eos_token_id=l_eot,
            ),
            tokenizer="llama",
            dtype=torch.float32,
            shard=None,
            legacy=True,
            rope_legacy=dict(rope_theta=10000.0, rope_scaling=None),
            gen=llama_gen,
        ),
        dict(
            name="llama-tied",
            seed=1002,
            cls=LlamaForCausalLM,
            config=LlamaConfig(
                **COMMON,
                tie_word_embeddings=True,
                rope_theta=500000.0,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32,
                },
                rms_norm_eps=1e-5,
                attention_bias=False,
                mlp_bias=False,
                bos_token_id=l_bos,
                eos_token_id=[l_eot, l_eos],
            ),
            tokenizer="llama",
            dtype=torch.bfloat16,
            shard="160KB",
            legacy=True,
            rope_legacy=dict(
                rope_theta=500000.0,
                rope_scaling={
                    "factor": 8.0,
                    "high_freq_factor": 4.0,
                    "low_freq_factor": 1.0,
                    "original_max_position_embeddings": 32,
                    "rope_type": "llama3",
                },
            ),
            gen=llama_gen,
        ),
        dict(
            name="qwen2-tied",
            seed=1003,
            cls=Qwen2ForCausalLM,
            config=Qwen2Config(
                **COMMON,
                tie_word_embeddings=True,
                rope_theta=1000000.0,
                rms_norm_eps=1e-6,
                use_sliding_window=False,
                sliding_window=None,
                max_window_layers=2,
                bos_token_id=q_end,
                eos_token_id=q_imend,
            ),
            tokenizer="chatml",
            dtype=torch.float32,
            shard=None,
            legacy=True,
            rope_legacy=dict(rope_theta=1000000.0, rope_scaling=None),
            # Qwen2.5 checkpoints ship sliding_window set while use_sliding_window is false:
            # a correct loader ignores it (checked below: logits unchanged).
            legacy_extra=dict(sliding_window=32, use_sliding_window=False, max_window_layers=2),
            gen=qwen_gen,
        ),
        dict(
            name="qwen2-untied",
            seed=1004,
            cls=Qwen2ForCausalLM,
            config=Qwen2Config(
                **COMMON,
                tie_word_embeddings=False,
                rope_theta=1000000.0,
                rms_norm_eps=1e-6,
                use_sliding_window=False,
                sliding_window=None,
                max_window_layers=2,
                bos_token_id=q_end,
                eos_token_id=q_imend,
            ),
            tokenizer="chatml",
            dtype=torch.float32,
            shard=None,
            legacy=False,
            gen=qwen_gen,
        ),
        dict(
            name="mistral",
            seed=1005,
            cls=MistralForCausalLM,
            config=MistralConfig(
                **COMMON,
                head_dim=32,
                tie_word_embeddings=False,
                rope_theta=10000.0,
                rms_norm_eps=1e-5,
                sliding_window=None,
                bos_token_id=l_bos,
                eos_token_id=l_eot,
            ),
            tokenizer="llama",
            dtype=torch.float32,
            shard=None,
            legacy=False,
            gen=llama_gen,
        ),
    ]


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded random values (not the default init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):  # tied weights appear once
            shape = p.shape
            if name.endswith("norm.weight") or "layernorm" in name:
                v = 1.0 + NORM_NOISE * torch.randn(shape, generator=g, dtype=torch.float32)
            elif name.endswith(".bias"):
                v = BIAS_STD * torch.randn(shape, generator=g, dtype=torch.float32)
            elif "embed_tokens" in name:
                v = EMBED_STD * torch.randn(shape, generator=g, dtype=torch.float32)
            elif "lm_head" in name:
                v = 0.25 * torch.randn(shape, generator=g, dtype=torch.float32)
            else:
                v = LINEAR_STD * torch.randn(shape, generator=g, dtype=torch.float32)
            p.copy_(v)


def legacy_config(folder: Path, spec: dict) -> None:
    """Rewrite config.json in the pre-transformers-5 layout used by most Hub checkpoints:
    rope_theta / rope_scaling at top level and torch_dtype instead of dtype."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("rope_parameters", None)
    cfg.pop("layer_types", None)
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    cfg.update(spec["rope_legacy"])
    cfg.update(spec.get("legacy_extra", {}))
    cfg = dict(sorted(cfg.items()))
    dump_json(path, cfg)


def copy_tokenizer(style: str, folder: Path) -> None:
    src = FIX / "tokenizers" / style
    for f in sorted(src.iterdir()):
        shutil.copyfile(f, folder / f.name)


def build_model(spec: dict) -> None:
    folder = FIX / "models" / spec["name"]
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    torch.manual_seed(spec["seed"])
    model = spec["cls"](spec["config"])
    model.eval()
    randomize_(model, spec["seed"])
    if spec["config"].tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.generation_config = GenerationConfig(**spec["gen"])
    if spec["dtype"] != torch.float32:
        # round the weights to the storage dtype first, so the in-memory f32 model is exactly
        # what the folder holds (casting the whole module would also round the rotary buffers)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(spec["dtype"]).to(torch.float32))
    probe = torch.tensor([LOGITS_PROBE_IDS])
    long = torch.arange(3, 3 + 60).remainder(440).unsqueeze(0)
    with torch.no_grad():
        a = model(probe).logits
        c = model(long).logits
    kwargs = {}
    if spec["shard"]:
        kwargs["max_shard_size"] = spec["shard"]
    model.to(spec["dtype"]).save_pretrained(str(folder), **kwargs)
    if spec["legacy"]:
        legacy_config(folder, spec)
    else:
        # stable key order
        cfg = json.loads((folder / "config.json").read_text())
        dump_json(folder / "config.json", dict(sorted(cfg.items())))
    copy_tokenizer(spec["tokenizer"], folder)
    # sanity: the folder reloads (f32) to the same function as the in-memory model, including
    # a 60-token sequence (llama3 rope scaling, qwen2's ignored sliding_window 32)
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    reloaded.eval()
    with torch.no_grad():
        b = reloaded(probe).logits
        d = reloaded(long).logits
    diff = max((a - b).abs().max().item(), (c - d).abs().max().item())
    if diff != 0.0:
        raise SystemExit(f"{spec['name']}: reloaded model differs from the saved one by {diff}")
    size = sum(f.stat().st_size for f in folder.iterdir())
    if size > 2_000_000:
        raise SystemExit(f"{spec['name']}: folder is {size} bytes")


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------

PLAIN = [
    {
        "prompt": "What is the capital of France?",
        "chosen": " The capital of France is Paris.",
        "rejected": " The capital of France is Lyon, I think.",
    },
    {
        "prompt": "Translate to German: good morning",
        "chosen": " Guten Morgen!",
        "rejected": " Gute Nacht.",
    },
    {
        "prompt": "Write a short poem about the sea.\n",
        "chosen": "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time.",
        "rejected": "The sea is big and blue.",
    },
    {
        # prompt ends with a space: " blue" merges across the boundary, so the prompt's last
        # token is not a prefix of prompt+completion (completion start < len(prompt_ids)).
        "prompt": "Complete the sentence: The sky is ",
        "chosen": "blue during a clear day.",
        "rejected": "green.",
    },
    {
        "prompt": "¿Cómo se dice «gracias» en japonés?",
        "chosen": " ありがとう (arigatō).",
        "rejected": " さようなら 👋",
    },
    {
        "prompt": "Compute 12 + 30.",
        "chosen": " 12 + 30 = 42.",
        "rejected": " 12 + 30 = 43.",
    },
    {
        # long prompt: dropped at the small max_length
        "prompt": "Summarize the following paragraph in one sentence: The committee met on Tuesday to review "
        "the budget, discussed three proposals for the new library, and agreed to postpone the final vote.",
        "chosen": " The committee postponed its vote on the library.",
        "rejected": " They met.",
    },
    {
        # decomposed e + combining acute (NFC-normalized by the chatml tokenizer, not by the llama one);
        # its prompt is exactly 24 chatml tokens (dropped at max_length 24: the >= boundary)
        "prompt": "Spell out the word cafe\u0301 with its accent.",
        "chosen": " c-a-f-e\u0301",
        "rejected": " c-a-f-e",
    },
    {
        "prompt": "def add(a, b):\n",
        "chosen": "    return a + b\n",
        "rejected": "    return a - b  # wrong\n",
    },
    {
        "prompt": "Name a primary color.",
        "chosen": " Red.",
        "rejected": " Red, or maybe purple, or perhaps something else entirely; colors are hard.",
    },
    {
        "prompt": "Hi",
        "chosen": " Hello! How can I help you today?",
        "rejected": " Go away.",
    },
    {
        # 24 llama tokens with BOS (dropped at 24: the >= boundary), 23 chatml tokens (kept at 24 with a
        # single completion token)
        "prompt": "Add 123, 456 and 789 together.",
        "chosen": " 123 + 456 + 789 = 1368.",
        "rejected": " 1000.",
    },
]


def msg(role, content):
    return {"role": role, "content": content}


CHAT = [
    {
        "prompt": [msg("user", "What is the capital of France?")],
        "chosen": [msg("assistant", "The capital of France is Paris.")],
        "rejected": [msg("assistant", "The capital of France is Lyon, I think.")],
    },
    {
        "prompt": [msg("system", "You answer in one word."), msg("user", "Is the sky blue?")],
        "chosen": [msg("assistant", "Yes.")],
        "rejected": [msg("assistant", "No.")],
    },
    {
        "prompt": [
            msg("user", "What is the capital of Germany?"),
            msg("assistant", "The capital of Germany is Berlin."),
            msg("user", "And of Italy?"),
        ],
        "chosen": [msg("assistant", "The capital of Italy is Rome.")],
        "rejected": [msg("assistant", "Berlin again.")],
    },
    {
        "prompt": [msg("user", "Say thank you in Japanese.")],
        "chosen": [msg("assistant", "ありがとうございます 🙂")],
        "rejected": [msg("assistant", "Merci beaucoup.")],
    },
    {
        "prompt": [msg("user", "Compute 7 * 6.")],
        "chosen": [msg("assistant", "7 * 6 = 42.")],
        "rejected": [msg("assistant", "7 * 6 = 36, or maybe 48; I am not sure which one it is.")],
    },
    {
        # long prompt (system + multi-turn): dropped at the small max_length
        "prompt": [
            msg("system", "You are a helpful assistant that answers questions about libraries and budgets."),
            msg("user", "Summarize: The committee met on Tuesday to review the budget."),
            msg("assistant", "The committee reviewed the budget on Tuesday."),
            msg("user", "Shorter, please."),
        ],
        "chosen": [msg("assistant", "Budget reviewed.")],
        "rejected": [msg("assistant", "The committee met.")],
    },
    {
        "prompt": [msg("user", "Write a short poem about the sea.")],
        "chosen": [msg("assistant", "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time.")],
        "rejected": [msg("assistant", "The sea is big.")],
    },
    {
        "prompt": [msg("system", "Be brief."), msg("user", "Spell cafe\u0301.")],
        "chosen": [msg("assistant", "c-a-f-e\u0301")],
        "rejected": [msg("assistant", "  c-a-f-e  ")],  # surrounding spaces: trimmed by the llama template only
    },
    {
        "prompt": [msg("user", "Hi")],
        "chosen": [msg("assistant", "Hello! How can I help you today?")],
        "rejected": [msg("assistant", "Go away.")],
    },
    {
        "prompt": [msg("user", "Name a primary color.")],
        "chosen": [msg("assistant", "Red.")],
        "rejected": [msg("assistant", "Red, or maybe purple, or perhaps something else entirely.")],
    },
]

# Implicit prompt: whole conversations; the prompt is the longest common leading run of messages.
CHAT_IMPLICIT = [
    {"chosen": ex["prompt"] + ex["chosen"], "rejected": ex["prompt"] + ex["rejected"]} for ex in CHAT[:8]
] + [
    {
        # multi-turn: the conversations share user / assistant / user turns and differ in the last answer
        "chosen": [
            msg("user", "Hello!"),
            msg("assistant", "Hi! How can I help you?"),
            msg("user", "Tell me a color."),
            msg("assistant", "Blue."),
        ],
        "rejected": [
            msg("user", "Hello!"),
            msg("assistant", "Hi! How can I help you?"),
            msg("user", "Tell me a color."),
            msg("assistant", "42, which is not a color at all."),
        ],
    },
    {
        "chosen": [msg("system", "Be polite."), msg("user", "Good night."), msg("assistant", "Good night! Sleep well.")],
        "rejected": [msg("system", "Be polite."), msg("user", "Good night."), msg("assistant", "Whatever.")],
    },
]

# The completion starts with a newline: for ChatML the prompt ends with "assistant\n" and
# "\n" + "\nSure" pre-tokenizes as one "\n\n" piece that BPE merges into a single token, so
# the prompt's tokens are not a prefix of the conversation's tokens -> must be an error.
CHAT_BAD_PREFIX = [
    {
        "prompt": [msg("user", "Say hello.")],
        "chosen": [msg("assistant", "\nHello!")],
        "rejected": [msg("assistant", "Goodbye.")],
    }
]

# The small max_length per dataset (none is the other setting).
SMALL_MAX_LENGTH = {"plain": 24, "chat": 32, "chat_implicit": 32}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_datasets() -> None:
    d = FIX / "data"
    write_jsonl(d / "plain.jsonl", PLAIN)
    write_jsonl(d / "chat.jsonl", CHAT)
    write_jsonl(d / "chat_implicit.jsonl", CHAT_IMPLICIT)
    write_jsonl(d / "chat_bad_prefix.jsonl", CHAT_BAD_PREFIX)
    import pyarrow as pa
    import pyarrow.parquet as pq

    plain = pa.table(
        {
            "prompt": pa.array([r["prompt"] for r in PLAIN], pa.string()),
            "chosen": pa.array([r["chosen"] for r in PLAIN], pa.string()),
            "rejected": pa.array([r["rejected"] for r in PLAIN], pa.string()),
        }
    )
    msg_t = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    chat = pa.table(
        {
            "prompt": pa.array([r["prompt"] for r in CHAT], msg_t),
            "chosen": pa.array([r["chosen"] for r in CHAT], msg_t),
            "rejected": pa.array([r["rejected"] for r in CHAT], msg_t),
        }
    )
    for name, table in (("plain", plain), ("chat", chat)):
        pq.write_table(table, d / f"{name}.parquet", compression="snappy", write_statistics=False)
        back = pq.read_table(d / f"{name}.parquet").to_pylist()
        assert back == (PLAIN if name == "plain" else CHAT), f"{name}.parquet round trip"


# --------------------------------------------------------------------------------------
# Expected numbers
# --------------------------------------------------------------------------------------


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def implicit_prompt(example: dict) -> dict:
    """Longest common leading run of whole messages (TRL's extract_prompt for conversations)."""
    c, r = example["chosen"], example["rejected"]
    n = 0
    while n < min(len(c), len(r)) and c[n] == r[n]:
        n += 1
    return {"prompt": c[:n], "chosen": c[n:], "rejected": r[n:]}


class PrefixError(Exception):
    pass


def tokenize_example(tok, example: dict) -> dict:
    """methods.md section 1. Returns prompt ids, full chosen/rejected ids and completion starts."""
    if isinstance(example["chosen"], str):
        eos = tok.eos_token
        chosen = example["chosen"] if example["chosen"].endswith(eos) else example["chosen"] + eos
        rejected = example["rejected"] if example["rejected"].endswith(eos) else example["rejected"] + eos
        p = tok(example["prompt"], add_special_tokens=True)["input_ids"]
        c = tok(example["prompt"] + chosen, add_special_tokens=True)["input_ids"]
        r = tok(example["prompt"] + rejected, add_special_tokens=True)["input_ids"]
        a = common_prefix_length(p, c)
        b = common_prefix_length(p, r)
    else:
        p_text = tok.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
        c_text = tok.apply_chat_template(example["prompt"] + example["chosen"], tokenize=False)
        r_text = tok.apply_chat_template(example["prompt"] + example["rejected"], tokenize=False)
        p = tok(p_text, add_special_tokens=False)["input_ids"]
        c = tok(c_text, add_special_tokens=False)["input_ids"]
        r = tok(r_text, add_special_tokens=False)["input_ids"]
        for name, full in (("chosen", c), ("rejected", r)):
            if full[: len(p)] != p:
                raise PrefixError(
                    f"the {name} conversation's tokens do not start with the prompt's tokens "
                    f"(common prefix {common_prefix_length(p, full)} of {len(p)} prompt tokens)"
                )
        a = b = len(p)
    return {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r, "a": a, "b": b}


def sequence_logp(model, ids: list[int], start: int) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    tgt = torch.tensor(ids[start:])
    vals = logp[start - 1 : len(ids) - 1].gather(1, tgt.unsqueeze(1)).squeeze(1)
    return float(vals.double().sum().item())


def expected_rows(model, tok, examples: list[dict], max_length: int | None) -> list[dict]:
    rows = []
    for i, ex in enumerate(examples):
        if "prompt" not in ex:
            ex = implicit_prompt(ex)
        t = tokenize_example(tok, ex)
        p, c, r, a, b = t["prompt_ids"], t["chosen_ids"], t["rejected_ids"], t["a"], t["b"]
        assert a == b, f"example {i}: chosen and rejected completion starts differ ({a} vs {b})"
        assert a >= 1, f"example {i}: empty prompt"
        if max_length is not None:
            if len(p) >= max_length:
                rows.append({"index": i, "dropped": f"prompt has {len(p)} tokens, max_length is {max_length}"})
                continue
            c = c[:max_length]
            r = r[:max_length]
        rows.append(
            {
                "index": i,
                "prompt_ids": p,
                "chosen_ids": c,
                "rejected_ids": r,
                "chosen_completion_start": a,
                "rejected_completion_start": b,
                "logp_chosen": sequence_logp(model, c, a),
                "logp_rejected": sequence_logp(model, r, b),
                "n_tokens_chosen": len(c) - a,
                "n_tokens_rejected": len(r) - b,
            }
        )
    return rows


LOGITS_PROBE_IDS = [480, 5, 300, 17, 42, 479, 128, 511, 256, 64, 399, 11]  # BOS-ish special first, 511 = unused model row


def write_expected(spec: dict, stats: dict) -> None:
    name = spec["name"]
    folder = FIX / "models" / name
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    tok = load_tokenizer(folder)
    out = FIX / "expected"
    datasets = {"plain": PLAIN, "chat": CHAT, "chat_implicit": CHAT_IMPLICIT}
    for ds, examples in datasets.items():
        for ml in (None, SMALL_MAX_LENGTH[ds]):
            rows = expected_rows(model, tok, examples, ml)
            tag = "none" if ml is None else str(ml)
            write_jsonl(out / f"{name}__{ds}__{tag}.jsonl", rows)
            kept = [r for r in rows if "dropped" not in r]
            stats.setdefault(f"{name}__{ds}__{tag}", {})
            st = stats[f"{name}__{ds}__{tag}"]
            st["dropped"] = len(rows) - len(kept)
            if ml is not None:
                untrunc = expected_rows_lengths(tok, examples)
                st["truncated_completions"] = sum(
                    1
                    for r in kept
                    for side in ("chosen", "rejected")
                    if len(r[f"{side}_ids"]) < untrunc[r["index"]][side]
                )
                if st["dropped"] < 1 or st["truncated_completions"] < 1:
                    raise SystemExit(f"{name}/{ds}/{ml}: need a drop and a truncation, got {st}")
            if ml is not None:
                lens = expected_prompt_lengths(tok, examples)
                st["prompt_len_eq_max_length"] = sum(1 for n in lens if n == ml)
                st["one_token_completion"] = sum(
                    1 for r in kept for side in ("chosen", "rejected") if r[f"n_tokens_{side}"] == 1
                )
            st["boundary_merges"] = sum(1 for r in kept if r["chosen_completion_start"] < len(r["prompt_ids"]))
    with torch.no_grad():
        logits = model(torch.tensor([LOGITS_PROBE_IDS])).logits[0].float()
    dump_json(
        out / f"{name}__logits.json",
        {"input_ids": LOGITS_PROBE_IDS, "logits": [[float(x) for x in row] for row in logits.tolist()]},
        indent=None,
    )
    # the bad-prefix example
    ex = CHAT_BAD_PREFIX[0]
    try:
        t = tokenize_example(tok, ex)
        res = {"error": None, "prompt_ids": t["prompt_ids"], "chosen_ids": t["chosen_ids"], "rejected_ids": t["rejected_ids"]}
    except PrefixError as e:
        p_text = tok.apply_chat_template(ex["prompt"], tokenize=False, add_generation_prompt=True)
        c_text = tok.apply_chat_template(ex["prompt"] + ex["chosen"], tokenize=False)
        res = {
            "error": str(e),
            "prompt_ids": tok(p_text, add_special_tokens=False)["input_ids"],
            "chosen_ids": tok(c_text, add_special_tokens=False)["input_ids"],
        }
    dump_json(out / f"{name}__chat_bad_prefix.json", {"index": 0, **res}, indent=None)
    stats[f"{name}__chat_bad_prefix"] = "error" if res["error"] else "ok"


def expected_prompt_lengths(tok, examples):
    out = []
    for ex in examples:
        if "prompt" not in ex:
            ex = implicit_prompt(ex)
        out.append(len(tokenize_example(tok, ex)["prompt_ids"]))
    return out


def expected_rows_lengths(tok, examples):
    out = []
    for ex in examples:
        if "prompt" not in ex:
            ex = implicit_prompt(ex)
        t = tokenize_example(tok, ex)
        out.append({"chosen": len(t["chosen_ids"]), "rejected": len(t["rejected_ids"])})
    return out


def main() -> None:
    FIX.mkdir(exist_ok=True)
    # Remove only what this script makes: other scripts own other folders under fixtures/
    # (expected/train/, expected/generate/, expected/optim/, ...). Model folders are replaced in
    # build_model(); data files are overwritten.
    for style in ("chatml", "llama"):
        if (FIX / "tokenizers" / style).exists():
            shutil.rmtree(FIX / "tokenizers" / style)
    model_names = ["llama-untied", "llama-tied", "qwen2-tied", "qwen2-untied", "mistral"]
    for name in model_names:
        for f in (FIX / "expected").glob(f"{name}__*"):
            if f.is_file():
                f.unlink()
    for style in ("chatml", "llama"):
        write_tokenizer(style, FIX / "tokenizers" / style)
        verify_tokenizer(FIX / "tokenizers" / style)
    write_datasets()
    stats: dict = {}
    specs = model_specs()
    assert [sp["name"] for sp in specs] == model_names
    for spec in specs:
        build_model(spec)
        verify_tokenizer(FIX / "models" / spec["name"])
        write_expected(spec, stats)
    manifest = {
        "generated_by": "scripts/make_fixtures.py",
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
        },
        "small_max_length": SMALL_MAX_LENGTH,
        "tokenizers": TOKENIZER_SETTINGS,
        "stats": stats,
    }
    dump_json(FIX / "manifest.json", manifest)
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
