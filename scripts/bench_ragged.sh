#!/usr/bin/env bash
# DPO on ragged data: prefopt vs TRL's DPOTrainer on the same file, model and settings,
# alternating runs (prefopt, TRL, prefopt, TRL, ...), then each side's median examples/s and
# the ratio; plus prefopt with each batch-layout key turned off (what each one saves) and on
# fixed-length pairs of the file's mean lengths (the useful-GFLOP/s yardstick).
#
#   scripts/bench_ragged.sh [ROUNDS] [STEPS]           (defaults: 3 rounds of 2 steps)
#
# MODEL: the HF folder (default target-real/smollm2-135m-instruct, which
# scripts/make_real_model.py builds offline); DATA: the preference file (default
# target-bench/ragged-<model>.jsonl, written by `prefopt workload --count 96 --seed 0` when
# missing); BATCHES: pairs per step (default "4 8"); TRL_BATCHES: those TRL runs at too
# (default "4": TRL's step peaks at 19.9 GB at batch 4 here, so batch 8 does not fit in this
# machine's 24 GB); batches without TRL and the layout runs (ABLATION=0 skips them) run in
# the first round only; THREADS (default 2). Every run's JSON line goes to target-bench/ragged-runs.jsonl, the summary
# to stdout. Needs a release build and the Python of scripts/requirements.txt as $PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
steps=${2:-2}
python=${PYTHON:-/work/pyenv/bin/python}
prefopt=${PREFOPT:-./target/release/prefopt}
model=${MODEL:-target-real/smollm2-135m-instruct}
data=${DATA:-target-bench/ragged-$(basename "$model").jsonl}
threads=${THREADS:-2}
log=target-bench/ragged-runs.jsonl
mkdir -p target-bench
[ -f "$data" ] || "$prefopt" workload --model "$model" --count 96 --seed 0 --out "$data"
: >"$log"
run_prefopt() { "$prefopt" bench dpo --model "$model" --threads "$threads" --steps "$steps" --warmup 0 "$@" >>"$log"; }
for round in $(seq "$rounds"); do
  for b in ${BATCHES:-4 8}; do
    trl=0; case " ${TRL_BATCHES:-4} " in *" $b "*) trl=1 ;; esac
    # Batches without a TRL run, and the layout runs, need one round only.
    [ "$trl" = 1 ] || [ "$round" = 1 ] || continue
    run_prefopt --data "$data" --pairs "$b"
    if [ "$trl" = 1 ]; then
      "$python" scripts/bench_trl_dpo.py --model "$model" --data "$data" --batch "$b" --steps "$steps" \
        --threads "$threads" 2>/dev/null | tail -1 >>"$log"
    fi
    if [ "$round" = 1 ] && [ "${ABLATION:-1}" = 1 ]; then
      run_prefopt --data "$data" --pairs "$b" --share-prompt false
      run_prefopt --data "$data" --pairs "$b" --padding-free false
      run_prefopt --data "$data" --pairs "$b" --padding-free false --share-prompt false
    fi
  done
done
# Fixed-length pairs at the file's mean prompt and completion lengths (as tokenized, after
# truncation), from the ragged runs' own report.
read -r prompt completion < <("$python" -c '
import json, sys
r = next(json.loads(l) for l in open(sys.argv[1]) if "mean_prompt_tokens" in l)
print(round(r["mean_prompt_tokens"]), round(r["mean_completion_tokens"]))' "$log")
for b in ${BATCHES:-4 8}; do
  run_prefopt --pairs "$b" --prompt-len "$prompt" --completion-len "$completion"
done
"$python" - "$log" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
def pick(**want):
    return [r for r in runs if all(r.get(k) == v for k, v in want.items())]
med = lambda xs: statistics.median(xs) if xs else float("nan")
for b in sorted({r["pairs"] for r in runs}):
    ours = pick(impl="prefopt", pairs=b, padding_free=True, share_prompt=True, cached_ref=False)
    ragged = [r for r in ours if "data" in r]
    fixed = [r for r in ours if "data" not in r]
    trl = pick(impl="trl", pairs=b)
    o, t = med([r["examples_per_s"] for r in ragged]), med([r["examples_per_s"] for r in trl])
    print(f"batch {b}: prefopt {o:.4f} examples/s (runs {', '.join(f'{r['examples_per_s']:.4f}' for r in ragged)}), "
          f"TRL {t:.4f} (runs {', '.join(f'{r['examples_per_s']:.4f}' for r in trl)}), ratio {o / t:.2f}x; "
          f"peak RSS prefopt {med([r['peak_rss_mb'] for r in ragged]):.0f} MiB, TRL {med([r['peak_rss_mb'] for r in trl]):.0f} MiB")
    u = med([r["useful_gflops"] for r in ragged])
    uf = med([r["useful_gflops"] for r in fixed])
    print(f"  useful GFLOP/s: ragged {u:.1f}, fixed-length at the mean lengths {uf:.1f} ({100 * u / uf:.0f}%)")
    for pf, sp in [(True, False), (False, True), (False, False)]:
        rs = [r for r in pick(impl="prefopt", pairs=b, padding_free=pf, share_prompt=sp) if "data" in r]
        if rs:
            e = med([r["examples_per_s"] for r in rs])
            print(f"  padding_free={pf} share_prompt={sp}: {e:.4f} examples/s ({o / e:.2f}x slower than both on), "
                  f"useful {med([r['useful_gflops'] for r in rs]):.1f} GFLOP/s, peak RSS {med([r['peak_rss_mb'] for r in rs]):.0f} MiB")
PY
