#!/usr/bin/env python3
"""Greedy generations of transformers on the fixture models, for prefopt's generation tests.

Run from the repository root (after scripts/make_fixtures.py made fixtures/models):

    /work/pyenv/bin/python scripts/make_generate_fixtures.py

Writes fixtures/expected/generate/<model>.json for each fixture model:

  prompts       token-id prompts of several lengths (ordinary ids < 480, fixed generator)
  stop_ids      generation_config.json's eos_token_id list (what generation stops on)
  max_new_tokens
  tokens        model.generate(do_sample=False, max_new_tokens, eos_token_id=stop_ids) for
                each prompt ALONE (no padding), the stop token included when hit
  stopped       whether each generation ended on a stop id
  logprob       sum over the generated tokens of log_softmax(raw logits) (output_logits),
                accumulated in float64
  min_margin    smallest gap between the best and second-best logit along all greedy paths;
                prefopt must agree on every argmax, which is safe while this is >> 1e-5

and fixtures/expected/generate/warpers.json: for qwen2-tied's next-token logits after each
prompt, and several (temperature, top_k, top_p), the tokens that transformers'
TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper keep and their probabilities
(softmax of the warped logits), with `boundary_gap`, the smallest distance of an ascending
cumulative probability to 1 - top_p (membership is unambiguous while it is >> 1e-6).

The Rust test (crates/prefopt-model/tests/generate.rs) generates all prompts of a model in ONE
left-padded batch and must reproduce the tokens exactly and the log-probs to 1e-4. Rerunning
with the pinned versions (scripts/requirements.txt) gives byte-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["llama-untied", "llama-tied", "qwen2-tied", "qwen2-untied", "mistral"]
PROMPT_LENGTHS = [1, 4, 9, 17, 30]
MAX_NEW_TOKENS = 40
WARPER_MODEL = "qwen2-tied"
WARPER_SETTINGS = [(0.7, 20, 0.8), (1.0, 0, 0.9), (1.3, 50, 1.0), (0.5, 0, 0.5), (2.0, 100, 0.95)]


def prompt_ids(length: int, salt: int) -> list[int]:
    """A 64-bit LCG, the same numbers as `ids()` in the Rust test."""
    mask = (1 << 64) - 1
    a, c = 6364136223846793005, 1442695040888963407
    x = (salt * a + c) & mask
    out = []
    for _ in range(length):
        x = (x * a + c) & mask
        out.append((x >> 33) % 480)
    return out


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    out_dir = ROOT / "fixtures" / "expected" / "generate"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in MODELS:
        folder = ROOT / "fixtures" / "models" / name
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        gen = json.loads((folder / "generation_config.json").read_text())
        stop_ids = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            eos_token_id=stop_ids,
            pad_token_id=stop_ids[0],
            bos_token_id=gen.get("bos_token_id"),
            # transformers merges the model's generation_config.json into unset fields;
            # pin every logits processor off (qwen2 fixtures set repetition_penalty 1.05).
            repetition_penalty=1.0,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            return_dict_in_generate=True,
            output_logits=True,
        )
        prompts = [prompt_ids(n, 100 + i) for i, n in enumerate(PROMPT_LENGTHS)]
        tokens, stopped, logprobs = [], [], []
        min_margin = float("inf")
        for ids in prompts:
            with torch.no_grad():
                res = model.generate(
                    torch.tensor([ids]),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    generation_config=config,
                )
            new = res.sequences[0, len(ids):].tolist()
            total = 0.0
            for step, tok in enumerate(new):
                logits = res.logits[step][0].double()
                total += torch.log_softmax(logits, -1)[tok].item()
                top2 = torch.topk(res.logits[step][0], 2).values
                min_margin = min(min_margin, (top2[0] - top2[1]).item())
            tokens.append(new)
            stopped.append(bool(new) and new[-1] in stop_ids)
            logprobs.append(total)
        lines = [
            f'  "model": {json.dumps(name)}',
            f'  "max_new_tokens": {MAX_NEW_TOKENS}',
            f'  "stop_ids": {json.dumps(stop_ids)}',
            '  "prompts": [\n' + ",\n".join(f"    {json.dumps(p)}" for p in prompts) + "\n  ]",
            '  "tokens": [\n' + ",\n".join(f"    {json.dumps(t)}" for t in tokens) + "\n  ]",
            f'  "stopped": {json.dumps(stopped)}',
            f'  "logprob": {json.dumps([round(x, 6) for x in logprobs])}',
            f'  "min_margin": {min_margin:.3e}',
        ]
        (out_dir / f"{name}.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
        print(f"{name}: {sum(map(len, tokens))} tokens, stopped {stopped}, min margin {min_margin:.2e}")
        if name == WARPER_MODEL:
            write_warpers(model, prompts, out_dir / "warpers.json")


def write_warpers(model, prompts: list[list[int]], path: Path) -> None:
    cases = []
    for index, ids in enumerate(prompts):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[:, -1, :]  # (1, V)
        for temperature, top_k, top_p in WARPER_SETTINGS:
            scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
            if top_k > 0:
                scores = TopKLogitsWarper(top_k)(None, scores)
            gap = float("inf")
            if top_p < 1.0:
                cum = torch.sort(scores, descending=False)[0].softmax(-1).cumsum(-1)[0]
                finite = cum[cum > 0]
                gap = (finite - (1 - top_p)).abs().min().item()
                scores = TopPLogitsWarper(top_p)(None, scores)
            probs = scores.double().softmax(-1)[0]
            kept = torch.nonzero(torch.isfinite(scores[0])).flatten().tolist()
            cases.append(
                f'    {{"prompt": {index}, "temperature": {temperature}, "top_k": {top_k}, "top_p": {top_p}, '
                f'"boundary_gap": {"null" if gap == float("inf") else f"{gap:.3e}"},\n     "tokens": {json.dumps(kept)},\n'
                f'     "probs": {json.dumps([round(probs[t].item(), 8) for t in kept])}}}'
            )
    path.write_text(f'{{\n  "model": "{WARPER_MODEL}",\n  "cases": [\n' + ",\n".join(cases) + "\n  ]\n}\n")


if __name__ == "__main__":
    main()
