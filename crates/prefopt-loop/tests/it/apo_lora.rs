//! The APO loop with LoRA (`train.use_peft`): every iterate is the base plus a weighted
//! stack of the adapters trained so far, and the extrapolation acts on the coefficients. The
//! effective weights obey the extrapolation identity; alpha = 0 is iterative DPO with LoRA
//! (train an adapter, merge it, train a fresh one on the merged model); a run killed mid
//! training resumes to byte-identical adapters.

use std::path::Path;

use candle_core::Device;
use prefopt_loop::apo::{run_apo, ApoConfig, LoopObserver};
use prefopt_model::stack::read_stack;
use prefopt_model::{save_model_dir, Policy};
use prefopt_train::{train, Quiet, TrainConfig};

use crate::apo_loop::config;
use crate::util::{fixtures, Silent};

/// The loop's test config with a rank-4 adapter on every linear layer. Adam's epsilon is 1e-3
/// so that an element whose gradient is ~1e-6 does not move by +-lr on the sign of float
/// noise (the LoRA fixtures' script says more): the alpha = 0 test compares a stack with a
/// merged model, whose float32 sums differ in the last bits.
pub(crate) fn lora_config(out: &Path, alpha: f64) -> ApoConfig {
    let mut cfg = config(out, alpha);
    for (key, value) in [
        ("use_peft", toml::Value::Boolean(true)),
        ("lora_r", toml::Value::Integer(4)),
        ("lora_alpha", toml::Value::Float(8.0)),
        ("lora_target_modules", toml::Value::String("all-linear".into())),
        ("learning_rate", toml::Value::Float(1e-2)),
        ("adam_epsilon", toml::Value::Float(1e-3)),
    ] {
        cfg.train.insert(key.into(), value);
    }
    cfg
}

/// The effective weights of a policy folder, f64, by tensor name.
fn effective(dir: &Path) -> Vec<(String, Vec<f64>)> {
    let merged = Policy::load(dir, &Device::Cpu).unwrap().merged().unwrap();
    merged
        .params
        .iter()
        .map(|(n, v)| {
            let t = v.as_tensor().flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap();
            (n.clone(), t.to_vec1().unwrap())
        })
        .collect()
}

fn norm(v: impl Iterator<Item = f64>) -> f64 {
    v.map(|x| x * x).sum::<f64>().sqrt()
}

#[test]
fn lora_iterates_are_stacks_whose_effective_weights_obey_the_extrapolation_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("apo");
    let alpha = 0.3;
    let manifest = run_apo(&lora_config(&out, alpha), &mut Silent).unwrap();
    assert_eq!(manifest.iterations.len(), 3);
    let base = fixtures().join("models/qwen2-tied");
    let mut previous = effective(&base);
    for t in 1..=3 {
        let dir = out.join(format!("iter-{t}"));
        for f in ["adapter/adapter_model.safetensors", "adapter/adapter_config.json", "trained/adapter_stack.json"] {
            assert!(dir.join(f).exists(), "iter-{t}/{f} missing");
        }
        assert!(
            dir.join("extrapolated/adapter_stack.json").exists() && dir.join("extrapolated/tokenizer.json").exists()
        );
        assert!(!dir.join("trained/model.safetensors").exists(), "a LoRA iterate is a stack, not a model copy");
        let (stack_base, entries) = read_stack(&dir.join("trained")).unwrap();
        assert_eq!(stack_base, std::fs::canonicalize(&base).unwrap());
        assert_eq!(entries.len(), t, "iteration {t}: one adapter per iteration so far");

        let (trained, extrapolated) = (effective(&dir.join("trained")), effective(&dir.join("extrapolated")));
        let mut worst = 0f64;
        for (((name, tr), (_, ex)), (_, prev)) in trained.iter().zip(&extrapolated).zip(&previous) {
            let want: Vec<f64> = tr.iter().zip(prev).map(|(a, c)| a + alpha * (a - c)).collect();
            let rel = norm(ex.iter().zip(&want).map(|(g, w)| g - w)) / norm(want.iter().copied()).max(1e-12);
            worst = worst.max(rel);
            assert!(rel < 1e-6, "iteration {t} {name}: the extrapolation identity is {rel:e} off");
        }
        let moved =
            norm(trained.iter().zip(&previous).flat_map(|((_, a), (_, b))| a.iter().zip(b).map(|(x, y)| x - y)));
        assert!(moved > 1e-3, "iteration {t} did not train (moved {moved})");
        eprintln!("iteration {t}: extrapolation identity on the effective weights within {worst:.1e} (relative)");
        previous = trained;
        assert_eq!(manifest.iterations[t - 1].adapter.as_deref(), Some(dir.join("adapter").as_path()));
    }
    // The policies are usable folders: scoring a stack equals scoring its merged weights.
    let pairs = out.join("iter-3/pairs.jsonl");
    let merged = tmp.path().join("merged");
    let policy = Policy::load(&out.join("iter-3/extrapolated"), &Device::Cpu).unwrap().merged().unwrap();
    save_model_dir(&merged, &policy.raw_config, &policy.params, Some(&base)).unwrap();
    let (a, b) = (logps(&out.join("iter-3/extrapolated"), &pairs), logps(&merged, &pairs));
    for (x, y) in a.iter().zip(&b) {
        assert!((x.0 - y.0).abs() < 1e-4 && (x.1 - y.1).abs() < 1e-4, "stack {x:?} vs merged {y:?}");
    }
}

fn logps(model: &Path, pairs: &Path) -> Vec<(f64, f64)> {
    let opts =
        prefopt_data::TokenizeOptions { max_length: Some(128), max_prompt_length: Some(512), ..Default::default() };
    crate::util::pair_logps(model, pairs, &opts)
}

#[test]
fn lora_alpha_zero_is_iterative_dpo_with_lora() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("apo");
    let mut cfg = lora_config(&out, 0.0);
    cfg.iterations = 2;
    run_apo(&cfg, &mut Silent).unwrap();
    for t in 1..=2 {
        let dir = out.join(format!("iter-{t}"));
        assert_eq!(read_stack(&dir.join("trained")).unwrap(), read_stack(&dir.join("extrapolated")).unwrap());
    }

    // By hand, on the loop's own pairs: a LoRA run on the base, its adapter merged into a
    // model folder, a fresh LoRA run on that model against it.
    let base = fixtures().join("models/qwen2-tied");
    let inner = |model: &Path, t: usize, run: &str| {
        let mut table = cfg.train.clone();
        let path = |p: &Path| toml::Value::String(p.display().to_string());
        table.insert("model".into(), path(model));
        table.insert("train_data".into(), path(&out.join(format!("iter-{t}/pairs.jsonl"))));
        table.insert("output_dir".into(), path(&tmp.path().join(run)));
        table.insert("beta".into(), toml::Value::Float(0.1));
        let train_cfg = TrainConfig::from_table(&table).unwrap();
        train(&train_cfg, &mut Quiet).unwrap().final_dir
    };
    let adapter_1 = inner(&base, 1, "dpo-1");
    let hf = Policy::load(&base, &Device::Cpu)
        .unwrap()
        .with_adapter(&adapter_1, 1.0, &Device::Cpu)
        .unwrap()
        .merged()
        .unwrap();
    let merged_1 = tmp.path().join("merged-1");
    save_model_dir(&merged_1, &hf.raw_config, &hf.params, Some(&base)).unwrap();
    let adapter_2 = inner(&merged_1, 2, "dpo-2");

    let bytes = |p: &Path| std::fs::read(p.join("adapter_model.safetensors")).unwrap();
    assert_eq!(bytes(&adapter_1), bytes(&out.join("iter-1/adapter")), "iteration 1 trains the same adapter");
    // Iteration 2 trains on the stack base + D_1, by hand on its merged weights: the same
    // policy up to float32 rounding.
    let pairs = out.join("iter-2/pairs.jsonl");
    let by_hand = tmp.path().join("by-hand");
    let hf = Policy::load(&merged_1, &Device::Cpu)
        .unwrap()
        .with_adapter(&adapter_2, 1.0, &Device::Cpu)
        .unwrap()
        .merged()
        .unwrap();
    save_model_dir(&by_hand, &hf.raw_config, &hf.params, Some(&base)).unwrap();
    let (looped, manual, start) =
        (logps(&out.join("iter-2/extrapolated"), &pairs), logps(&by_hand, &pairs), logps(&merged_1, &pairs));
    let mut worst = 0f64;
    for ((a, b), s) in looped.iter().zip(&manual).zip(&start) {
        worst = worst.max((a.0 - b.0).abs()).max((a.1 - b.1).abs());
        assert!((a.0 - s.0).abs() > 1e-3, "iteration 2 did not train");
    }
    assert!(worst < 1e-3, "alpha 0 with LoRA vs iterative DPO with LoRA by hand: {worst:e}");
    eprintln!("alpha 0 with LoRA vs iterative DPO with LoRA by hand: log-probs within {worst:.1e}");
}

/// Panics (a kill) at iteration `at.0`'s training step `at.1`.
struct Killer {
    at: (usize, usize),
    iteration: usize,
}
impl prefopt_train::Observer for Killer {
    fn step(&mut self, step: usize, _status: &prefopt_train::StepStatus) {
        if (self.iteration, step) == self.at {
            panic!("killed at iteration {} step {step}", self.iteration);
        }
    }
}
impl LoopObserver for Killer {
    fn stage(&mut self, iteration: usize, _stage: &str) {
        self.iteration = iteration;
    }
}

#[test]
fn a_lora_run_killed_mid_training_resumes_to_identical_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let with = |out: &Path| {
        let mut cfg = lora_config(out, 0.3);
        cfg.iterations = 2;
        cfg.train.insert("save_steps".into(), toml::Value::Integer(1));
        cfg.train.insert("lora_dropout".into(), toml::Value::Float(0.1));
        cfg
    };
    let whole = tmp.path().join("whole");
    run_apo(&with(&whole), &mut Silent).unwrap();

    let killed = tmp.path().join("killed");
    let cfg = with(&killed);
    let crash = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_apo(&cfg, &mut Killer { at: (2, 2), iteration: 0 }).map(|_| ())
    }));
    assert!(crash.is_err(), "the kill did not happen");
    assert!(killed.join("iter-2/train/checkpoint-1").is_dir() && !killed.join("iter-2/adapter").exists());
    run_apo(&cfg, &mut Silent).unwrap();
    for t in 1..=2 {
        let bytes =
            |out: &Path| std::fs::read(out.join(format!("iter-{t}/adapter/adapter_model.safetensors"))).unwrap();
        assert_eq!(bytes(&whole), bytes(&killed), "iteration {t}'s adapter differs after the resume");
        let coefficients = |out: &Path| {
            read_stack(&out.join(format!("iter-{t}/extrapolated")))
                .unwrap()
                .1
                .iter()
                .map(|e| e.coefficient)
                .collect::<Vec<_>>()
        };
        assert_eq!(coefficients(&whole), coefficients(&killed));
    }
}
