#!/usr/bin/env bash
# DPO on ragged data: prefopt vs TRL's DPOTrainer on the same file, model and settings,
# alternating runs (prefopt, TRL, prefopt, TRL, ...), then each side's median examples/s and
# the ratio, two ways: over the whole run (first step included, TRL's `train_runtime`) and
# at steady state (the steps after the first: the first faults in the step's memory, which
# a long run pays once); plus prefopt with each batch-layout key turned off (what each one
# saves) and on fixed-length pairs of the file's mean lengths (the useful-GFLOP/s yardstick).
#
#   scripts/bench_ragged.sh [ROUNDS] [STEPS]           (defaults: 3 rounds of 3 steps)
#
# MODEL: the HF folder (default target-real/smollm2-135m-instruct, which
# scripts/make_real_model.py builds offline); DATA: the preference file (default
# target-bench/ragged-<model>.jsonl, written by `prefopt workload --count 96 --seed 0` when
# missing); BATCHES: pairs per step (default "4 8"); TRL_BATCHES: those TRL runs at too
# (default "4 8"); TRL_MICRO (default 4): TRL runs a batch above it as micro-batches of it
# with gradient accumulation (its step peaks at 20-21 GB at 4 pairs, so 8 at once does not fit
# in this machine's 24 GB; prefopt runs 8 at once); batches without TRL and the layout runs
# (ABLATION=0 skips them) run in the first round only; THREADS (default 2); APPEND=1 keeps
# the earlier runs' log (to add rounds); FIXED_BATCHES: the fixed-length runs' batches
# (default BATCHES). A run that fails (killed for memory) is logged as failed and the rest
# goes on. Every run's JSON line goes to target-bench/ragged-runs.jsonl, the summary to
# stdout. Needs a release build and the Python of scripts/requirements.txt as $PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
steps=${2:-3}
python=${PYTHON:-/work/pyenv/bin/python}
prefopt=${PREFOPT:-./target/release/prefopt}
model=${MODEL:-target-real/smollm2-135m-instruct}
data=${DATA:-target-bench/ragged-$(basename "$model").jsonl}
threads=${THREADS:-2}
log=target-bench/ragged-runs.jsonl
mkdir -p target-bench
[ -f "$data" ] || "$prefopt" workload --model "$model" --count 96 --seed 0 --out "$data"
[ "${APPEND:-0}" = 1 ] || : >"$log"
# A run that fails (e.g. killed for memory) is logged as such and the rounds go on.
run_prefopt() {
  "$prefopt" bench dpo --model "$model" --threads "$threads" --steps "$steps" --warmup 0 "$@" >>"$log" ||
    echo "{\"impl\": \"prefopt\", \"failed\": \"exit $?\", \"args\": \"$*\"}" >>"$log"
}
for round in $(seq "$rounds"); do
  for b in ${BATCHES:-4 8}; do
    trl=0; case " ${TRL_BATCHES:-4 8} " in *" $b "*) trl=1 ;; esac
    # Batches without a TRL run, and the layout runs, need one round only.
    [ "$trl" = 1 ] || [ "$round" = 1 ] || continue
    run_prefopt --data "$data" --pairs "$b"
    if [ "$trl" = 1 ]; then
      micro=$((b < ${TRL_MICRO:-4} ? b : ${TRL_MICRO:-4}))
      "$python" scripts/bench_trl_dpo.py --model "$model" --data "$data" --batch "$b" --steps "$steps" \
        --threads "$threads" --micro-batch "$micro" 2>/dev/null | tail -1 >>"$log" ||
        echo "{\"impl\": \"trl\", \"failed\": \"exit $?\", \"args\": \"--batch $b\"}" >>"$log"
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
for b in ${FIXED_BATCHES:-${BATCHES:-4 8}}; do
  run_prefopt --pairs "$b" --prompt-len "$prompt" --completion-len "$completion"
done
"$python" - "$log" <<'PY'
import json, statistics, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for f in (r for r in lines if "failed" in r):
    what = "prefopt bench dpo" if f["impl"] == "prefopt" else "scripts/bench_trl_dpo.py"
    print("failed: %s %s (%s)" % (what, f["args"], f["failed"]))
runs = [r for r in lines if "failed" not in r]
def pick(**want):
    return [r for r in runs if all(r.get(k) == v for k, v in want.items())]
def med(xs):
    return statistics.median(xs) if xs else float("nan")
def each(rs, key, fmt="%.4f"):
    return ", ".join(fmt % r[key] for r in rs)
for b in sorted({r["pairs"] for r in runs}):
    ours = pick(impl="prefopt", pairs=b, padding_free=True, share_prompt=True, cached_ref=False)
    ragged = [r for r in ours if "data" in r]
    fixed = [r for r in ours if "data" not in r]
    trl = pick(impl="trl", pairs=b)
    o = med([r["examples_per_s"] for r in ragged])
    rss = med([r["peak_rss_mb"] for r in ragged])
    if trl:
        t = med([r["examples_per_s"] for r in trl])
        micro = {r.get("micro_batch", b) for r in trl}
        how = "" if micro == {b} else " (micro-batches of %s, gradient accumulation)" % ", ".join(map(str, sorted(micro)))
        print("batch %d: prefopt %.4f examples/s (runs %s), TRL%s %.4f (runs %s), ratio %.2fx; peak RSS prefopt %.0f MiB, TRL %.0f MiB"
              % (b, o, each(ragged, "examples_per_s"), how, t, each(trl, "examples_per_s"), o / t, rss, med([r["peak_rss_mb"] for r in trl])))
        # Steady state: the steps after the first, on both sides the same pairs.
        os_ = [r for r in ragged if r.get("steady_examples_per_s")]
        ts = [r for r in trl if r.get("steady_examples_per_s")]
        if os_ and ts:
            so, st = med([r["steady_examples_per_s"] for r in os_]), med([r["steady_examples_per_s"] for r in ts])
            print("  steady state (steps 2 on): prefopt %.4f examples/s (runs %s), TRL %.4f (runs %s), ratio %.2fx"
                  % (so, each(os_, "steady_examples_per_s"), st, each(ts, "steady_examples_per_s"), so / st))
    else:
        print("batch %d: prefopt %.4f examples/s (runs %s), peak RSS %.0f MiB (no TRL run)" % (b, o, each(ragged, "examples_per_s"), rss))
    u, uf = med([r["useful_gflops"] for r in ragged]), med([r["useful_gflops"] for r in fixed])
    print("  useful GFLOP/s: ragged %.1f (runs %s), fixed-length pairs at the mean lengths %.1f (%.0f%%; %.4f examples/s)"
          % (u, each(ragged, "useful_gflops", "%.1f"), uf, 100 * u / uf, med([r["examples_per_s"] for r in fixed])))
    su = [r for r in ragged if r.get("steady_useful_gflops")]
    sf = [r for r in fixed if r.get("steady_useful_gflops")]
    if su and sf:
        a, c = med([r["steady_useful_gflops"] for r in su]), med([r["steady_useful_gflops"] for r in sf])
        print("  useful GFLOP/s at steady state: ragged %.1f (runs %s), fixed-length %.1f (%.0f%%)"
              % (a, each(su, "steady_useful_gflops", "%.1f"), c, 100 * a / c))
    for pf, sp in [(True, False), (False, True), (False, False)]:
        rs = [r for r in pick(impl="prefopt", pairs=b, padding_free=pf, share_prompt=sp) if "data" in r]
        if rs:
            e = med([r["examples_per_s"] for r in rs])
            print("  padding_free=%s share_prompt=%s: %.4f examples/s (both on: %.2fx), useful %.1f GFLOP/s, peak RSS %.0f MiB"
                  % (pf, sp, e, o / e, med([r["useful_gflops"] for r in rs]), med([r["peak_rss_mb"] for r in rs])))
PY
