//! A reward model: the Llama stack under transformers' `*ForSequenceClassification` score
//! head, for the `rm:` judge and for `prefopt reward`.
//!
//! The folder holds the backbone's `model.*` tensors and a bias-free `score.weight`
//! (num_labels, hidden); no `lm_head`. The reward of a sequence is label 0 of `score(h)` at
//! its rightmost token that is not `config.pad_token_id` (its last token when the config has
//! no pad id): transformers reads it there, by token id, not by attention mask.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, IndexOp, Tensor, Var};
use rand::SeedableRng;

use crate::config::{config_path, LlamaConfig};
use crate::error::{ModelError, Result};
use crate::hf::HfModel;
use crate::llama::parameter_shapes;
use crate::params::Params;

/// The score head's tensor.
pub const SCORE_WEIGHT: &str = "score.weight";

/// A reward model's weights: backbone and head.
pub struct RewardWeights {
    /// The backbone with `score.weight` among its parameters. Its `config` says tied
    /// embeddings, so the network needs no LM head; `raw_config` is a sequence classifier's
    /// (`architectures`, `id2label`), what a save writes.
    pub model: HfModel,
    pub num_labels: usize,
    /// Whether the head was drawn fresh (the folder was a causal LM).
    pub new_head: bool,
}

impl RewardWeights {
    /// A `*ForSequenceClassification` folder (a config without `architectures` is taken as
    /// one, as transformers would load it).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let (cfg, raw) = LlamaConfig::from_file(&config_path(dir))?;
        if !is_classifier(&raw).unwrap_or(true) {
            return Err(config_error(
                dir,
                format!("config.json names {}, not a *ForSequenceClassification reward model", raw["architectures"]),
            ));
        }
        Self::load_classifier(dir, cfg, raw, device)
    }

    /// A reward model to train: a `*ForSequenceClassification` folder as it is, or a causal
    /// LM folder (`*ForCausalLM`, or no `architectures`) with its LM head left out and a new
    /// one-label head drawn from N(0, initializer_range^2) by `seed`, as transformers
    /// initializes a missing `score`.
    pub fn load_or_init(dir: &Path, seed: u64, device: &Device) -> Result<Self> {
        let (mut cfg, mut raw) = LlamaConfig::from_file(&config_path(dir))?;
        if is_classifier(&raw).unwrap_or(false) {
            return Self::load_classifier(dir, cfg, raw, device);
        }
        let lm_tied = cfg.tie_word_embeddings;
        cfg.tie_word_embeddings = true; // no LM head to load
        let (params, _lm_head) = Params::load(dir, &parameter_shapes(&cfg), device)?;
        cfg.tie_word_embeddings = lm_tied;
        let std = raw.get("initializer_range").and_then(|v| v.as_f64()).unwrap_or(0.02);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let values: Vec<f32> =
            (0..cfg.hidden_size).map(|_| (std * crate::init::standard_normal(&mut rng)) as f32).collect();
        let mut vars: BTreeMap<String, Var> = params.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        vars.insert(SCORE_WEIGHT.into(), Var::from_tensor(&Tensor::from_vec(values, (1, cfg.hidden_size), device)?)?);
        classifier_config(&mut raw, &cfg);
        cfg.tie_word_embeddings = true;
        let model = HfModel {
            dir: dir.to_path_buf(),
            config: cfg,
            raw_config: raw,
            params: Params::new(vars),
            unused_tensors: vec![],
        };
        Ok(Self { model, num_labels: 1, new_head: true })
    }

    fn load_classifier(dir: &Path, mut cfg: LlamaConfig, raw: serde_json::Value, device: &Device) -> Result<Self> {
        // transformers writes `id2label`; `num_labels` is its length (2 when neither is given).
        let num_labels = match (raw.get("num_labels").and_then(|n| n.as_u64()), raw.get("id2label")) {
            (Some(n), _) => n as usize,
            (None, Some(serde_json::Value::Object(labels))) => labels.len(),
            _ => 2,
        };
        if num_labels == 0 {
            return Err(config_error(dir, "config.json has no labels (num_labels 0)".into()));
        }
        cfg.tie_word_embeddings = true; // no LM head
        let mut shapes = parameter_shapes(&cfg);
        shapes.push((SCORE_WEIGHT.to_string(), vec![num_labels, cfg.hidden_size]));
        let (params, unused) = Params::load(dir, &shapes, device)?;
        if unused.iter().any(|n| n == "score.bias") {
            return Err(config_error(dir, "the score head has a bias (`score.bias`); transformers' has none".into()));
        }
        let model = HfModel { dir: dir.to_path_buf(), config: cfg, raw_config: raw, params, unused_tensors: unused };
        Ok(Self { model, num_labels, new_head: false })
    }

    /// The head (num_labels, C), as a variable of `model.params`.
    pub fn score(&self) -> &Var {
        self.model.params.get(SCORE_WEIGHT).expect("a reward model's parameters hold its head")
    }

    /// Records `pad_token_id` in the saved config: the id the reward position is found with
    /// (TRL writes the tokenizer's pad id, or its EOS id, there before training).
    pub fn set_pad_token_id(&mut self, pad: u32) {
        if let Some(c) = self.model.raw_config.as_object_mut() {
            c.insert("pad_token_id".into(), pad.into());
        }
    }
}

/// Whether a config names a sequence classifier; `None` without `architectures`.
fn is_classifier(raw: &serde_json::Value) -> Option<bool> {
    let names: Vec<&str> = raw.get("architectures")?.as_array()?.iter().filter_map(|a| a.as_str()).collect();
    (!names.is_empty()).then(|| names.iter().any(|a| a.ends_with("ForSequenceClassification")))
}

/// A causal LM's config rewritten as transformers saves the sequence classifier built from it:
/// `LlamaForCausalLM` -> `LlamaForSequenceClassification` (or from `model_type`), one label.
fn classifier_config(raw: &mut serde_json::Value, cfg: &LlamaConfig) {
    let from_type = match cfg.model_type.as_str() {
        "qwen2" => "Qwen2",
        "mistral" => "Mistral",
        _ => "Llama",
    };
    let arch = raw
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
        .and_then(|a| a.strip_suffix("ForCausalLM"))
        .unwrap_or(from_type)
        .to_string();
    if let Some(c) = raw.as_object_mut() {
        c.insert("architectures".into(), serde_json::json!([format!("{arch}ForSequenceClassification")]));
        c.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
        c.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
    }
}

fn config_error(dir: &Path, message: String) -> ModelError {
    ModelError::Config { path: config_path(dir), message }
}

/// Where a sequence's reward is read: its rightmost token that is not `pad` (0 when all are,
/// as transformers' argmax gives), or its last token without a pad id.
pub fn reward_position(ids: &[u32], pad: Option<u32>) -> usize {
    match pad {
        Some(pad) => ids.iter().rposition(|&t| t != pad).unwrap_or(0),
        None => ids.len().saturating_sub(1),
    }
}

/// Label 0 of the head at one state per sequence: hidden states h (B, T, C) (padded rows, or
/// one packed row), `rows[i]` the index of sequence i's reward position among the B*T states,
/// head `score` (L, C) -> rewards (N,), differentiable in h and the head.
pub fn pooled_rewards(h: &Tensor, rows: &[usize], score: &Tensor) -> Result<Tensor> {
    let (b, t, c) = h.dims3()?;
    let rows: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    let rows = Tensor::from_vec(rows.clone(), rows.len(), h.device())?;
    let pooled = h.reshape((b * t, c))?.index_select(&rows, 0)?; // (N, C)
    Ok(pooled.matmul(&score.i(0..1)?.t()?)?.squeeze(1)?)
}
