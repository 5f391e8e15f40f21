#!/usr/bin/env python3
"""A short APO loop against a real `transformers serve` (not run by CI).

    /work/pyenv/bin/python scripts/check_servers.py [--prefopt target/release/prefopt]
        [--model target-real/smollm2-135m-instruct] [--port 8137] [--out /tmp/prefopt-servers]
        [--skip-local]

Starts `transformers serve` (pip `transformers[serving]`) on this machine and runs `prefopt apo`
for 2 iterations at alpha 0.3 with `sampler = "openai"` (iteration 1 asks the server for the
base folder, iteration 2 for `iter-1/extrapolated/`, which the server loads from disk) and an
`llm:` judge on the same server (the same model, `judge_endpoint = "completions"` with
`scripts/servers/judge_completions.txt`, one token per verdict). Then it checks:

- the output layout: every file a loop writes, no answer journal left behind, and (unless
  --skip-local) the same layout as the same loop with `sampler = "local"`;
- the extrapolation identity of the saved weights, `extrapolated_t = trained_t +
  alpha (trained_t - trained_{t-1})` (trained_0 = the base), to 1e-6 relative;
- that every sample came from the server and every verdict request was answered.

It writes `summary.json` in --out (wall times, verdict counts, the identity's error). A 135M
model is no judge of quality: this checks the protocol, the resume files and the timing, not
what the judge prefers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
ALPHA = 0.3
PROMPTS = [
    "Name a color.",
    "What is 2 + 2?",
    "Say hello to a friend.",
    "Give me a word that rhymes with cat.",
    "What is the capital of France?",
    "Name an animal that can fly.",
    "Count to three.",
    "What day comes after Monday?",
]
EVAL_PROMPTS = ["Name a fruit.", "What is 3 + 4?", "Say goodbye.", "Name a planet."]


def wait_for(url: str, limit_s: float, server: subprocess.Popen) -> None:
    start = time.time()
    while time.time() - start < limit_s:
        if server.poll() is not None:
            sys.exit(f"transformers serve exited with {server.returncode}; see its log")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    sys.exit(f"{url} did not answer within {limit_s:.0f} s")


def write_jsonl(path: Path, prompts: list[str]) -> None:
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p in prompts))


def config(model: Path, out: Path, url: str, sampler: str) -> Path:
    eos = json.loads((model / "config.json").read_text())["eos_token_id"]
    lines = [
        f'model = "{model}"',
        f'prompts = "{out.parent / "prompts.jsonl"}"',
        f'eval_prompts = "{out.parent / "eval_prompts.jsonl"}"',
        f'output_dir = "{out}"',
        "iterations = 2",
        f"alpha = {ALPHA}",
        "prompts_per_iteration = 4",
        "num_samples = 3",
        "max_new_tokens = 24",
        "seed = 0",
        f'sampler = "{sampler}"',
        f'sampler_url = "{url}"',
        # One request at a time: `transformers serve` seeds torch's global generator per
        # request, so concurrent requests would not be reproducible.
        "sampler_concurrency = 1",
        f'judge = "llm:{url}"',
        f'judge_model = "{model}"',
        'judge_endpoint = "completions"',
        f'judge_template = "{ROOT / "scripts/servers/judge_completions.txt"}"',
        "judge_max_tokens = 1",
        "judge_concurrency = 2",
        # `transformers serve` maps `temperature` but not `do_sample`: without this it decodes
        # greedily (the model's generation_config.json does not ask for sampling) and every
        # seed gives the same completion.
        "[sampler_extra_body]",
        f"generation_config = {json.dumps(json.dumps({'do_sample': True, 'eos_token_id': eos, 'pad_token_id': eos}))}",
        "[train]",
        "learning_rate = 1e-5",
        'lr_scheduler_type = "constant"',
        "max_steps = 2",
        "batch_size = 4",
        "max_length = 256",
        "logging_steps = 1",
        "save_steps = 0",
    ]
    path = out.parent / f"apo-{sampler}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_loop(binary: Path, cfg: Path, log: Path) -> float:
    start = time.time()
    with open(log, "w") as f:
        rc = subprocess.run([str(binary), "apo", "--config", str(cfg)], stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"prefopt apo failed ({rc}); see {log}:\n{log.read_text()[-3000:]}")
    return time.time() - start


def layout(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "checkpoint-" not in str(p))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def identity_error(model: Path, out: Path) -> float:
    """max over tensors and iterations of |ext - (tr + alpha (tr - prev))| / max|ext|."""
    worst = 0.0
    previous = weights(model)
    for t in (1, 2):
        trained = weights(out / f"iter-{t}/trained")
        extrapolated = weights(out / f"iter-{t}/extrapolated")
        for name, ext in extrapolated.items():
            tr, prev = trained[name].double(), previous[name].double()
            want = tr + ALPHA * (tr - prev)
            worst = max(worst, ((ext.double() - want).abs().max() / want.abs().max().clamp(min=1e-12)).item())
        previous = trained
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefopt", type=Path, default=ROOT / "target/release/prefopt")
    ap.add_argument("--model", type=Path, default=ROOT / "target-real/smollm2-135m-instruct")
    ap.add_argument("--port", type=int, default=8137)
    ap.add_argument("--out", type=Path, default=Path("/tmp/prefopt-servers"))
    ap.add_argument("--skip-local", action="store_true", help="skip the local-sampler loop (layout comparison)")
    args = ap.parse_args()
    model = args.model.resolve()
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"{args.out} is not empty; give another --out")
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "prompts.jsonl", PROMPTS)
    write_jsonl(args.out / "eval_prompts.jsonl", EVAL_PROMPTS)

    serve = Path(sys.executable).parent / "transformers"
    url = f"http://127.0.0.1:{args.port}/v1"
    serve_log = open(args.out / "serve.log", "w")
    server = subprocess.Popen(
        [str(serve), "serve", "--port", str(args.port)], stdout=serve_log, stderr=subprocess.STDOUT, env=os.environ
    )
    try:
        started = time.time()
        wait_for(f"http://127.0.0.1:{args.port}/health", 300, server)
        summary = {"server_start_s": round(time.time() - started, 1), "model": str(model), "alpha": ALPHA}

        remote = args.out / "remote"
        summary["loop_openai_s"] = round(run_loop(args.prefopt, config(model, remote, url, "openai"), args.out / "remote.log"), 1)
        manifest = json.loads((remote / "manifest.json").read_text())
        summary["stages_openai_s"] = [{k: round(v, 1) for k, v in r["wall_s"].items()} for r in manifest["iterations"]]
        summary["judge_verdicts"] = [r.get("judge_verdicts") for r in manifest["iterations"]]
        for r in manifest["iterations"]:
            v = r.get("judge_verdicts") or {}
            if v.get("requests") != 4 * 3 * 2:
                sys.exit(f"iteration {r['iteration']}: expected 24 verdict requests, got {v}")
        summary["pairs"] = [r["pair_count"] for r in manifest["iterations"]]
        files = layout(remote)
        left = [f for f in files if "partial" in f]
        if left:
            sys.exit(f"answer journals left behind: {left}")
        for t in (1, 2):
            for f in ("samples.jsonl", "pairs.jsonl", "metrics.jsonl", "trained/config.json", "extrapolated/config.json"):
                if f"iter-{t}/{f}" not in files:
                    sys.exit(f"missing iter-{t}/{f}")
        samples = [json.loads(l) for l in (remote / "iter-2/samples.jsonl").read_text().splitlines()]
        if not all(len(s["completions"]) == 3 and all(c for c in s["completions"]) for s in samples):
            sys.exit("iteration 2: a prompt without 3 non-empty completions")
        summary["identity_max_rel_err"] = identity_error(model, remote)
        if summary["identity_max_rel_err"] > 1e-6:
            sys.exit(f"extrapolation identity off by {summary['identity_max_rel_err']:.3g}")
        summary["eval_extrapolated"] = [r["eval_extrapolated"] for r in manifest["iterations"]]

        if not args.skip_local:
            local = args.out / "local"
            summary["loop_local_sampler_s"] = round(
                run_loop(args.prefopt, config(model, local, url, "local"), args.out / "local.log"), 1
            )
            if layout(local) != files:
                sys.exit(f"layouts differ:\n  openai {files}\n  local  {layout(local)}")
            summary["same_layout_as_local"] = True
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
