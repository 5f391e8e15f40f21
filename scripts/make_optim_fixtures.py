#!/usr/bin/env python3
"""Build the reference values for prefopt-train's optimizers, schedules and clipping,
under fixtures/expected/optim/.

Run from the repository root:

    /work/pyenv/bin/python scripts/make_optim_fixtures.py

Outputs fixtures/expected/optim/optim.json with three sections:

  optimizers
      Plain torch.optim (single-tensor path, foreach=False, float32, CPU) for 5 steps on 3 small
      tensors with fixed per-step gradients and a per-step learning rate. Parameter groups are
      built the way the Hugging Face Trainer builds them (Trainer.get_decay_parameter_names:
      no weight decay for names matching bias / layernorm / rmsnorm / `norm` / `_norm`), so a
      case with weight decay also pins that split. Stored: the initial values, the gradients
      and learning rate of every step, and the parameter values after every step.

  schedules
      transformers.get_scheduler(name, optimizer, num_warmup_steps, num_training_steps) over a
      dummy optimizer with base lr 2e-5: the learning rate that optimizer step s (0-based) uses,
      for s = 0 .. total + 1, and the warm-up step count that
      TrainingArguments.get_warmup_steps gives for a few ratios.

  clipping
      torch.nn.utils.clip_grad_norm_ on fixed gradients: the returned norm and the clipped values.

Deterministic: fixed seeds, single-threaded CPU; rerunning gives an identical file.
"""

from __future__ import annotations

import json
import math
import re
import types
from pathlib import Path

import torch
import transformers
from transformers import TrainingArguments, get_scheduler

torch.set_num_threads(1)
OUT = Path("fixtures/expected/optim")

# Names chosen to exercise the Hugging Face no-decay rule: a weight that decays, a bias and a
# norm weight that do not.
SHAPES = {
    "model.layers.0.mlp.up_proj.weight": (3, 4),
    "model.layers.0.self_attn.q_proj.bias": (4,),
    "model.norm.weight": (5,),
}
STEPS = 5
LRS = [1e-2, 2e-2, 5e-3, 1e-2, 0.0]  # per step; the last one checks an lr-0 step still moves state


def hf_decays(name: str) -> bool:
    """transformers 5.23 Trainer.get_decay_parameter_names, as a predicate on the full name."""
    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    return not any(re.search(p, name.lower()) for p in patterns)


def make_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    init = {n: torch.randn(s, generator=g, dtype=torch.float32) for n, s in SHAPES.items()}
    grads = []
    for step in range(STEPS):
        # Mixed magnitudes (and one exactly-zero entry per tensor) so eps and bias correction matter.
        scale = [1.0, 0.01, 3.0, 1e-4, 0.5][step]
        gs = {}
        for n, s in SHAPES.items():
            t = torch.randn(s, generator=g, dtype=torch.float32) * scale
            t.view(-1)[0] = 0.0
            gs[n] = t
        grads.append(gs)
    return init, grads


def run_optimizer(case: dict, seed: int) -> dict:
    init, grads = make_inputs(seed)
    params = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
    wd = case["weight_decay"]
    groups = [
        {"params": [p for n, p in params.items() if hf_decays(n)], "weight_decay": wd},
        {"params": [p for n, p in params.items() if not hf_decays(n)], "weight_decay": 0.0},
    ]
    kind = case["kind"]
    if kind == "adamw":
        opt = torch.optim.AdamW(
            groups, lr=LRS[0], betas=(case["adam_beta1"], case["adam_beta2"]), eps=case["adam_epsilon"], foreach=False
        )
    elif kind == "rmsprop":
        opt = torch.optim.RMSprop(
            groups, lr=LRS[0], alpha=case["rmsprop_alpha"], eps=case["adam_epsilon"], momentum=case["momentum"],
            foreach=False,
        )
    elif kind == "sgd":
        opt = torch.optim.SGD(groups, lr=LRS[0], momentum=case["momentum"], foreach=False)
    else:
        raise ValueError(kind)
    after = []
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = LRS[step]
        for n, p in params.items():
            p.grad = grads[step][n].clone()
        opt.step()
        after.append({n: p.detach().flatten().tolist() for n, p in params.items()})
    return {
        **case,
        "init": {n: t.flatten().tolist() for n, t in init.items()},
        "grads": [{n: t.flatten().tolist() for n, t in gs.items()} for gs in grads],
        "lrs": LRS,
        "after": after,
    }


def optimizer_cases() -> list[dict]:
    base = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "rmsprop_alpha": 0.99, "momentum": 0.0}
    cases = [
        ("adamw_wd0", {"kind": "adamw", "weight_decay": 0.0}),
        ("adamw_wd0.01", {"kind": "adamw", "weight_decay": 0.01}),
        ("adamw_betas", {"kind": "adamw", "weight_decay": 0.1, "adam_beta1": 0.8, "adam_beta2": 0.95,
                         "adam_epsilon": 1e-6}),
        ("rmsprop_wd0", {"kind": "rmsprop", "weight_decay": 0.0}),
        ("rmsprop_wd0.01", {"kind": "rmsprop", "weight_decay": 0.01}),
        ("rmsprop_momentum", {"kind": "rmsprop", "weight_decay": 0.01, "momentum": 0.9, "rmsprop_alpha": 0.9}),
        ("sgd_wd0", {"kind": "sgd", "weight_decay": 0.0}),
        ("sgd_wd0.01", {"kind": "sgd", "weight_decay": 0.01}),
        ("sgd_momentum", {"kind": "sgd", "weight_decay": 0.01, "momentum": 0.9}),
    ]
    out = []
    for i, (name, over) in enumerate(cases):
        case = {"name": name, **base, **over}
        out.append(run_optimizer(case, seed=1000 + i))
    return out


def schedule_cases() -> dict:
    base_lr = 2e-5
    runs = []
    for name in ["constant", "constant_with_warmup", "linear", "cosine"]:
        for warmup, total in [(0, 10), (3, 10), (4, 7), (10, 10), (12, 10), (1, 1)]:
            if name == "constant" and warmup != 0:
                continue
            p = torch.nn.Parameter(torch.zeros(1))
            opt = torch.optim.SGD([p], lr=base_lr)
            kwargs = {} if name == "constant" else {"num_warmup_steps": warmup}
            if name in ("linear", "cosine"):
                kwargs["num_training_steps"] = total
            sched = get_scheduler(name, opt, **kwargs)
            lrs = []
            for _ in range(total + 2):
                lrs.append(opt.param_groups[0]["lr"])  # the lr this optimizer step uses
                opt.step()
                sched.step()
            runs.append({"name": name, "base_lr": base_lr, "warmup_steps": warmup, "total_steps": total, "lrs": lrs})
    # transformers 5 folded warmup_ratio into warmup_steps: a float in [0, 1) is a ratio.
    warmup = []
    for ratio, total in [(0.1, 30), (0.1, 100), (0.03, 1000), (0.05, 7), (0.5, 3), (0.0, 10), (0.999, 10)]:
        args = types.SimpleNamespace(warmup_steps=ratio)
        warmup.append({"ratio": ratio, "total_steps": total,
                       "warmup_steps": TrainingArguments.get_warmup_steps(args, total)})
    return {"runs": runs, "warmup_from_ratio": warmup}


def clipping_cases() -> list[dict]:
    g = torch.Generator().manual_seed(7)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    out = []
    for scale, max_norm in [(1.0, 1.0), (1.0, 100.0), (10.0, 0.5), (1e-3, 1.0)]:
        grads = [torch.randn(s, generator=g, dtype=torch.float32) * scale for s in shapes]
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        for p, t in zip(params, grads):
            p.grad = t.clone()
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
        out.append({
            "max_norm": max_norm,
            "grads": [t.flatten().tolist() for t in grads],
            "shapes": [list(s) for s in shapes],
            "norm": float(norm),
            "clipped": [p.grad.flatten().tolist() for p in params],
        })
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    doc = {
        "generator": "scripts/make_optim_fixtures.py",
        "versions": {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__},
        "shapes": {n: list(s) for n, s in SHAPES.items()},
        "optimizers": optimizer_cases(),
        "schedules": schedule_cases(),
        "clipping": clipping_cases(),
    }
    path = OUT / "optim.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
