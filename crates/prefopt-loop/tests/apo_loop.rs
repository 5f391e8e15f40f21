//! The APO loop end to end on a tiny fixture model: the saved weights obey the
//! extrapolation identity, alpha = 0 is iterative DPO (extrapolated == trained), the layout
//! and manifest are complete, and a rerun resumes instead of redoing finished stages.

use std::path::{Path, PathBuf};

use candle_core::Device;
use prefopt_loop::apo::{run_apo, ApoConfig, LoopObserver};
use prefopt_model::HfModel;

struct Silent;
impl prefopt_train::Observer for Silent {}
impl LoopObserver for Silent {}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// A judge command that scores the i-th completion i (1-based): deterministic, never tied.
const RANK_JUDGE: &str = r#"cmd:awk -F'","' '{printf "{\"scores\": ["; for (i = 1; i <= NF; i++) printf "%s%d", (i > 1 ? "," : ""), i; print "]}"}'"#;

fn config(out: &Path, alpha: f64) -> ApoConfig {
    let prompts = out.with_extension("prompts.jsonl");
    let rows: String = ["What is 2 + 2?", "Name a color.", "Say hello.", "Count to three.", "What is 10 - 3?"]
        .iter()
        .map(|p| format!("{{\"prompt\": \"{p}\"}}\n"))
        .collect();
    std::fs::write(&prompts, rows).unwrap();
    let train: toml::Table = toml::from_str(
        "learning_rate = 1e-3\nmax_steps = 2\nbatch_size = 4\nlr_scheduler_type = \"constant\"\nlogging_steps = 1\nsave_steps = 0\nmax_length = 128",
    )
    .unwrap();
    ApoConfig {
        model: fixtures().join("models/qwen2-tied"),
        prompts: prompts.display().to_string(),
        judge: RANK_JUDGE.into(),
        iterations: 3,
        prompts_per_iteration: 4,
        num_samples: 3,
        alpha,
        max_new_tokens: 8,
        num_eval_prompts: 5,
        output_dir: out.to_path_buf(),
        train,
        ..ApoConfig::default()
    }
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let hf = HfModel::load(dir, &Device::Cpu).unwrap();
    hf.params.iter().map(|(n, v)| (n.clone(), v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())).collect()
}

#[test]
fn saved_weights_satisfy_the_extrapolation_identity_over_three_iterations() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("apo");
    let manifest = run_apo(&config(&out, 0.3), &mut Silent).unwrap();
    assert_eq!(manifest.iterations.len(), 3);
    let mut previous = weights(&fixtures().join("models/qwen2-tied"));
    for t in 1..=3 {
        let dir = out.join(format!("iter-{t}"));
        for f in [
            "samples.jsonl",
            "pairs.jsonl",
            "metrics.jsonl",
            "trained/model.safetensors",
            "extrapolated/model.safetensors",
        ] {
            assert!(dir.join(f).exists(), "iter-{t}/{f} missing");
        }
        let trained = weights(&dir.join("trained"));
        let extrapolated = weights(&dir.join("extrapolated"));
        let mut worst = 0f64;
        for (((name, tr), (_, ex)), (_, prev)) in trained.iter().zip(&extrapolated).zip(&previous) {
            for ((a, b), c) in tr.iter().zip(ex).zip(prev) {
                let want = *a as f64 + 0.3 * (*a as f64 - *c as f64);
                let rel = (*b as f64 - want).abs() / want.abs().max(1e-3);
                worst = worst.max(rel);
                assert!(rel < 1e-6, "iter {t} {name}: {b} vs {want}");
            }
        }
        assert!(trained != previous, "iteration {t} did not train");
        eprintln!("iteration {t}: max relative error of the extrapolation identity {worst:.2e}");
        previous = trained;
        let record = &manifest.iterations[t - 1];
        assert_eq!(record.pair_count, 4);
        assert!(record.eval_trained.is_some() && record.eval_extrapolated.is_some());
    }
    assert!(manifest.base_eval.is_some());

    // Rerunning the same config finds every stage done and changes nothing.
    let before = std::fs::read(out.join("iter-3/extrapolated/model.safetensors")).unwrap();
    let again = run_apo(&config(&out, 0.3), &mut Silent).unwrap();
    assert_eq!(again.iterations.len(), 3);
    assert_eq!(before, std::fs::read(out.join("iter-3/extrapolated/model.safetensors")).unwrap());
    // Another config in the same folder is refused.
    assert!(run_apo(&config(&out, 0.6), &mut Silent).is_err());
}

#[test]
fn alpha_zero_is_iterative_dpo_extrapolated_equals_trained() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dpo");
    let mut cfg = config(&out, 0.0);
    cfg.iterations = 2;
    run_apo(&cfg, &mut Silent).unwrap();
    for t in 1..=2 {
        let dir = out.join(format!("iter-{t}"));
        assert_eq!(
            std::fs::read(dir.join("trained/model.safetensors")).unwrap(),
            std::fs::read(dir.join("extrapolated/model.safetensors")).unwrap(),
            "iteration {t}"
        );
    }
}

#[test]
fn judge_failures_are_clear_errors_and_keep_finished_stages() {
    let tmp = tempfile::tempdir().unwrap();
    // One score per prompt: the held-out evaluation (one completion each) passes, pairing
    // (three completions each) does not.
    let out = tmp.path().join("count");
    let mut cfg = config(&out, 0.3);
    cfg.judge = r#"cmd:awk '{print "{\"scores\": [1]}"}'"#.into();
    let err = run_apo(&cfg, &mut Silent).unwrap_err().to_string();
    assert!(err.contains("returned 1 scores for 3 completions"), "{err}");
    assert!(out.join("iter-1/samples.jsonl").exists(), "the finished sampling stage was lost");

    let mut cfg = config(&tmp.path().join("crash"), 0.3);
    cfg.judge = "cmd:echo boom >&2; exit 3".into();
    let err = run_apo(&cfg, &mut Silent).unwrap_err().to_string();
    assert!(err.contains("exit") && err.contains("boom"), "{err}");

    let mut cfg = config(&tmp.path().join("nan"), 0.3);
    cfg.judge = r#"cmd:awk '{print "{\"scores\": [\"x\"]}"}'"#.into();
    let err = run_apo(&cfg, &mut Silent).unwrap_err().to_string();
    assert!(err.contains("not a finite number"), "{err}");

    let mut cfg = config(&tmp.path().join("empty"), 0.3);
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    cfg.prompts = empty.display().to_string();
    let err = run_apo(&cfg, &mut Silent).unwrap_err().to_string();
    assert!(err.contains("empty.jsonl") && err.contains("no prompts"), "{err}");
}
