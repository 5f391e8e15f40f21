#!/usr/bin/env bash
# Builds the demo's base model, assets/base-model/, from scratch with prefopt alone
# (no Python): a character-level tokenizer, random weights from a seed, and SFT on the
# `compare` task ("Which is larger, 17 or 42?") with a sloppy annotator's answers: 40% right,
# 40% wrong in the right form (the smaller number, or the larger one off by a little), 20%
# off-format (the right number without `Answer: `, graded malformed by the oracle). So the
# base model answers right about half the time and sometimes out of format, leaving room
# for preference training.
# Deterministic: the same commit on the same machine gives the same weights. Takes about
# 20 minutes on 2 cores (1250 steps).
#
#   scripts/make_base_model.sh            # writes assets/base-model/
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
prefopt=./target/release/prefopt
work=target/base-model-work
rm -rf "$work"
mkdir -p "$work"

$prefopt tasks --task compare --kind sft --count 16000 --seed 1 --off-format-rate 0.2 --wrong-rate 0.4 \
    --out "$work/sft.jsonl"
$prefopt init --arch scripts/base_model/arch.json --char-tokenizer --seed 0 --out "$work/init"
$prefopt sft --config scripts/base_model/sft.toml \
    --set "model=\"$work/init\"" --set "train_data=\"$work/sft.jsonl\"" --set "output_dir=\"$work/stage1\""
$prefopt sft --config scripts/base_model/sft_stage2.toml \
    --set "model=\"$work/stage1/final\"" --set "train_data=\"$work/sft.jsonl\"" --set "output_dir=\"$work/sft\""

rm -rf assets/base-model
mkdir -p assets/base-model
for f in config.json generation_config.json model.safetensors tokenizer.json tokenizer_config.json; do
    cp "$work/sft/final/$f" assets/base-model/
done
sha256sum assets/base-model/model.safetensors
echo "assets/base-model/ written; check it with: $prefopt demo --quick"
