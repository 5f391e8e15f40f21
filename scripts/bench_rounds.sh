#!/usr/bin/env bash
# The real-scale benchmark round: prefopt (and optionally an earlier prefopt build) against
# PyTorch on the tiny and the real model, alternating in every round, then medians and ratios.
#
#   scripts/bench_rounds.sh [LOG]            # default out/bench_rounds.jsonl
#
# BEFORE=path/to/older/prefopt adds an earlier build to every tiny/real row (before/after).
# REAL: the real model folder (scripts/make_real_model.py; default target-real/smollm2-135m-instruct).
# ROUNDS (default 3) for the tiny and generation rows, DPO_ROUNDS (default 2) for the real DPO
# step (4 pairs x 512 tokens: full weights, LoRA r16 all-linear, each with and without
# gradient checkpointing). PYTHON: a Python with torch, transformers and peft. Takes about
# 35 minutes on 2 cores.
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:-out/bench_rounds.jsonl}; mkdir -p "$(dirname "$log")"; : > "$log"
py=${PYTHON:-python3}
real=${REAL:-target-real/smollm2-135m-instruct}
tiny=target-bench/torch-llama-4x256
prefopt=${PREFOPT:-./target/release/prefopt}
[ -d "$tiny" ] || "$py" scripts/bench_torch.py forward --model "$tiny" --steps 1 --warmup 0 > /dev/null
run() { # row impl command...
  local row=$1 impl=$2; shift 2
  local line; line=$("$@" 2>/dev/null | tail -1)
  "$py" -c 'import json,os,sys
try: d = json.loads(sys.argv[3])
except Exception: d = {"error": "no JSON output"}
print(json.dumps({"row": sys.argv[1], "impl": sys.argv[2], "load_1m": os.getloadavg()[0], **d}))' "$row" "$impl" "$line" >> "$log"
}
sides() { # row mode model args...: [before,] prefopt, pytorch
  local row=$1 mode=$2 model=$3; shift 3
  [ -n "${BEFORE:-}" ] && run "$row" before "$BEFORE" bench "$mode" --model "$model" --threads 2 "$@"
  run "$row" prefopt "$prefopt" bench "$mode" --model "$model" --threads 2 "$@"
  run "$row" pytorch "$py" scripts/bench_torch.py "$mode" --model "$model" --threads 2 "$@"
}
for _ in $(seq "${ROUNDS:-3}"); do
  sides "tiny: DPO step, 4 pairs x 128" dpo "$tiny"
  sides "tiny: generate, batch 1" generate "$tiny" --batch 1
  sides "tiny: generate, batch 16" generate "$tiny" --batch 16
  sides "real: generate, batch 1, 64+64" generate "$real" --batch 1 --prompt-len 64 --new-tokens 64
  sides "real: generate, batch 16, 64+64" generate "$real" --batch 16 --prompt-len 64 --new-tokens 64
done
A=(--pairs 4 --prompt-len 64 --completion-len 448 --steps 1 --warmup 1)
for _ in $(seq "${DPO_ROUNDS:-2}"); do
  sides "real: DPO step, 4 pairs x 512" dpo "$real" "${A[@]}"
  for extra in "--gradient-checkpointing" "--lora" "--lora --gradient-checkpointing"; do
    # shellcheck disable=SC2086
    BEFORE="" sides "real: DPO step, 4 pairs x 512, $extra" dpo "$real" "${A[@]}" $extra
  done
done
"$py" - "$log" <<'PY'
import json, statistics, sys
rows = {}
for l in map(json.loads, open(sys.argv[1])):
    rows.setdefault(l["row"], {}).setdefault(l["impl"], []).append(l)
print("| work | prefopt tok/s (runs) | PyTorch tok/s (runs) | ratio | peak RSS prefopt / PyTorch (MiB) | before tok/s (runs) | before ratio | load |")
print("|---|---|---|---|---|---|---|---|")
for row, by in rows.items():
    def med(impl, key="tokens_per_s"):
        rs = [r[key] for r in by.get(impl, []) if key in r]
        return (statistics.median(rs), rs) if rs else (None, [])
    (p, pr), (t, tr), (b, br) = med("prefopt"), med("pytorch"), med("before")
    pm, tm = med("prefopt", "peak_rss_mb")[0], med("pytorch", "peak_rss_mb")[0]
    fmt = lambda v, rs: f"{v:.1f} ({', '.join(f'{x:.1f}' for x in rs)})" if v else "-"
    loads = [r["load_1m"] for rs in by.values() for r in rs]
    ratio = lambda a: f"{a / t:.2f}x" if a and t else "-"
    mib = lambda v: f"{v:.0f}" if v else "-"
    print(f"| {row} | {fmt(p, pr)} | {fmt(t, tr)} | {ratio(p)} | {mib(pm)} / {mib(tm)} | {fmt(b, br)} | "
          f"{ratio(b)} | {min(loads):.1f}-{max(loads):.1f} |")
PY
