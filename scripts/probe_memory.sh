#!/usr/bin/env bash
# Peak memory of one full-weight DPO step (f32 master weights, AdamW) on a random model of a
# given architecture: how large a model trains on this machine.
#
#   scripts/probe_memory.sh scripts/sizes/qwen2-0.5b.json false   # CONFIG GRADIENT_CHECKPOINTING
#
# 4 pairs of 512 tokens (batch 4, max_length 512: random word sequences, long enough to be
# cut), reference log-probs computed before training as `prefopt train` always does. Prints
# the exit status, wall time and peak RSS; an out-of-memory kill shows as exit 137. The
# random model (scripts/sizes/*.json: Qwen2 layouts, vocab 151,936, tied) is written under
# target-sizes/ and removed afterwards.
set -u
cd "$(dirname "$0")/.."
cfg=$1; gc=$2; name=$(basename "$cfg" .json)
bin=${PREFOPT:-./target/release/prefopt}
work=target-sizes; model=$work/models/$name; out=$work/runs/$name-gc$gc
mkdir -p "$work"
if [ ! -f "$work/pairs.jsonl" ]; then
  awk 'BEGIN { srand(7); split("the of and to in is was it for on are as with be at by this had not but from or have an they which one you were her all there can been has more when will would into some its time only that", w, " ");
    for (p = 0; p < 4; p++) { printf "{\"prompt\": \""; for (i = 0; i < 40; i++) printf "%s%s", (i ? " " : ""), w[int(rand() * 50) + 1];
      for (f = 0; f < 2; f++) { printf "\", \"%s\": \"", (f ? "rejected" : "chosen"); for (i = 0; i < 400; i++) printf " %s", w[int(rand() * 50) + 1] }
      print "\"}" } }' > "$work/pairs.jsonl"
fi
[ -d "$model" ] || "$bin" init --arch "$cfg" --tokenizer fixtures/tokenizers/chatml --out "$model" > /dev/null
rm -rf "$out"
/usr/bin/time -v "$bin" train --set "model=\"$model\"" --set "train_data=\"$work/pairs.jsonl\"" --set "output_dir=\"$out\"" \
  --set batch_size=4 --set max_steps=1 --set max_length=512 --set max_prompt_length=64 --set save_steps=0 \
  --set learning_rate=1e-6 --set "gradient_checkpointing=$gc" > "$work/$name-gc$gc.log" 2>&1
echo "$name gradient_checkpointing=$gc: exit $?: $(grep -E 'Maximum resident|Elapsed' "$work/$name-gc$gc.log" | tr -s ' \t' ' ' | tr '\n' ' ')"
rm -rf "$model" "$out"
