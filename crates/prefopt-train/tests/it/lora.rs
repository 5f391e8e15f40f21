//! LoRA against PEFT on the fixtures (fixtures/adapters, fixtures/expected/lora, made by
//! scripts/make_lora_fixtures.py): a PEFT-made adapter scores as PEFT does; continuing it
//! with DPO or SFT follows plain torch + PEFT's trajectory; a fresh adapter starts at the
//! base; only the adapter trains, and `final/` is a PEFT folder prefopt loads back.

use std::path::{Path, PathBuf};

use prefopt_data::{HfTokenizer, TokenizeOptions};
use prefopt_model::{AdapterUse, HfModel, Llama, LoraAdapter, Mode, Precision};
use prefopt_train::dataset::PairDataset;
use prefopt_train::metrics::MetricsLog;
use prefopt_train::{score_pairs, train, train_sft, Quiet, TrainConfig};

use crate::util::{device, fixtures};

const BASES: [&str; 2] = ["llama-untied", "qwen2-tied"];

fn adapter_dir(base: &str) -> PathBuf {
    fixtures().join(format!("adapters/{base}-lora"))
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn a_peft_adapter_scores_as_peft_does() {
    for base in BASES {
        let dir = fixtures().join("models").join(base);
        let hf = HfModel::load(&dir, &device()).unwrap();
        let adapter = LoraAdapter::load(&adapter_dir(base), &hf.config, &device()).unwrap();
        assert_eq!(adapter.modules.len(), 7 * hf.config.num_hidden_layers, "{base}: all seven linear modules");
        let uses = [AdapterUse { adapter: &adapter, coefficient: 1.0, trainable: false }];
        let net = Llama::with_adapters(&hf.config, &hf.params, Mode::Infer, Precision::F32, &uses).unwrap();
        let tok = HfTokenizer::from_dir(&dir).unwrap();
        for dataset in ["plain", "chat"] {
            let opts = TokenizeOptions { max_length: Some(100_000), ..TokenizeOptions::default() };
            let data = PairDataset::load(&fixtures().join(format!("data/{dataset}.jsonl")), &tok, &opts).unwrap();
            let pairs: Vec<_> = data.pairs.iter().collect();
            let got =
                score_pairs(&net, &pairs, 4, TrainConfig::default().batch_layout(tok.padding_id()), |_| {}).unwrap();
            let want = jsonl(&fixtures().join(format!("expected/lora/{base}-lora__{dataset}.jsonl")));
            // Against PEFT in float64, within 1e-4 or twice PEFT-float32's own error. (The random
            // adapters make the model sharp: a token's float32 log-prob is ~1e-5 off in torch
            // and here alike, and a 50-token sum's error is a random walk of those.)
            let (mut ours, mut peft) = (0f64, 0f64);
            for ((w, l), e) in got.iter().zip(&want) {
                for (value, key) in [(*w, "logp_chosen"), (*l, "logp_rejected")] {
                    let exact = e[format!("{key}_f64")].as_f64().unwrap();
                    ours = ours.max((value as f64 - exact).abs());
                    peft = peft.max((e[key].as_f64().unwrap() - exact).abs());
                }
            }
            assert_eq!(got.len(), want.len());
            assert!(ours <= (2.0 * peft).max(1e-4), "{base} {dataset}: {ours:e} from PEFT-f64 (PEFT-f32: {peft:e})");
        }
    }
}

/// The fixture's setup: the whole plain set as one batch, AdamW lr 1e-3, constant rate, no
/// clipping; continuing the PEFT adapter (dropout 0, as the fixture's).
fn continue_config(base: &str, out: &Path) -> TrainConfig {
    TrainConfig {
        adapter: Some(adapter_dir(base)),
        // The fixture's epsilon (scripts/make_lora_fixtures.py says why it is not 1e-8).
        adam_epsilon: 1e-3,
        ..crate::trajectory::parity_config(base, out)
    }
}

/// Each step's loss and grad norm against torch's float64 trajectory, within twice torch's
/// own float32 error (at least 1e-5 relative).
fn check_against(got: &[serde_json::Value], fixture: &Path) {
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let (f32s, f64s) = (want["float32"].as_array().unwrap(), want["float64"].as_array().unwrap());
    assert_eq!(got.len(), 3, "{}: logged steps", fixture.display());
    for ((g, w32), w64) in got.iter().zip(f32s).zip(f64s) {
        for key in ["loss", "grad_norm"] {
            let (ours, exact, torch) =
                (g[key].as_f64().unwrap(), w64[key].as_f64().unwrap(), w32[key].as_f64().unwrap());
            let tolerance = (1e-5 * exact.abs().max(1.0)).max(2.0 * (torch - exact).abs());
            assert!(
                (ours - exact).abs() <= tolerance,
                "{}: step {} {key} {ours} vs torch-f64 {exact} (torch-f32 {torch})",
                fixture.display(),
                w64["step"]
            );
        }
    }
}

#[test]
fn continuing_a_peft_adapter_follows_torch_and_peft_for_dpo_and_sft() {
    for base in BASES {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = continue_config(base, &tmp.path().join("dpo"));
        let summary = train(&cfg, &mut Quiet).unwrap();
        check_against(
            &MetricsLog::read_all(&summary.metrics_path),
            &fixtures().join(format!("expected/lora/{base}-lora__dpo.json")),
        );

        // SFT on the plain set's prompts and chosen answers, TRL's token-mean loss.
        let data = tmp.path().join("sft.jsonl");
        let rows: String = jsonl(&fixtures().join("data/plain.jsonl"))
            .iter()
            .map(|v| format!("{}\n", serde_json::json!({"prompt": v["prompt"], "completion": v["chosen"]})))
            .collect();
        std::fs::write(&data, rows).unwrap();
        let cfg =
            TrainConfig { train_data: data, learning_rate: 1e-3, ..continue_config(base, &tmp.path().join("sft")) };
        let summary = train_sft(&cfg, &mut Quiet).unwrap();
        check_against(
            &MetricsLog::read_all(&summary.metrics_path),
            &fixtures().join(format!("expected/lora/{base}-lora__sft.json")),
        );
    }
}

#[test]
fn a_fresh_adapter_starts_at_the_base_trains_alone_and_saves_a_peft_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("models/qwen2-tied");
    let cfg = TrainConfig {
        adapter: None,
        use_peft: true,
        lora_r: Some(8),
        lora_target_modules: Some(prefopt_model::TargetModules::Preset("all-linear".into())),
        lora_dropout: Some(0.1),
        learning_rate: 1e-2,
        ..continue_config("qwen2-tied", &tmp.path().join("run"))
    };
    let summary = train(&cfg, &mut Quiet).unwrap();
    let lines = MetricsLog::read_all(&summary.metrics_path);
    // B starts at zero: the policy equals the reference, so DPO's first loss is ln 2.
    assert!((lines[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6, "{}", lines[0]);
    assert!(lines[2]["loss"].as_f64().unwrap() < lines[0]["loss"].as_f64().unwrap(), "training did not lower the loss");
    let final_dir = summary.final_dir;
    for f in ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"] {
        assert!(final_dir.join(f).is_file(), "final/ lacks {f}");
    }
    assert!(
        !final_dir.join("config.json").exists() && !final_dir.join("model.safetensors").exists(),
        "final/ holds a model"
    );
    let hf = HfModel::load(&base, &device()).unwrap();
    let adapter = LoraAdapter::load(&final_dir, &hf.config, &device()).unwrap();
    assert_eq!((adapter.config.r, adapter.config.targets.len(), adapter.config.dropout), (8, 7, 0.1));
    let b_norm: f32 = adapter
        .params
        .iter()
        .filter(|(n, _)| n.contains("lora_B"))
        .map(|(_, v)| v.as_tensor().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
        .sum();
    assert!(b_norm > 0.0, "B did not move from zero");
}

#[test]
fn a_lora_run_killed_between_checkpoints_resumes_to_the_same_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |out: &Path, steps: i64, resume: bool| {
        let cfg = TrainConfig {
            max_steps: steps,
            save_steps: 1,
            batch_size: 4,
            lora_dropout: Some(0.1),
            adapter: None,
            use_peft: true,
            resume_from_checkpoint: resume.then(|| "latest".to_string()),
            ..continue_config("llama-untied", out)
        };
        train(&cfg, &mut Quiet).unwrap()
    };
    let whole = run(&tmp.path().join("whole"), 3, false);
    // A run that stops after 2 steps (its checkpoint-2 and final/ exist), then resumes to 3.
    let part = tmp.path().join("part");
    run(&part, 2, false);
    std::fs::remove_dir_all(part.join("final")).unwrap();
    let resumed = run(&part, 3, true);
    let bytes = |dir: &Path| std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(bytes(&whole.final_dir), bytes(&resumed.final_dir), "resumed adapter differs");
    assert!(part.join("checkpoint-2/optimizer.safetensors").is_file());
    assert!(!part.join("checkpoint-2/model.safetensors").exists(), "a LoRA checkpoint holds the base weights");
}

/// A fresh adapter's bad keys fail when the config is read, before any compute.
#[test]
fn bad_lora_keys_fail_at_config_load() {
    let model = fixtures().join("models/qwen2-tied");
    let base = [
        format!("model=\"{}\"", model.display()),
        "train_data=\"d.jsonl\"".to_string(),
        "output_dir=\"o\"".to_string(),
        "use_peft=true".to_string(),
    ];
    for (set, key) in [("lora_r=0", "lora_r"), ("lora_dropout=1.5", "lora_dropout"), ("lora_alpha=-1.0", "lora_alpha")]
    {
        let sets: Vec<String> = base.iter().cloned().chain([set.to_string()]).collect();
        let err = TrainConfig::load(None, &sets).unwrap_err().to_string();
        assert!(err.contains(key), "{set}: {err}");
    }
    TrainConfig::load(None, &base).unwrap();
}
