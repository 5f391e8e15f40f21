//! Reward-model training against plain PyTorch (fixtures/expected/train/reward_*.json, made
//! by scripts/make_reward_fixtures.py): TRL's tokenization, 3 steps of the Bradley-Terry loss
//! (with a margin column and the centering term on one of them), and an exact resume.

use std::path::Path;

use prefopt_data::HfTokenizer;
use prefopt_model::{Params, RewardWeights};
use prefopt_train::metrics::MetricsLog;
use prefopt_train::reward::RewardDataset;
use prefopt_train::{train_reward, Quiet, TrainConfig};

use crate::trajectory::parity_config;
use crate::util::{device, fixtures};

fn reward_config(model: &str, data: &str, out: &Path) -> TrainConfig {
    TrainConfig { train_data: fixtures().join("data").join(data), ..parity_config(model, out) }
}

fn expected(model: &str, data: &str) -> serde_json::Value {
    let stem = data.trim_end_matches(".jsonl");
    let path = fixtures().join(format!("expected/train/reward_{model}__{stem}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn reward_pairs_tokenize_as_trl_makes_them() {
    for (model, data) in
        [("qwen2-rm", "chat.jsonl"), ("qwen2-rm", "chat_implicit.jsonl"), ("llama-rm", "plain_margin.jsonl")]
    {
        let want = expected(model, data);
        let tok = HfTokenizer::from_dir(&fixtures().join("models").join(model)).unwrap();
        let got = RewardDataset::load(&fixtures().join("data").join(data), &tok, 1024).unwrap();
        let want_ids = want["input_ids"].as_array().unwrap();
        assert_eq!(got.len(), want_ids.len(), "{data}");
        for (i, (g, w)) in got.pairs.iter().zip(want_ids).enumerate() {
            assert_eq!(g.chosen, ids(&w["chosen"]), "{model} {data} pair {i} chosen");
            assert_eq!(g.rejected, ids(&w["rejected"]), "{model} {data} pair {i} rejected");
        }
        assert_eq!(got.margins.is_some(), data == "plain_margin.jsonl");
    }
}

#[test]
fn reward_model_trajectories_match_pytorch() {
    let cases = [
        ("qwen2-rm", "chat.jsonl", None),
        ("qwen2-rm", "chat_implicit.jsonl", None),
        ("llama-rm", "plain_margin.jsonl", Some(0.01)),
    ];
    // Packed (the default) and right-padded batches.
    for ((model, data, center), padding_free) in cases.into_iter().flat_map(|c| [(c, true), (c, false)]) {
        let want = expected(model, data);
        let tmp = tempfile::tempdir().unwrap();
        let cfg =
            TrainConfig { center_rewards_coefficient: center, padding_free, ..reward_config(model, data, tmp.path()) };
        let summary = train_reward(&cfg, &mut Quiet).unwrap_or_else(|e| panic!("{e}"));
        let got = MetricsLog::read_all(&summary.metrics_path);
        let steps = want["steps"].as_array().unwrap();
        let steps64 = want["float64"]["steps"].as_array().unwrap();
        assert_eq!(got.len(), steps.len(), "{model} {data}: logged lines");
        let (mut worst_loss, mut worst_norm) = (0f64, 0f64);
        for ((g, w), w64) in got.iter().zip(steps).zip(steps64) {
            let at = format!("{model} {data} padding_free {padding_free} step {}", w["step"]);
            let value = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{at}: no `{k}`"));
            // 1e-5, or twice torch's own float32 error against float64 where that is larger.
            let (gl, wl) = (value(g, "loss"), value(w, "loss"));
            let tolerance = 1e-5f64.max(2.0 * (wl - value(w64, "loss")).abs());
            assert!((gl - wl).abs() < tolerance, "{at}: loss {gl} vs torch {wl}");
            let (gn, wn) = (value(g, "grad_norm"), value(w, "grad_norm"));
            (worst_loss, worst_norm) = (worst_loss.max((gl - wl).abs()), worst_norm.max(((gn - wn) / wn).abs()));
            assert!(((gn - wn) / wn).abs() < 1e-4, "{at}: grad_norm {gn} vs torch {wn}");
            assert!((value(g, "accuracy") - value(w, "accuracy")).abs() < 1e-12, "{at}: accuracy");
            for key in ["margin", "mean_reward", "min_reward", "max_reward"] {
                let (a, b) = (value(g, key), value(w, key));
                assert!((a - b).abs() < 1e-4, "{at}: {key} {a} vs torch {b}");
            }
        }
        eprintln!(
            "{model} {data} padding_free {padding_free}: |loss - torch| <= {worst_loss:.1e}, grad_norm relative <= \
             {worst_norm:.1e}"
        );

        // Every tensor moved (each got a gradient), the head included; the saved folder is a
        // sequence classifier with one label and the pad id the reward was read with.
        let start = RewardWeights::load(&fixtures().join("models").join(model), &device()).unwrap();
        let trained = RewardWeights::load(&summary.final_dir, &device()).unwrap();
        assert_eq!(trained.model.params.len(), start.model.params.len());
        for (name, var) in trained.model.params.iter() {
            let before = start.model.params.get(name).unwrap().as_tensor();
            let moved =
                (var.as_tensor() - before).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(moved > 0.0, "{model}: `{name}` did not move");
        }
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(summary.final_dir.join("config.json")).unwrap()).unwrap();
        assert!(config["architectures"][0].as_str().unwrap().ends_with("ForSequenceClassification"));
        assert_eq!(config["id2label"], serde_json::json!({"0": "LABEL_0"}));
        assert!(!names_in(&summary.final_dir).iter().any(|n| n.starts_with("lm_head")));
    }
}

fn names_in(dir: &Path) -> Vec<String> {
    let (params, unused) = Params::load(dir, &[], &device()).unwrap();
    assert!(params.is_empty());
    unused
}

#[test]
fn a_causal_lm_gets_a_seeded_head_and_a_resumed_run_matches_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |out: &Path, steps: i64, resume: bool| {
        let cfg = TrainConfig {
            max_steps: steps,
            save_steps: 1,
            batch_size: 4,
            resume_from_checkpoint: resume.then(|| "latest".to_string()),
            ..reward_config("llama-tied", "plain.jsonl", out)
        };
        train_reward(&cfg, &mut Quiet).unwrap_or_else(|e| panic!("{e}"))
    };
    let whole = run(&tmp.path().join("whole"), 3, false);
    let part = tmp.path().join("part");
    run(&part, 2, false);
    std::fs::remove_dir_all(part.join("final")).unwrap();
    let resumed = run(&part, 3, true);
    let bytes = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    assert_eq!(bytes(&whole.final_dir), bytes(&resumed.final_dir), "resumed reward model differs");
    assert_eq!(MetricsLog::read_all(&whole.metrics_path), MetricsLog::read_all(&resumed.metrics_path));

    // The new head: one label, drawn from the seed (another seed, another head), and the
    // config records the EOS as the pad id (the llama tokenizer has no pad token), as TRL does.
    let head = |seed: u64| {
        let w = RewardWeights::load_or_init(&fixtures().join("models/llama-tied"), seed, &device()).unwrap();
        assert!(w.new_head && w.num_labels == 1);
        w.score().as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    assert_eq!(head(42), head(42));
    assert_ne!(head(42), head(43));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(whole.final_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"], serde_json::json!(["LlamaForSequenceClassification"]));
    assert_eq!(config["pad_token_id"], 484);
}

#[test]
fn reward_only_keys_and_bad_values_are_refused_at_config_load() {
    let model = fixtures().join("models/qwen2-rm");
    let base = [format!("model=\"{}\"", model.display()), "train_data=\"d.jsonl\"".into(), "output_dir=\"o\"".into()];
    let load = |extra: &str| {
        let sets: Vec<String> = base.iter().cloned().chain([extra.to_string()]).collect();
        TrainConfig::load_reward(None, &sets)
    };
    let e = load("beta=0.2").unwrap_err().to_string();
    assert!(e.contains("`beta` does not apply to `prefopt reward`"), "{e}");
    let e = load("use_peft=true").unwrap_err().to_string();
    assert!(e.contains("`use_peft` does not apply"), "{e}");
    let e = load("center_rewards_coefficient=-1.0").unwrap_err().to_string();
    assert!(e.contains("center_rewards_coefficient"), "{e}");
    assert_eq!(load("seed=1").unwrap().learning_rate, 1e-4);
}
