#!/usr/bin/env bash
# Side-by-side throughput: prefopt vs PyTorch on the same HF folder, alternating runs
# (A B A B ...) so machine drift hits both, then the median tokens/s of each and the ratio.
#
#   scripts/bench_compare.sh MODE [THREADS] [ROUNDS]     MODE: forward | fwd-bwd | dpo | generate
#
# BENCH_ARGS adds flags to both sides (they share the names: --batch, --prompt-len,
# --new-tokens, --pairs, --completion-len, --steps, --warmup), e.g.
#   BENCH_ARGS="--batch 16" scripts/bench_compare.sh generate 2 3
# PREFOPT_ARGS adds flags to prefopt's side only (e.g. PREFOPT_ARGS=--cached-ref), TORCH_ARGS to
# PyTorch's (e.g. both --gradient-checkpointing);
# PREFOPT picks the binary (default ./target/release/prefopt); MODEL the HF folder (default
# target-bench/torch-llama-4x256, created on first use; e.g. the real SmolLM2-135M folder of
# scripts/make_real_model.py). Besides tokens/s it reports each side's median peak RSS.
#
# Needs a Python with torch + transformers (scripts/requirements.txt) as $PYTHON
# (default /work/pyenv/bin/python) and a release build (cargo build --release).
# The model folder target-bench/torch-llama-4x256 (4 layers, d=256, vocab 512) is created
# by scripts/bench_torch.py on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?mode: forward | fwd-bwd | dpo | generate}
threads=${2:-2}
rounds=${3:-3}
python=${PYTHON:-/work/pyenv/bin/python}
prefopt=${PREFOPT:-./target/release/prefopt}
model=${MODEL:-target-bench/torch-llama-4x256}
[ -d "$model" ] || "$python" scripts/bench_torch.py forward --model "$model" --steps 1 --warmup 0 >/dev/null
field='import json,sys; d=json.load(sys.stdin); print(str(d["tokens_per_s"]) + ":" + str(d["peak_rss_mb"]))'
ours=(); theirs=()
for _ in $(seq "$rounds"); do
  ours+=("$("$prefopt" bench "$mode" --model "$model" --threads "$threads" ${BENCH_ARGS:-} ${PREFOPT_ARGS:-} | "$python" -c "$field")")
  theirs+=("$("$python" scripts/bench_torch.py "$mode" --model "$model" --threads "$threads" ${BENCH_ARGS:-} ${TORCH_ARGS:-} 2>/dev/null | "$python" -c "$field")")
done
"$python" - "$mode" "$threads" "${ours[*]}" "${theirs[*]}" <<'PY'
import os, statistics, sys
mode, threads = sys.argv[1], sys.argv[2]
ours = [tuple(map(float, x.split(":"))) for x in sys.argv[3].split()]
theirs = [tuple(map(float, x.split(":"))) for x in sys.argv[4].split()]
o, t = statistics.median(x[0] for x in ours), statistics.median(x[0] for x in theirs)
om, tm = statistics.median(x[1] for x in ours), statistics.median(x[1] for x in theirs)
load = os.getloadavg()[0]
print(f"{mode} threads={threads} {os.environ.get('BENCH_ARGS', '')}: 1-min load {load:.1f}: prefopt {o:.0f} tok/s (runs {', '.join(f'{x[0]:.0f}' for x in ours)}), "
      f"pytorch {t:.0f} tok/s (runs {', '.join(f'{x[0]:.0f}' for x in theirs)}), ratio {o/t:.2f}x; "
      f"peak RSS prefopt {om:.0f} MiB, pytorch {tm:.0f} MiB")
PY
