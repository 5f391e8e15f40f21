#!/usr/bin/env python3
"""Build prefopt's training reference fixtures (Part 2), under fixtures/expected/train/.

Run from the repository root, after scripts/make_fixtures.py:

    /work/pyenv/bin/python scripts/make_train_fixtures.py

Outputs:

  losses_crosscheck.json
      The methods.md section 2 cross-check tensors (policy lp_w / lp_l, reference ref_w / ref_l,
      beta 0.1, plus the completion lengths and SPPO win probabilities chosen here) and, for every
      loss, the per-pair values and the batch mean, in float64. Formulas are TRL's where TRL has
      the loss (TRL 1.16: DPOTrainer._compute_loss for sigmoid, hinge, ipo, robust, nca_pair,
      sppo_hard, bco_pair, apo_zero, apo_down, exo_pair, sigmoid_norm, sft; the experimental
      CPOTrainer for simpo and for the label-smoothed (cDPO) sigmoid), and methods.md's otherwise
      (sppo soft, dpop, the per-pair sft).

  traj_<model>__<loss>.json
      3 optimizer steps of plain PyTorch (no TRL trainer) on fixtures/data/plain.jsonl
      (max_length none, tokenized exactly as in make_fixtures.py), the whole dataset as one
      batch, reference = the frozen initial model, AdamW(lr 1e-3, betas (0.9, 0.999), eps 1e-8,
      weight_decay 0), constant LR, no clipping. Per step (values before the step): loss,
      grad_norm (global L2 over all parameters), rewards/*, logps/*, and the per-example
      log-probs. After 3 steps: the L2 norm of all parameters and the sum of each parameter.
      Tied embeddings are one parameter (as in torch). Main values are computed in float32;
      the same run in float64 is stored under "float64" as a measure of numerical sensitivity.

Deterministic: single-threaded CPU, fixed inputs; rerunning gives identical files.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import tokenize_example  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
OUT = FIX / "expected" / "train"

try:
    import trl

    TRL_VERSION = trl.__version__
except Exception:  # noqa: BLE001
    TRL_VERSION = None

# --------------------------------------------------------------------------------------
# The loss family, per pair (methods.md section 2), written as TRL writes it.
# --------------------------------------------------------------------------------------


def per_pair_loss(
    name: str,
    lp_w: torch.Tensor,
    lp_l: torch.Tensor,
    ref_w: torch.Tensor | None,
    ref_l: torch.Tensor | None,
    n_w: torch.Tensor,
    n_l: torch.Tensor,
    p: dict,
) -> torch.Tensor:
    """Per-pair loss vector. n_w / n_l: completion token counts (float tensors)."""
    beta = p.get("beta", 0.1)
    if ref_w is not None:
        chosen_logratios = lp_w - ref_w
        rejected_logratios = lp_l - ref_l
        delta = chosen_logratios - rejected_logratios
    if name == "sigmoid":  # TRL DPOTrainer
        return -F.logsigmoid(beta * delta)
    if name == "cdpo":  # label-smoothed sigmoid: TRL CPOTrainer "sigmoid" (and TRL < 1.0 DPOTrainer)
        e = p["label_smoothing"]
        return -F.logsigmoid(beta * delta) * (1 - e) - F.logsigmoid(-beta * delta) * e
    if name == "robust":  # TRL DPOTrainer
        e = p["label_smoothing"]
        clean = -(1 - e) * F.logsigmoid(beta * delta)
        flipped = -e * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * e)
    if name == "hinge":  # TRL DPOTrainer
        return torch.relu(1 - beta * delta)
    if name == "ipo":  # TRL DPOTrainer: length-normalized
        ipo_delta = chosen_logratios / n_w.clamp(min=1.0) - rejected_logratios / n_l.clamp(min=1.0)
        return (ipo_delta - 1 / (2 * beta)) ** 2
    if name == "sppo_hard":  # TRL DPOTrainer
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if name == "sppo":  # methods.md (soft SPPO); not in TRL
        pw, pl = p["p_w"], p["p_l"]
        return 0.5 * ((chosen_logratios - (pw - 0.5) / beta) ** 2 + (rejected_logratios - (pl - 0.5) / beta) ** 2)
    if name == "nca_pair":  # TRL DPOTrainer
        cr, rr = beta * chosen_logratios, beta * rejected_logratios
        return -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)
    if name == "simpo":  # TRL CPOTrainer loss_type="simpo", label_smoothing 0; no reference
        gamma = p["gamma"]
        logits = lp_w / n_w - lp_l / n_l - gamma / beta
        return -F.logsigmoid(beta * logits)
    if name == "dpop":  # methods.md (DPO-Positive); not in TRL
        lam = p["lambda"]
        return -F.logsigmoid(beta * (delta - lam * torch.clamp(ref_w - lp_w, min=0.0)))
    if name == "sft":  # methods.md: per-pair token-mean NLL of the chosen completion
        return -lp_w / n_w
    if name == "cpo":  # TRL CPOTrainer loss_type="sigmoid" + cpo_alpha * NLL (per pair here; TRL's NLL is a token mean)
        e = p.get("label_smoothing", 0.0)
        logits = lp_w - lp_l
        pref = -F.logsigmoid(beta * logits) * (1 - e) - F.logsigmoid(-beta * logits) * e
        return pref + p["cpo_alpha"] * (-lp_w / n_w)
    if name == "rdpo":  # R-DPO (Park et al. 2024): DPO with a length term in the margin
        return -F.logsigmoid(beta * delta - p["rdpo_alpha"] * (n_w - n_l))
    if name == "bco_pair":  # TRL DPOTrainer
        cr, rr = beta * chosen_logratios, beta * rejected_logratios
        return -F.logsigmoid(cr) - F.logsigmoid(-rr)
    if name == "apo_zero":  # TRL DPOTrainer
        return (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    if name == "apo_down":  # TRL DPOTrainer
        return torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * delta))
    if name == "exo_pair":  # TRL DPOTrainer
        e = torch.tensor(p["label_smoothing"], dtype=lp_w.dtype)
        qw, log_qw = torch.sigmoid(beta * delta), F.logsigmoid(beta * delta)
        ql, log_ql = torch.sigmoid(-beta * delta), F.logsigmoid(-beta * delta)
        return qw * (log_qw - torch.log1p(-e)) + ql * (log_ql - torch.log(e))
    if name == "sigmoid_norm":  # TRL DPOTrainer
        d = chosen_logratios / n_w.clamp(min=1.0) - rejected_logratios / n_l.clamp(min=1.0)
        return -F.logsigmoid(beta * d)
    raise ValueError(name)


def sft_tokenmean(lp_w: torch.Tensor, n_w: torch.Tensor) -> torch.Tensor:
    """TRL 1.16 DPOTrainer loss_type="sft": mean NLL over all chosen completion tokens of the
    batch (one scalar, not a mean of per-pair means)."""
    return -lp_w.sum() / n_w.sum()


# --------------------------------------------------------------------------------------
# Cross-check tensors
# --------------------------------------------------------------------------------------

XC = {
    "lp_w": [-3.0, -2.5, -4.0, -1.5],
    "lp_l": [-5.0, -3.5, -6.0, -2.5],
    "ref_w": [-2.8, -2.3, -3.8, -1.4],
    "ref_l": [-3.2, -2.7, -4.2, -1.8],
    "len_w": [3, 2, 4, 1],
    "len_l": [5, 3, 6, 2],
    "sppo_p_w": [0.8, 0.6, 0.9, 0.55],
    "sppo_p_l": [0.3, 0.45, 0.2, 0.5],
}

XC_LOSSES = [
    ("sigmoid", {"beta": 0.1}, "TRL DPOTrainer sigmoid: -logsig(beta*h)"),
    ("cdpo", {"beta": 0.1, "label_smoothing": 0.1}, "-(1-e)*logsig(beta*h) - e*logsig(-beta*h); TRL CPOTrainer sigmoid"),
    ("robust", {"beta": 0.1, "label_smoothing": 0.1}, "TRL DPOTrainer robust"),
    ("hinge", {"beta": 0.1}, "TRL DPOTrainer hinge: relu(1 - beta*h)"),
    ("ipo", {"beta": 0.1}, "TRL DPOTrainer ipo, length-normalized by len_w / len_l"),
    ("sppo_hard", {"beta": 0.1}, "TRL DPOTrainer sppo_hard"),
    ("sppo", {"beta": 0.1}, "methods.md soft SPPO with p_w = sppo_p_w, p_l = sppo_p_l (not in TRL)"),
    ("nca_pair", {"beta": 0.1}, "TRL DPOTrainer nca_pair"),
    ("simpo", {"beta": 2.5, "gamma": 1.375}, "TRL CPOTrainer simpo (label_smoothing 0): -logsig(beta*(lp_w/len_w - lp_l/len_l) - gamma)"),
    ("dpop", {"beta": 0.1, "lambda": 50.0}, "methods.md DPO-Positive (not in TRL 1.16)"),
    ("sft", {}, "methods.md: per pair -lp_w/len_w, batch = mean over pairs"),
    ("cpo", {"beta": 0.1, "label_smoothing": 0.1, "cpo_alpha": 0.7},
     "TRL CPOTrainer sigmoid on lp_w - lp_l (cDPO smoothing) + cpo_alpha * (-lp_w/len_w) per pair"),
    ("rdpo", {"beta": 0.1, "rdpo_alpha": 0.05}, "R-DPO: -logsig(beta*h - rdpo_alpha*(len_w - len_l))"),
    ("bco_pair", {"beta": 0.1}, "TRL DPOTrainer bco_pair (extra)"),
    ("apo_zero", {"beta": 0.1}, "TRL DPOTrainer apo_zero (extra)"),
    ("apo_down", {"beta": 0.1}, "TRL DPOTrainer apo_down (extra)"),
    ("exo_pair", {"beta": 0.1, "label_smoothing": 0.1}, "TRL DPOTrainer exo_pair (extra)"),
    ("sigmoid_norm", {"beta": 0.1}, "TRL DPOTrainer sigmoid_norm (extra)"),
]


def crosscheck() -> dict:
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in XC.items()}
    lp_w, lp_l, ref_w, ref_l = t["lp_w"], t["lp_l"], t["ref_w"], t["ref_l"]
    n_w, n_l = t["len_w"], t["len_l"]
    beta = 0.1
    out = {
        "description": "methods.md section 2 cross-check tensors; float64; per_pair[i] is pair i, mean is the batch loss",
        "trl_version": TRL_VERSION,
        "inputs": XC,
        "derived": {
            "rho_w": (lp_w - ref_w).tolist(),
            "rho_l": (lp_l - ref_l).tolist(),
            "h": ((lp_w - ref_w) - (lp_l - ref_l)).tolist(),
        },
        "metrics_beta_0.1": {
            "rewards/chosen": (beta * (lp_w - ref_w)).mean().item(),
            "rewards/rejected": (beta * (lp_l - ref_l)).mean().item(),
            "rewards/margins": (beta * ((lp_w - ref_w) - (lp_l - ref_l))).mean().item(),
            "rewards/accuracies": ((lp_w - ref_w) > (lp_l - ref_l)).double().mean().item(),
            "logps/chosen": lp_w.mean().item(),
            "logps/rejected": lp_l.mean().item(),
        },
        "losses": {},
    }
    for name, params, formula in XC_LOSSES:
        pp = dict(params)
        if name == "sppo":
            pp["p_w"], pp["p_l"] = t["sppo_p_w"], t["sppo_p_l"]
        v = per_pair_loss(name, lp_w, lp_l, ref_w, ref_l, n_w, n_l, pp)
        out["losses"][name] = {"params": params, "formula": formula, "per_pair": v.tolist(), "mean": v.mean().item()}
    v = sft_tokenmean(lp_w, n_w)
    out["losses"]["sft_tokenmean"] = {
        "params": {},
        "formula": "TRL 1.16 DPOTrainer sft: -sum(lp_w) / sum(len_w) over the batch (differs from methods.md's per-pair mean)",
        "per_pair": None,
        "mean": v.item(),
    }
    s = per_pair_loss("sigmoid", lp_w, lp_l, ref_w, ref_l, n_w, n_l, {"beta": 0.1}).mean()
    out["losses"]["sigmoid+sft"] = {
        "params": {"beta": 0.1, "weights": [1.0, 1.0]},
        "formula": "1.0*mean(sigmoid) + 1.0*mean(sft per pair) (RPO with alpha 1)",
        "per_pair": None,
        "mean": (s + per_pair_loss("sft", lp_w, lp_l, None, None, n_w, n_l, {}).mean()).item(),
    }
    return out


# --------------------------------------------------------------------------------------
# Trajectories
# --------------------------------------------------------------------------------------

TRAJ_MODELS = ["llama-untied", "qwen2-tied"]
TRAJ_LOSSES = [
    ("sigmoid", [("sigmoid", 1.0)], {"beta": 0.1}),
    ("ipo", [("ipo", 1.0)], {"beta": 0.1}),
    ("simpo", [("simpo", 1.0)], {"beta": 2.5, "gamma": 1.375}),
    ("sppo_hard", [("sppo_hard", 1.0)], {"beta": 0.1}),
    ("robust", [("robust", 1.0)], {"beta": 0.1, "label_smoothing": 0.1}),
    ("sigmoid+sft", [("sigmoid", 1.0), ("sft", 1.0)], {"beta": 0.1}),
    ("sigmoid+sft_tokenmean", [("sigmoid", 1.0), ("sft_tokenmean", 1.0)], {"beta": 0.1}),
]
LR, BETAS, EPS, WD, STEPS = 1e-3, (0.9, 0.999), 1e-8, 0.0, 3


def load_batch(model_name: str) -> list[dict]:
    folder = FIX / "models" / model_name
    tok = AutoTokenizer.from_pretrained(str(folder))
    rows = [json.loads(line) for line in open(FIX / "data" / "plain.jsonl", encoding="utf-8")]
    out = []
    for ex in rows:
        t = tokenize_example(tok, ex)
        out.append({"chosen": (t["chosen_ids"], t["a"]), "rejected": (t["rejected_ids"], t["b"])})
    return out


def seq_logps(model, batch: list[dict], dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence completion log-prob sums, one forward per sequence (no padding)."""
    lw, ll = [], []
    for ex in batch:
        for side, acc in (("chosen", lw), ("rejected", ll)):
            ids, start = ex[side]
            logits = model(torch.tensor([ids])).logits[0].to(dtype)
            logp = torch.log_softmax(logits, dim=-1)
            tgt = torch.tensor(ids[start:])
            acc.append(logp[start - 1 : len(ids) - 1].gather(1, tgt.unsqueeze(1)).sum())
    return torch.stack(lw), torch.stack(ll)


def total_loss(parts, params, lp_w, lp_l, ref_w, ref_l, n_w, n_l):
    loss = 0.0
    for name, weight in parts:
        if name == "sft_tokenmean":
            loss = loss + weight * sft_tokenmean(lp_w, n_w)
        else:
            loss = loss + weight * per_pair_loss(name, lp_w, lp_l, ref_w, ref_l, n_w, n_l, params).mean()
    return loss


def run_trajectory(model_name: str, parts, params, batch, dtype) -> dict:
    folder = FIX / "models" / model_name
    policy = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(dtype)
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(dtype)
    policy.train()  # no dropout in these configs; train() only for realism
    ref.eval()
    for p_ in ref.parameters():
        p_.requires_grad_(False)
    named = list(policy.named_parameters())  # tied weights appear once
    opt = torch.optim.AdamW(
        [p_ for _, p_ in named], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False
    )
    n_w = torch.tensor([float(len(ex["chosen"][0]) - ex["chosen"][1]) for ex in batch], dtype=dtype)
    n_l = torch.tensor([float(len(ex["rejected"][0]) - ex["rejected"][1]) for ex in batch], dtype=dtype)
    with torch.no_grad():
        ref_w, ref_l = seq_logps(ref, batch, dtype)
    beta = params.get("beta", 0.1)
    steps = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        lp_w, lp_l = seq_logps(policy, batch, dtype)
        loss = total_loss(parts, params, lp_w, lp_l, ref_w, ref_l, n_w, n_l)
        loss.backward()
        sq = sum(float(p_.grad.double().pow(2).sum()) for _, p_ in named if p_.grad is not None)
        rho_w = (lp_w - ref_w).detach()
        rho_l = (lp_l - ref_l).detach()
        steps.append(
            {
                "step": step,
                "loss": float(loss.item()),
                "grad_norm": math.sqrt(sq),
                "rewards/chosen": float((beta * rho_w).double().mean()),
                "rewards/rejected": float((beta * rho_l).double().mean()),
                "rewards/margins": float((beta * (rho_w - rho_l)).double().mean()),
                "rewards/accuracies": float((rho_w > rho_l).double().mean()),
                "logps/chosen": float(lp_w.detach().double().mean()),
                "logps/rejected": float(lp_l.detach().double().mean()),
                "per_example": {
                    "logp_chosen": [float(x) for x in lp_w.detach().tolist()],
                    "logp_rejected": [float(x) for x in lp_l.detach().tolist()],
                },
            }
        )
        opt.step()
    final = {}
    sq = 0.0
    for name, p_ in named:
        final[name] = float(p_.detach().double().sum())
        sq += float(p_.detach().double().pow(2).sum())
    return {
        "steps": steps,
        "reference": {"logp_chosen": [float(x) for x in ref_w.tolist()], "logp_rejected": [float(x) for x in ref_l.tolist()]},
        "final_params_l2_norm": math.sqrt(sq),
        "final_param_sums": final,
        "n_trainable_tensors": len(named),
        "n_trainable_params": sum(p_.numel() for _, p_ in named),
    }


def trajectory_file(model_name: str, loss_name: str, parts, params, batch) -> dict:
    r32 = run_trajectory(model_name, parts, params, batch, torch.float32)
    r64 = run_trajectory(model_name, parts, params, batch, torch.float64)
    keys = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"]
    rel = 0.0
    for s32, s64 in zip(r32["steps"], r64["steps"]):
        for k in keys:
            rel = max(rel, abs(s32[k] - s64[k]) / max(abs(s64[k]), 1e-12))
    rel_sums = max(
        abs(r32["final_param_sums"][k] - r64["final_param_sums"][k]) / max(abs(r64["final_param_sums"][k]), 1e-6)
        for k in r32["final_param_sums"]
    )
    return {
        "model": model_name,
        "loss": loss_name,
        "loss_terms": [{"name": n, "weight": w} for n, w in parts],
        "params": params,
        "data": "fixtures/data/plain.jsonl",
        "max_length": None,
        "batch": "all 12 pairs in one batch; loss = mean over pairs (sft_tokenmean: mean over all chosen completion tokens)",
        "reference_model": "the initial model, frozen",
        "optimizer": {
            "name": "torch.optim.AdamW",
            "lr": LR,
            "betas": list(BETAS),
            "eps": EPS,
            "weight_decay": WD,
            "schedule": "constant",
            "grad_clipping": None,
        },
        "n_steps": STEPS,
        "conventions": {
            "step_values": "computed before optimizer step `step` (step 0 = initial weights)",
            "grad_norm": "global L2 norm over all trainable parameters (tied embedding counted once)",
            "rewards": "beta * (logp - logp_ref) with this loss's beta and the frozen initial model as reference, "
            "for every loss (including simpo, whose TRL CPOTrainer would log beta * logp / |y| instead)",
            "logps": "mean over pairs of the summed completion log-probs",
            "completion_lengths": "n_tokens_chosen / n_tokens_rejected as in expected/<model>__plain__none.jsonl",
            "dtype": "main values: float32 model, log-softmax and losses in float32; 'float64' = same run in float64",
        },
        "n_tokens_chosen": [len(ex["chosen"][0]) - ex["chosen"][1] for ex in batch],
        "n_tokens_rejected": [len(ex["rejected"][0]) - ex["rejected"][1] for ex in batch],
        **r32,
        "float64": {
            "steps": [{k: s[k] for k in ["step", *keys, "rewards/accuracies"]} for s in r64["steps"]],
            "final_params_l2_norm": r64["final_params_l2_norm"],
            "final_param_sums": r64["final_param_sums"],
        },
        "float32_vs_float64_max_rel_diff": {"step_metrics": rel, "final_param_sums": rel_sums},
    }


def dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for f in OUT.glob("*.json"):
        f.unlink()
    xc = crosscheck()
    dump(OUT / "losses_crosscheck.json", xc)
    for name, entry in xc["losses"].items():
        print(f"{name:22s} mean {entry['mean']!r}")
    summary = {}
    for model_name in TRAJ_MODELS:
        batch = load_batch(model_name)
        for loss_name, parts, params in TRAJ_LOSSES:
            res = trajectory_file(model_name, loss_name, parts, params, batch)
            res["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": TRL_VERSION}
            dump(OUT / f"traj_{model_name}__{loss_name}.json", res)
            summary[f"{model_name}__{loss_name}"] = {
                "loss": [s["loss"] for s in res["steps"]],
                "grad_norm": [s["grad_norm"] for s in res["steps"]],
                "f32_vs_f64": res["float32_vs_float64_max_rel_diff"],
            }
            print(model_name, loss_name, json.dumps(summary[f"{model_name}__{loss_name}"]))


if __name__ == "__main__":
    main()
