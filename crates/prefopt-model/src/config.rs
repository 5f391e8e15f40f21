//! `config.json` of the Llama family (Llama 2/3, Mistral, Qwen2/2.5), read with serde under
//! Hugging Face's key names, plus the checks that reject what we do not implement.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{io_error, ModelError, Result};

/// Architectures that `llama.rs` implements, by `config.json`'s `model_type`.
pub const SUPPORTED_MODEL_TYPES: [&str; 3] = ["llama", "mistral", "qwen2"];

/// `rope_scaling` of Llama 3.x (`"rope_type": "llama3"`): stretches low frequencies by
/// `factor` and interpolates the band between `low_freq_factor` and `high_freq_factor`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// The architecture hyper-parameters, under Hugging Face's names.
#[derive(Clone, Debug, Deserialize)]
pub struct LlamaConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: fewer key/value heads than query heads. Defaults to
    /// `num_attention_heads` (plain multi-head attention), as in transformers.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Mistral and Llama 3.x-style configs may give it; otherwise hidden / heads.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5 layout: `{rope_type, rope_theta, factor, ...}` replaces `rope_theta`
    /// and `rope_scaling`. When present it wins.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama's switch for biases on q/k/v/o (Qwen2 always has q/k/v bias, never o).
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    /// transformers builds the input embedding with `padding_idx = pad_token_id`: that row
    /// gets no gradient from the lookup (the tied LM head still trains it). prefopt does the
    /// same, so training matches transformers/TRL where the pad id occurs in the data (often
    /// the EOS id, as in SmolLM2).
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_position_embeddings() -> usize {
    2048
}
fn default_hidden_act() -> String {
    "silu".to_string()
}

impl LlamaConfig {
    /// Reads and validates `config.json`. The raw JSON is returned too, so that saving
    /// writes back every key we do not interpret.
    pub fn from_file(path: &Path) -> Result<(Self, serde_json::Value)> {
        let text = std::fs::read_to_string(path).map_err(|e| io_error(path, e))?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Json { path: path.to_path_buf(), message: e.to_string() })?;
        let cfg = Self::from_json(&raw, path)?;
        Ok((cfg, raw))
    }

    /// Parses and validates a config already read as JSON; `path` is for messages.
    pub fn from_json(raw: &serde_json::Value, path: &Path) -> Result<Self> {
        let config_err = |message: String| ModelError::Config { path: path.to_path_buf(), message };
        // Check the model type first: a missing field of an unsupported architecture
        // would otherwise hide the real problem.
        match raw.get("model_type").and_then(|v| v.as_str()) {
            None => return Err(config_err("missing string field `model_type`".into())),
            Some(t) if !SUPPORTED_MODEL_TYPES.contains(&t) => {
                return Err(config_err(format!(
                    "unsupported model_type `{t}`; prefopt supports {}",
                    SUPPORTED_MODEL_TYPES.join(", ")
                )))
            }
            Some(_) => {}
        }
        // With the key in the message (`hidden_size: invalid value: integer -5, expected usize`).
        let mut cfg: LlamaConfig = serde_path_to_error::deserialize(raw.clone()).map_err(|e| {
            let key = e.path().to_string();
            config_err(format!("`{key}`: {}", e.into_inner()))
        })?;
        if let Some(theta) = cfg.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")) {
            cfg.rope_theta =
                theta.as_f64().ok_or_else(|| config_err("rope_parameters.rope_theta must be a number".into()))?;
        }
        if cfg.hidden_act != "silu" {
            return Err(config_err(format!(
                "unsupported hidden_act `{}`; the Llama family uses `silu` (SwiGLU)",
                cfg.hidden_act
            )));
        }
        let heads = cfg.num_attention_heads;
        let kv_heads = cfg.num_kv_heads();
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(config_err(format!(
                "num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv_heads})"
            )));
        }
        if cfg.head_dim.is_none() && !cfg.hidden_size.is_multiple_of(heads) {
            return Err(config_err(format!(
                "hidden_size ({}) is not divisible by num_attention_heads ({heads})",
                cfg.hidden_size
            )));
        }
        if !cfg.head_dim().is_multiple_of(2) {
            return Err(config_err(format!("head_dim ({}) must be even for RoPE", cfg.head_dim())));
        }
        cfg.llama3_rope_scaling().map_err(config_err)?;
        // Before any tensor (or even the list of tensor shapes) exists: a config that asks for
        // more parameters than this machine can hold is refused with what it would need.
        let params = cfg.num_parameters().ok_or_else(|| {
            config_err(
                "describes more parameters than a 64-bit count holds (check vocab_size, hidden_size, \
                        intermediate_size, num_hidden_layers, heads and head_dim)"
                    .into(),
            )
        })?;
        if let Some(limit) = crate::process::memory_limit_bytes() {
            // Plus each layer's bookkeeping (a dozen named tensors, about 2 KB): a config of
            // 10^8 one-wide layers has few parameters but would still exhaust memory.
            let bytes = params.saturating_mul(4).saturating_add((cfg.num_hidden_layers as u64).saturating_mul(2048));
            if bytes > limit {
                return Err(config_err(format!(
                    "describes {params} parameters, {:.1} GB as f32 (the precision prefopt computes in), but this \
                     process can have at most {:.1} GB (RAM + swap, or ulimit -v); check vocab_size ({}), \
                     hidden_size ({}), intermediate_size ({}) and num_hidden_layers ({})",
                    bytes as f64 / 1e9,
                    limit as f64 / 1e9,
                    cfg.vocab_size,
                    cfg.hidden_size,
                    cfg.intermediate_size,
                    cfg.num_hidden_layers
                )));
            }
        }
        // Sliding-window attention is not implemented; configs that only mention a window
        // size without enabling it (Qwen2.5, Mistral v0.2+) are fine.
        let sliding = raw.get("use_sliding_window").and_then(|v| v.as_bool()) == Some(true)
            || raw
                .get("layer_types")
                .and_then(|v| v.as_array())
                .is_some_and(|layers| layers.iter().any(|l| l.as_str() == Some("sliding_attention")));
        if sliding {
            return Err(config_err(
                "sliding-window attention is not supported yet (full causal attention only)".into(),
            ));
        }
        Ok(cfg)
    }

    /// The parameters the architecture has (the tensors of `llama::parameter_shapes`), in
    /// checked arithmetic: `None` when the count overflows 64 bits.
    pub fn num_parameters(&self) -> Option<u64> {
        let u = |x: usize| x as u64;
        let (c, v, f) = (u(self.hidden_size), u(self.vocab_size), u(self.intermediate_size));
        let (q, kv) = (
            u(self.num_attention_heads).checked_mul(u(self.head_dim()))?,
            u(self.num_kv_heads()).checked_mul(u(self.head_dim()))?,
        );
        let attention = q.checked_mul(c)?.checked_mul(2)?.checked_add(kv.checked_mul(c)?.checked_mul(2)?)?;
        let qkv_bias = if self.qkv_bias() { q.checked_add(kv.checked_mul(2)?)? } else { 0 };
        let biases = qkv_bias.checked_add(if self.o_bias() { c } else { 0 })?;
        let mlp_bias = if self.mlp_bias { f.checked_mul(2)?.checked_add(c)? } else { 0 };
        let mlp = f.checked_mul(c)?.checked_mul(3)?.checked_add(mlp_bias)?;
        let layer = attention.checked_add(mlp)?.checked_add(biases)?.checked_add(c.checked_mul(2)?)?;
        let embeddings = v.checked_mul(c)?.checked_mul(if self.tie_word_embeddings { 1 } else { 2 })?;
        u(self.num_hidden_layers).checked_mul(layer)?.checked_add(embeddings)?.checked_add(c)
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q/k/v projections carry a bias (always for Qwen2).
    pub fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || self.attention_bias
    }

    /// Whether the output projection carries a bias (Llama's `attention_bias`; never Qwen2).
    pub fn o_bias(&self) -> bool {
        self.model_type != "qwen2" && self.attention_bias
    }

    /// The `llama3` rope scaling if configured; `Err` for any other scaling type, which
    /// we do not implement and must not silently ignore.
    pub fn llama3_rope_scaling(&self) -> std::result::Result<Option<Llama3RopeScaling>, String> {
        let Some(value) = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref()) else {
            return Ok(None);
        };
        if value.is_null() {
            return Ok(None);
        }
        let kind = value.get("rope_type").or_else(|| value.get("type")).and_then(|v| v.as_str()).unwrap_or("");
        match kind {
            "default" => Ok(None),
            "llama3" => serde_json::from_value(value.clone()).map(Some).map_err(|e| format!("rope_scaling: {e}")),
            other => Err(format!("unsupported rope_scaling type `{other}`; prefopt supports `llama3` (or none)")),
        }
    }
}

/// The config file inside a model folder.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("config.json")
}
