#!/usr/bin/env python3
"""Check that a model folder written by prefopt (the Rust side) loads in Hugging Face transformers.

    /work/pyenv/bin/python scripts/check_saved_model.py DIR [--compare DIR2] [--atol 1e-4]

- Loads DIR with AutoModelForCausalLM (falling back to the class named in config.json's
  "architectures"), in float32, so bf16/f16 weights are upcast exactly.
- Checks the safetensors files (header metadata {"format": "pt"}, index consistency for
  sharded folders) and that the tokenizer, if present, loads.
- Runs two fixed inputs (12 ids, and 48 ids so RoPE scaling / long positions are exercised)
  and checks the logits are finite.
- With --compare DIR2: loads DIR2 the same way, compares parameter names/shapes, the max abs
  difference of every parameter (after upcast) and of the logits; fails if the logits differ
  by more than --atol (default 1e-4). If both folders have tokenizers, compares their ids on
  a few probe strings and their chat templates.

Prints a JSON summary on the last line; exits 0 on success, 1 on failure, 2 on usage errors.
Not run in CI; the Rust side calls it by hand.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

PROBE_SHORT = [5, 300, 17, 42, 479, 128, 255, 256, 64, 399, 11, 200]
PROBE_LONG = [(7 * i + 3) % 480 for i in range(48)]
TOKENIZER_PROBES = [
    "Hello world! How are you today?",
    "Spell cafe\u0301 and naïve  twice\n\nplease 12345",
    "日本語 👋",
]


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def check_files(folder: Path, problems: list[str]) -> None:
    if not (folder / "config.json").is_file():
        problems.append(f"{folder}: no config.json")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        problems.append(f"{folder}: no *.safetensors files")
    index = folder / "model.safetensors.index.json"
    keys_in_files: dict[str, str] = {}
    for f in files:
        h = safetensors_header(f)
        meta = h.pop("__metadata__", None) or {}
        if meta.get("format") != "pt":
            problems.append(f"{f.name}: safetensors metadata has no format=pt ({meta}); old transformers reject it")
        for k in h:
            if k in keys_in_files:
                problems.append(f"tensor {k} is stored twice ({keys_in_files[k]} and {f.name})")
            keys_in_files[k] = f.name
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
        for k, fname in wm.items():
            if keys_in_files.get(k) != fname:
                problems.append(f"index maps {k} to {fname} but it is in {keys_in_files.get(k)}")
        for k in keys_in_files:
            if k not in wm:
                problems.append(f"tensor {k} in {keys_in_files[k]} is missing from the index")
    elif len(files) > 1:
        problems.append(f"{folder}: {len(files)} safetensors files but no model.safetensors.index.json")


def load_model(folder: Path):
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - fall back to the class named in config.json
        cfg = AutoConfig.from_pretrained(str(folder))
        arch = (cfg.architectures or [None])[0]
        if arch is None or not hasattr(transformers, arch):
            raise RuntimeError(f"AutoModelForCausalLM failed ({e}) and config.json names no known class") from e
        model = getattr(transformers, arch).from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    return model


def logits_of(model, ids: list[int]) -> torch.Tensor:
    vocab = model.config.vocab_size
    ids = [i % vocab for i in ids]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def load_tokenizer(folder: Path):
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        return None
    return AutoTokenizer.from_pretrained(str(folder))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--compare", type=Path, default=None, help="reference folder to compare logits with")
    ap.add_argument("--atol", type=float, default=1e-4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    problems: list[str] = []
    summary: dict = {"dir": str(args.dir)}

    if not args.dir.is_dir():
        print(f"not a directory: {args.dir}", file=sys.stderr)
        return 2
    check_files(args.dir, problems)
    try:
        model = load_model(args.dir)
    except Exception as e:  # noqa: BLE001
        problems.append(f"transformers cannot load {args.dir}: {type(e).__name__}: {e}")
        summary["ok"] = False
        summary["problems"] = problems
        print(json.dumps(summary))
        return 1
    summary["class"] = type(model).__name__
    summary["n_params"] = sum(p.numel() for p in model.parameters())
    summary["tied"] = bool(getattr(model.config, "tie_word_embeddings", False))
    a_short = logits_of(model, PROBE_SHORT)
    a_long = logits_of(model, PROBE_LONG)
    if not (torch.isfinite(a_short).all() and torch.isfinite(a_long).all()):
        problems.append("non-finite logits")
    try:
        tok = load_tokenizer(args.dir)
        summary["tokenizer"] = None if tok is None else type(tok).__name__
    except Exception as e:  # noqa: BLE001
        tok = None
        problems.append(f"tokenizer does not load: {type(e).__name__}: {e}")

    if args.compare is not None:
        ref = load_model(args.compare)
        summary["compare"] = str(args.compare)
        sd, rsd = dict(model.named_parameters()), dict(ref.named_parameters())
        if set(sd) != set(rsd):
            problems.append(
                f"parameter names differ: only in dir {sorted(set(sd) - set(rsd))[:5]}, "
                f"only in reference {sorted(set(rsd) - set(sd))[:5]}"
            )
        worst = []
        for k in sorted(set(sd) & set(rsd)):
            if sd[k].shape != rsd[k].shape:
                problems.append(f"{k}: shape {tuple(sd[k].shape)} vs {tuple(rsd[k].shape)}")
                continue
            worst.append(((sd[k].float() - rsd[k].float()).abs().max().item(), k))
        worst.sort(reverse=True)
        summary["param_max_abs_diff"] = worst[0][0] if worst else None
        summary["param_worst"] = [[k, d] for d, k in worst[:5]]
        b_short = logits_of(ref, PROBE_SHORT)
        b_long = logits_of(ref, PROBE_LONG)
        if a_short.shape != b_short.shape:
            problems.append(f"logits shape {tuple(a_short.shape)} vs {tuple(b_short.shape)}")
        else:
            d = max((a_short - b_short).abs().max().item(), (a_long - b_long).abs().max().item())
            summary["logits_max_abs_diff"] = d
            print(f"max abs diff of logits vs {args.compare}: {d:.3e} (atol {args.atol:g})")
            if not d <= args.atol:
                problems.append(f"logits differ by {d:.3e} > {args.atol:g}")
        rtok = load_tokenizer(args.compare)
        if tok is not None and rtok is not None:
            for s in TOKENIZER_PROBES:
                for add in (True, False):
                    x = tok(s, add_special_tokens=add)["input_ids"]
                    y = rtok(s, add_special_tokens=add)["input_ids"]
                    if x != y:
                        problems.append(f"tokenizers disagree on {s!r} (add_special_tokens={add}): {x} vs {y}")
            if (tok.chat_template or None) != (rtok.chat_template or None):
                problems.append("chat templates differ")
            for attr in ("bos_token", "eos_token", "pad_token"):
                if getattr(tok, attr) != getattr(rtok, attr):
                    problems.append(f"{attr}: {getattr(tok, attr)!r} vs {getattr(rtok, attr)!r}")
    else:
        print(f"loaded {summary['class']} from {args.dir}: {summary['n_params']} parameters, logits finite")

    summary["ok"] = not problems
    summary["problems"] = problems
    for p in problems:
        print("FAIL:", p, file=sys.stderr)
    print(json.dumps(summary))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
