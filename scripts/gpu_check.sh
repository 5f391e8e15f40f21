#!/usr/bin/env bash
# The GPU check, in two halves so the lent GPU's minutes go to running, not building:
#
#   scripts/gpu_check.sh prepare [cuda|cpu]   # here: build prefopt and the model/train test
#                                             # binaries (cuda: via scripts/build_cuda.sh), stripped,
#                                             # into target-gpu-check/ (carry it to the GPU machine)
#   scripts/gpu_check.sh run [cuda|cpu]       # there: the parity tests with PREFOPT_TEST_DEVICE,
#                                             # then prefopt bench vs PyTorch on the same device,
#                                             # f32 and bf16, tiny and real model; one JSON file
#
# `cpu` rehearses both halves on the CPU. The cuda binaries link the CUDA 13 libraries
# (cuBLAS, cuRAND, NVRTC, runtime) dynamically: the GPU machine must have them installed, or
# LD_LIBRARY_PATH must point at a copy (`ldd target-gpu-check/prefopt` shows what is missing). Environment: PYTHON (a Python with torch and
# transformers; default python3), REAL (the real model folder of scripts/make_real_model.py;
# default target-real/smollm2-135m-instruct; skipped when absent), OUT (results folder;
# default out/gpu-check), ROUNDS (alternating benchmark rounds, default 2).
set -uo pipefail
cd "$(dirname "$0")/.."
half=${1:?prepare or run}
dev=${2:-cuda}
bin=target-gpu-check
py=${PYTHON:-python3}

if [ "$half" = prepare ]; then
  set -e
  # cuda builds in its own target folder (scripts/build_cuda.sh), without debug info; the
  # cpu rehearsal reuses the usual release build. Either way the copies are stripped.
  if [ "$dev" = cpu ]; then cargo_cmd=(cargo); features=(); else cargo_cmd=(scripts/build_cuda.sh); features=(--features cuda); fi
  rm -rf "$bin"; mkdir -p "$bin"
  "${cargo_cmd[@]}" build --release --locked "${features[@]}" --bin prefopt --message-format=json-render-diagnostics \
    | "$py" -c 'import json,sys; [print(m["executable"]) for m in map(json.loads, sys.stdin) if m.get("executable")]' > "$bin/built.txt"
  for crate in prefopt-model prefopt-train; do
    "${cargo_cmd[@]}" test --release --locked -p "$crate" "${features[@]}" --no-run --message-format=json-render-diagnostics \
      | "$py" -c 'import json,sys; [print(m["executable"]) for m in map(json.loads, sys.stdin) if m.get("executable") and m["target"]["name"] == "it"]' \
      | sed "s/^/$crate /" >> "$bin/tests.txt"
  done
  cp "$(tail -1 "$bin/built.txt")" "$bin/prefopt"
  while read -r crate exe; do cp "$exe" "$bin/$crate-it"; done < "$bin/tests.txt"
  strip "$bin"/prefopt "$bin"/*-it
  pwd > "$bin/source_root.txt"  # the tests find fixtures through this compile-time path
  du -sh "$bin"; ls -la "$bin"
  exit 0
fi

[ "$half" = run ] || { echo "error: the first argument is prepare or run, not $half" >&2; exit 2; }
[ -x "$bin/prefopt" ] || { echo "error: $bin/prefopt is missing: run scripts/gpu_check.sh prepare $dev first" >&2; exit 1; }
out=${OUT:-out/gpu-check}; mkdir -p "$out"
rounds=${ROUNDS:-2}
real=${REAL:-target-real/smollm2-135m-instruct}
tiny=target-bench/torch-llama-4x256
# The test binaries read fixtures from the path they were built in; point it here if it moved.
root=$(cat "$bin/source_root.txt")
if [ "$root" != "$PWD" ] && [ ! -e "$root" ]; then mkdir -p "$(dirname "$root")" && ln -s "$PWD" "$root"; fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/nvidia-smi.txt"
log=$out/lines.jsonl; : > "$log"

# 1. Parity tests on the device (model, ops, generation, bf16, training trajectories).
for t in "$bin"/*-it; do
  name=$(basename "$t")
  start=$(date +%s)
  PREFOPT_TEST_DEVICE=$dev RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-4} "$t" --test-threads=1 > "$out/$name.log" 2>&1
  rc=$?
  summary=$(grep -E "^test result" "$out/$name.log" | tail -1)
  failed=$(grep -E "^    [A-Za-z0-9_:]+$" "$out/$name.log" | tr -d ' ' | paste -sd, -)
  "$py" -c 'import json,sys; print(json.dumps({"kind": "tests", "binary": sys.argv[1], "rc": int(sys.argv[2]), "summary": sys.argv[3], "failed": [f for f in sys.argv[4].split(",") if f], "seconds": int(sys.argv[5])}))' \
    "$name" "$rc" "$summary" "$failed" "$(( $(date +%s) - start ))" >> "$log"
done

# 2. Benchmarks, prefopt and PyTorch alternating on the same device.
[ -d "$tiny" ] || "$py" scripts/bench_torch.py forward --model "$tiny" --steps 1 --warmup 0 > /dev/null
models=("$tiny"); [ -d "$real" ] && models+=("$real")
bench() { # label args...
  local label=$1; shift
  for _ in $(seq "$rounds"); do
    for impl in prefopt pytorch; do
      if [ $impl = prefopt ]; then line=$("$bin/prefopt" bench "$@" --device "$dev" 2>/dev/null | tail -1)
      else line=$("$py" scripts/bench_torch.py "$@" --device "$dev" 2>/dev/null | tail -1); fi
      "$py" -c 'import json,sys
try: d = json.loads(sys.argv[3])
except Exception: d = {"error": "no JSON output"}
print(json.dumps({"kind": "bench", "label": sys.argv[1], "impl": sys.argv[2], **d}))' "$label" "$impl" "$line" >> "$log"
    done
  done
}
for m in "${models[@]}"; do
  if [ "$m" = "$tiny" ]; then dpo=(--pairs 4 --prompt-len 64 --completion-len 64); else dpo=(--pairs 4 --prompt-len 64 --completion-len 448 --steps 3 --warmup 1); fi
  for p in "" --bf16; do
    bench "dpo $(basename "$m") $p" dpo --model "$m" "${dpo[@]}" $p
    bench "generate b1 $(basename "$m") $p" generate --model "$m" --batch 1 --prompt-len 64 --new-tokens 64 $p
    bench "generate b16 $(basename "$m") $p" generate --model "$m" --batch 16 --prompt-len 64 --new-tokens 64 $p
  done
done

# 3. One JSON file: the tests, and per benchmark the medians and the ratio.
"$py" - "$log" "$out/gpu_check.json" "$dev" <<'PY'
import json, statistics, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
benches = {}
for l in lines:
    if l["kind"] == "bench":
        benches.setdefault(l["label"], {}).setdefault(l["impl"], []).append(l)
summary = []
for label, by in benches.items():
    med = {impl: statistics.median(r["tokens_per_s"] for r in rs if "tokens_per_s" in r) if any("tokens_per_s" in r for r in rs) else None
           for impl, rs in by.items()}
    p, t = med.get("prefopt"), med.get("pytorch")
    summary.append({"label": label, "prefopt_tokens_per_s": p, "pytorch_tokens_per_s": t,
                    "ratio": p / t if p and t else None, "runs": by})
res = {"device": sys.argv[3], "tests": [l for l in lines if l["kind"] == "tests"], "benchmarks": summary}
json.dump(res, open(sys.argv[2], "w"), indent=1)
for t in res["tests"]:
    print(f"tests {t['binary']}: rc {t['rc']} {t['summary']} ({t['seconds']} s) failed: {t['failed']}")
for b in summary:
    r = f"{b['ratio']:.2f}x" if b["ratio"] else "n/a"
    print(f"{b['label']}: prefopt {b['prefopt_tokens_per_s']} tok/s, pytorch {b['pytorch_tokens_per_s']} tok/s, ratio {r}")
PY
