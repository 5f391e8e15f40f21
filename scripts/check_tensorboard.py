#!/usr/bin/env python3
"""Reads a prefopt run's TensorBoard events with TensorBoard's own loader and checks them
against its metrics.jsonl: every number of every line, as the tag transformers'
TensorBoardCallback gives it (eval_x -> eval/x, else train/x), at the line's step.

    pip install tensorboard
    prefopt train --config run.toml --set report_to=tensorboard
    python scripts/check_tensorboard.py OUTPUT_DIR

Exits non-zero on the first difference. CI does not run it (CI is Python-free); the Rust
test `tensorboard_events_mirror_metrics_jsonl_and_follow_a_resume` has its own reader.
"""
import json
import math
import struct
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def tag(key):
    return "eval/" + key[len("eval_"):] if key.startswith("eval_") else "train/" + key


def main(out):
    out = Path(out)
    expected = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                expected.setdefault(tag(k), []).append((row["step"], v))
    acc = EventAccumulator(str(out / "runs"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    if tags != set(expected):
        sys.exit(f"tags differ: only in events {sorted(tags - set(expected))}, only in metrics {sorted(set(expected) - tags)}")
    n = 0
    for t, want in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(t)]
        f32 = [(s, struct.unpack("f", struct.pack("f", v))[0]) for s, v in want]
        if len(got) != len(f32) or any(a[0] != b[0] or not (a[1] == b[1] or math.isnan(a[1]) and math.isnan(b[1])) for a, b in zip(got, f32)):
            sys.exit(f"{t}: events {got} != metrics {f32}")
        n += len(got)
    print(f"{out}: {n} scalars under {len(tags)} tags read by TensorBoard's EventAccumulator equal metrics.jsonl")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
