//! `prefopt train` configuration: TOML, TRL's key names where TRL has one, every key with
//! its default in one place, unknown keys rejected.

use std::path::{Path, PathBuf};

use candle_core::Device;
use prefopt_data::{PromptBoundary, TokenizeOptions};
use prefopt_model::lora::DEFAULT_TARGETS;
use prefopt_model::{LoraConfig, Precision, TargetModules};
use serde::{Deserialize, Serialize};

use crate::logps::{BatchLayout, Checkpointing};
use crate::losses::LossType;
use crate::optim::OptimizerKind;
use crate::schedule::SchedulerKind;
use crate::spo::SpoSolver;
use crate::TrainError;

/// What to do when a batch gives a NaN or infinite loss or gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonFinitePolicy {
    /// Stop the run, naming the step, the batch and the last good checkpoint.
    Stop,
    /// Skip the batch (no update), count it, and go on.
    Skip,
}

/// `loss_type`: one name or a list (TRL's multi-loss form).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LossTypes {
    One(LossType),
    Many(Vec<LossType>),
}

impl LossTypes {
    pub fn to_vec(&self) -> Vec<LossType> {
        match self {
            LossTypes::One(t) => vec![*t],
            LossTypes::Many(ts) => ts.clone(),
        }
    }
}

/// One reporting integration of `report_to` (transformers' names; TensorBoard is the one
/// prefopt writes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reporter {
    None,
    Tensorboard,
    /// Every integration prefopt has: TensorBoard.
    All,
}

/// `report_to`: one name or a list, as transformers takes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReportTo {
    One(Reporter),
    Many(Vec<Reporter>),
}

impl ReportTo {
    pub fn tensorboard(&self) -> bool {
        let has = |r: &Reporter| matches!(r, Reporter::Tensorboard | Reporter::All);
        match self {
            ReportTo::One(r) => has(r),
            ReportTo::Many(rs) => rs.iter().any(has),
        }
    }
}

/// Every key of a training run. Defaults follow TRL's `DPOConfig` unless noted.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Policy model: a Hugging Face folder. Required.
    pub model: PathBuf,
    /// `model` as the user named it in the Hugging Face cache (`org/name[@revision]`), when
    /// it was resolved from a name; saved folders record it as transformers and PEFT do.
    #[serde(skip)]
    pub model_name: Option<String>,
    /// Reference model folder; defaults to `model`. Not loaded for reference-free losses
    /// (simpo, sft) unless SPO needs it.
    pub ref_model: Option<PathBuf>,
    /// Preference data (JSONL or Parquet, TRL standard or conversational). Required.
    pub train_data: PathBuf,
    /// Held-out preference data, evaluated every `eval_steps` and at the end.
    pub eval_data: Option<PathBuf>,
    /// Where metrics, checkpoints and the final model go. Required.
    pub output_dir: PathBuf,
    /// Seeds the data order (a fresh shuffle per epoch). Default 42.
    pub seed: u64,
    /// Loss name or list of names (methods.md section 2). Default "sigmoid" (DPO).
    pub loss_type: LossTypes,
    /// Weights for a list `loss_type`; default all 1.0.
    pub loss_weights: Option<Vec<f64>>,
    /// KL strength beta. Default 0.1.
    pub beta: f64,
    /// cDPO / robust label noise e. Default 0.0.
    pub label_smoothing: f64,
    /// SimPO target margin gamma. Default 0.5 (TRL's CPOConfig).
    pub simpo_gamma: f64,
    /// DPO-Positive penalty lambda. Default 50.0.
    pub dpop_lambda: f64,
    /// CPO's weight of the chosen NLL (TRL's `CPOConfig.cpo_alpha`). Default 1.0.
    pub cpo_alpha: f64,
    /// R-DPO's length weight per token of length difference. Default 0.01 (prefopt's choice).
    pub rdpo_alpha: f64,
    /// KTO (`loss_type = "kto"`): weight of the desirable rows' losses (TRL's key). Default 1.0.
    pub desirable_weight: f64,
    /// KTO: weight of the undesirable rows' losses. Default 1.0.
    pub undesirable_weight: f64,
    /// Reward-model training (`prefopt reward`): weight c of TRL's centering term
    /// `c * mean((r_chosen + r_rejected)^2)`, which keeps rewards near zero; unset: none.
    pub center_rewards_coefficient: Option<f64>,
    /// SPO weight lambda on the safe-region term (prefopt's formulation, methods.md
    /// section 4); 0 disables SPO. Default 0.0.
    pub spo_lambda: f64,
    /// SPO solver: "penalty" (L_PO + lambda*q) or "dynamic" (adaptive per-step weight).
    /// Default "penalty".
    pub spo_solver: SpoSolver,
    /// SPO dynamic solver's rate eta toward the safe region. Default 0.1 (prefopt's choice).
    pub spo_eta: f64,
    /// "adamw" | "rmsprop" | "sgd". Default "adamw".
    pub optimizer: OptimizerKind,
    /// Peak learning rate. Default 1e-6.
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// "constant" | "linear" | "cosine", after warm-up. Default "linear".
    pub lr_scheduler_type: SchedulerKind,
    /// Warm-up as a share of all steps (used when warmup_steps is 0). Default 0.0.
    pub warmup_ratio: f64,
    pub warmup_steps: usize,
    /// Global gradient-norm clip; 0 disables. Default 1.0.
    pub max_grad_norm: f64,
    /// Pairs per micro-batch. Default 8.
    pub batch_size: usize,
    /// Micro-batches per optimizer step; the update equals one of batch_size x this. Default 1.
    pub gradient_accumulation_steps: usize,
    /// Passes over the data (fractions allowed). Default 1.0.
    pub num_train_epochs: f64,
    /// If > 0, the number of optimizer steps, overriding num_train_epochs. Default -1.
    pub max_steps: i64,
    /// Total tokens per sequence (the completion is cut first). Default 1024.
    pub max_length: usize,
    /// Prompt tokens kept (from the end) before max_length applies. Default 512.
    pub max_prompt_length: Option<usize>,
    /// A conversation whose tokens do not start with its prompt's (a byte-level BPE merge
    /// across the prompt's end): "error" (default; every such row is listed) or
    /// "common_prefix" (TRL's rule: the completion starts at the shared token prefix; counted
    /// in the run's summary).
    pub prompt_boundary: PromptBoundary,
    /// Compute reference log-probs once before training and cache them on disk, keyed by
    /// the reference weights, the data file and the tokenization settings. Default false.
    pub precompute_ref_log_probs: bool,
    /// Where the reference log-prob cache lives. Default `$PREFOPT_CACHE` or
    /// `~/.cache/prefopt`.
    pub cache_dir: Option<PathBuf>,
    /// Log averaged metrics every N optimizer steps. Default 10.
    pub logging_steps: usize,
    /// Where the logged metrics go besides `metrics.jsonl`: "none" (default, as in
    /// transformers 5) or "tensorboard" (also "all", or a list): event files in
    /// `output_dir/runs/` under transformers' tags (`train/loss`, `eval/loss`, ...).
    pub report_to: ReportTo,
    /// Evaluate every N steps (0: only at the end). Default 0.
    pub eval_steps: usize,
    /// Checkpoint every N steps (0: never; the final model is always saved). Default 500.
    pub save_steps: usize,
    /// Resume from a checkpoint folder, or "latest" for the newest in output_dir.
    pub resume_from_checkpoint: Option<String>,
    /// "stop" (default) or "skip" a batch whose loss or gradient is NaN/inf.
    pub on_nonfinite: NonFinitePolicy,
    /// Compute with bf16-rounded weights (policy and reference); the optimizer keeps f32
    /// master weights, and activations and log-softmax stay f32. Default false.
    pub bf16: bool,
    /// Where the tensors live: "cpu", "cuda" or "cuda:N" (a build with the `cuda` feature).
    /// Default "cpu".
    pub device: String,
    /// Keep only each decoder block's input in the forward pass and recompute the block in
    /// the backward pass (TRL's key): far less memory for about a third more compute; the
    /// same loss and gradients. Default false.
    pub gradient_checkpointing: bool,
    /// Pack each micro-batch's sequences side by side into one row, each attending only to
    /// itself at its own positions, instead of right-padding them to the longest (TRL's key):
    /// no compute on padding; the same losses and gradients (tested to 1e-6). Off by itself
    /// while a LoRA dropout mask is drawn (`lora_dropout > 0`), whose masks are per padded
    /// row. Default true.
    pub padding_free: bool,
    /// Run each pair's prompt once for both completions, laid out `[prompt, chosen,
    /// rejected]` with the rejected tokens attending to the prompt and themselves (prefopt's
    /// own key; preference training and scoring): the same losses and gradients. Off by
    /// itself with a LoRA dropout mask, as `padding_free`. Default true.
    pub share_prompt: bool,
    /// Train a LoRA adapter on the frozen model instead of every weight (TRL's `use_peft`);
    /// the reference is the base (with the starting adapter, when continuing one), with no
    /// second copy of the weights. Default false.
    pub use_peft: bool,
    /// LoRA rank. Default 16 (TRL's `ModelConfig`).
    pub lora_r: Option<usize>,
    /// LoRA alpha: the update is scaled by lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA).
    /// Default 32.
    pub lora_alpha: Option<f64>,
    /// Dropout on the adapter's input while training. Default 0.05.
    pub lora_dropout: Option<f64>,
    /// Module names (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`,
    /// `down_proj`) or "all-linear". Default PEFT's for the Llama family: q_proj, v_proj.
    pub lora_target_modules: Option<TargetModules>,
    /// rsLoRA: scale by lora_alpha / sqrt(r). Default false.
    pub use_rslora: Option<bool>,
    /// A PEFT adapter folder to continue training (implies use_peft). Its adapter_config.json
    /// gives r, alpha, dropout, targets and rsLoRA; any of those keys set here must agree.
    pub adapter: Option<PathBuf>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            model_name: None,
            ref_model: None,
            train_data: PathBuf::new(),
            eval_data: None,
            output_dir: PathBuf::new(),
            seed: 42,
            loss_type: LossTypes::One(LossType::Sigmoid),
            loss_weights: None,
            beta: 0.1,
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            dpop_lambda: 50.0,
            cpo_alpha: 1.0,
            rdpo_alpha: 0.01,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            center_rewards_coefficient: None,
            spo_lambda: 0.0,
            spo_solver: SpoSolver::Penalty,
            spo_eta: 0.1,
            optimizer: OptimizerKind::Adamw,
            learning_rate: 1e-6,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            lr_scheduler_type: SchedulerKind::Linear,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            max_grad_norm: 1.0,
            batch_size: 8,
            gradient_accumulation_steps: 1,
            num_train_epochs: 1.0,
            max_steps: -1,
            max_length: 1024,
            max_prompt_length: Some(512),
            prompt_boundary: PromptBoundary::Error,
            precompute_ref_log_probs: false,
            cache_dir: None,
            logging_steps: 10,
            report_to: ReportTo::One(Reporter::None),
            eval_steps: 0,
            save_steps: 500,
            resume_from_checkpoint: None,
            on_nonfinite: NonFinitePolicy::Stop,
            bf16: false,
            device: "cpu".into(),
            gradient_checkpointing: false,
            padding_free: true,
            share_prompt: true,
            use_peft: false,
            lora_r: None,
            lora_alpha: None,
            lora_dropout: None,
            lora_target_modules: None,
            use_rslora: None,
            adapter: None,
        }
    }
}

/// The keys `prefopt sft` accepts: the shared optimization and I/O keys.
/// The keys `prefopt reward` takes: the trainer's, less the ones about completions
/// (a reward model reads whole sequences: no prompt truncation or boundary)
/// and LoRA (a score head is not a PEFT adapter's), plus the centering weight.
pub const REWARD_KEYS: [&str; 31] = [
    "model",
    "train_data",
    "eval_data",
    "output_dir",
    "seed",
    "optimizer",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "lr_scheduler_type",
    "warmup_ratio",
    "warmup_steps",
    "max_grad_norm",
    "batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "max_length",
    "logging_steps",
    "report_to",
    "eval_steps",
    "save_steps",
    "resume_from_checkpoint",
    "on_nonfinite",
    "bf16",
    "device",
    "gradient_checkpointing",
    "padding_free",
    "center_rewards_coefficient",
];

pub const SFT_KEYS: [&str; 40] = [
    "model",
    "train_data",
    "eval_data",
    "output_dir",
    "seed",
    "optimizer",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "lr_scheduler_type",
    "warmup_ratio",
    "warmup_steps",
    "max_grad_norm",
    "batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "max_length",
    "max_prompt_length",
    "prompt_boundary",
    "logging_steps",
    "report_to",
    "eval_steps",
    "save_steps",
    "resume_from_checkpoint",
    "on_nonfinite",
    "cache_dir",
    "bf16",
    "device",
    "gradient_checkpointing",
    "padding_free",
    "use_peft",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "use_rslora",
    "adapter",
];

/// One `--set key=value` override: the trimmed key and the value read as TOML (`1e-3`,
/// `true`, `["sigmoid", "sft"]`), or as a plain string when it is not valid TOML (`out/run2`).
pub fn parse_override(spec: &str) -> Result<(String, toml::Value), String> {
    let (key, value) = spec.split_once('=').ok_or_else(|| format!("--set `{spec}`: expected key=value"))?;
    let value = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    Ok((key.trim().to_string(), value))
}

/// Applies `key=value` overrides to a TOML table: each value read as [`parse_override`]
/// reads it; a dotted key (`train.learning_rate`) reaches into (or creates) nested tables.
/// The one `--set` merge of every command.
pub fn apply_overrides(table: &mut toml::Table, overrides: &[String]) -> Result<(), String> {
    for spec in overrides {
        let (key, value) = parse_override(spec)?;
        let parts: Vec<&str> = key.split('.').collect();
        let (last, path) = parts.split_last().ok_or_else(|| format!("--set `{spec}`: empty key"))?;
        let mut slot = &mut *table;
        for part in path {
            slot = slot
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| format!("--set `{key}`: `{part}` is not a table"))?;
        }
        slot.insert(last.to_string(), value);
    }
    Ok(())
}

/// A config problem, with the file and key it is about.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct ConfigError {
    pub source_name: String,
    pub message: String,
}

impl TrainConfig {
    /// Reads `path` (TOML), applies `key=value` overrides (values in TOML syntax; a bare word
    /// is taken as a string), and validates. Relative paths stay relative to the working dir.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self, ConfigError> {
        Self::load_checked(path, overrides, |_| Ok(()))
    }

    /// Like [`TrainConfig::load`] for `prefopt sft`: keys that only apply to preference
    /// training are rejected, and `learning_rate` defaults to 2e-5 (TRL's `SFTConfig`).
    pub fn load_sft(path: Option<&Path>, overrides: &[String]) -> Result<Self, ConfigError> {
        Self::load_checked(path, overrides, |table| {
            if let Some(key) = table.keys().find(|k| !SFT_KEYS.contains(&k.as_str())) {
                return Err(format!("key `{key}` does not apply to `prefopt sft` (it takes: {})", SFT_KEYS.join(", ")));
            }
            table.entry("learning_rate").or_insert(toml::Value::Float(2e-5));
            Ok(())
        })
    }

    /// Like [`TrainConfig::load`] for `prefopt reward`: only [`REWARD_KEYS`], and
    /// `learning_rate` defaults to 1e-4 (TRL's `RewardConfig`).
    pub fn load_reward(path: Option<&Path>, overrides: &[String]) -> Result<Self, ConfigError> {
        Self::load_checked(path, overrides, |table| {
            if let Some(key) = table.keys().find(|k| !REWARD_KEYS.contains(&k.as_str())) {
                return Err(format!(
                    "key `{key}` does not apply to `prefopt reward` (it takes: {})",
                    REWARD_KEYS.join(", ")
                ));
            }
            table.entry("learning_rate").or_insert(toml::Value::Float(1e-4));
            Ok(())
        })
    }

    fn load_checked(
        path: Option<&Path>,
        overrides: &[String],
        check: impl FnOnce(&mut toml::Table) -> Result<(), String>,
    ) -> Result<Self, ConfigError> {
        let name = match (path, overrides.is_empty()) {
            (Some(p), true) => p.display().to_string(),
            (Some(p), false) => format!("{} with --set overrides", p.display()),
            (None, _) => "--set".to_string(),
        };
        let err = |message: String| ConfigError { source_name: name.clone(), message };
        let mut text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|e| err(e.to_string()))?,
            None => String::new(),
        };
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| err(e.to_string()))?;
        let as_written = table.clone();
        apply_overrides(&mut table, overrides).map_err(&err)?;
        check(&mut table).map_err(&err)?;
        // Unchanged: parse the user's own text, so serde's errors point at their lines.
        if table != as_written {
            text = toml::to_string(&table).map_err(|e| err(e.to_string()))?;
        }
        // Deserializing from text (not from a Table) keeps the key and line in serde's errors.
        let mut cfg: TrainConfig = toml::from_str(&text).map_err(|e: toml::de::Error| err(e.to_string()))?;
        cfg.validate().map_err(&err)?;
        cfg.resolve_model_names().map_err(err)?;
        Ok(cfg)
    }

    /// `model`, `ref_model` and `adapter` given as Hugging Face names (`org/name[@revision]`)
    /// become their snapshot folders in the local cache ([`prefopt_model::hub`]).
    pub fn resolve_model_names(&mut self) -> Result<(), String> {
        let resolve = |key: &str, p: &Path| prefopt_model::hub::resolve_model(p).map_err(|e| format!("`{key}`: {e}"));
        let resolved = resolve("model", &self.model)?;
        if resolved != self.model {
            self.model_name = Some(self.model.display().to_string());
        }
        self.model = resolved;
        if let Some(r) = &self.ref_model {
            self.ref_model = Some(resolve("ref_model", r)?);
        }
        if let Some(a) = &self.adapter {
            self.adapter = Some(resolve("adapter", a)?);
        }
        Ok(())
    }

    /// A config built from a TOML table (a caller that composes the keys itself, like the
    /// online loop or the demo), validated; the error is serde's or [`Self::validate`]'s.
    pub fn from_table(table: &toml::Table) -> Result<Self, String> {
        // Through text, as `load` does, so serde's messages name the key.
        let text = toml::to_string(table).map_err(|e| e.to_string())?;
        let cfg: TrainConfig = toml::from_str(&text).map_err(|e: toml::de::Error| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The checks serde cannot express; each message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let required = [("model", &self.model), ("train_data", &self.train_data), ("output_dir", &self.output_dir)];
        for (key, value) in required {
            if value.as_os_str().is_empty() {
                return Err(format!("missing required key `{key}`"));
            }
        }
        let n_losses = self.loss_type.to_vec().len();
        if n_losses == 0 {
            return Err("`loss_type` must name at least one loss".into());
        }
        if let Some(w) = &self.loss_weights {
            if w.len() != n_losses {
                return Err(format!("`loss_weights` has {} entries but `loss_type` names {n_losses} losses", w.len()));
            }
        }
        let positive =
            [("beta", self.beta), ("learning_rate", self.learning_rate), ("num_train_epochs", self.num_train_epochs)];
        for (key, v) in positive {
            if !(v > 0.0 && v.is_finite()) {
                return Err(format!("`{key}` must be a positive number, got {v}"));
            }
        }
        for (key, v) in [
            ("batch_size", self.batch_size),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps),
            ("max_length", self.max_length),
            ("logging_steps", self.logging_steps),
        ] {
            if v == 0 {
                return Err(format!("`{key}` must be at least 1"));
            }
        }
        let losses = self.loss_type.to_vec();
        if losses.contains(&LossType::Kto) {
            if losses.len() > 1 {
                return Err("`loss_type`: `kto` trains on unpaired data and cannot be mixed with pair losses".into());
            }
            if self.spo_lambda > 0.0 {
                return Err("`spo_lambda`: SPO is defined on preference pairs, not with `kto`".into());
            }
        }
        for (key, w) in [("desirable_weight", self.desirable_weight), ("undesirable_weight", self.undesirable_weight)] {
            if !(w > 0.0 && w.is_finite()) {
                return Err(format!("`{key}` must be a positive number, got {w}"));
            }
        }
        if let Some(c) = self.center_rewards_coefficient {
            if !(c >= 0.0 && c.is_finite()) {
                return Err(format!("`center_rewards_coefficient` must be a non-negative number, got {c}"));
            }
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(format!("`label_smoothing` must be in [0, 0.5), got {}", self.label_smoothing));
        }
        if self.spo_lambda < 0.0 || self.max_grad_norm < 0.0 || self.weight_decay < 0.0 {
            return Err("`spo_lambda`, `max_grad_norm` and `weight_decay` must not be negative".into());
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return Err(format!("`warmup_ratio` must be in [0, 1], got {}", self.warmup_ratio));
        }
        if !self.uses_lora() {
            let set = [
                ("lora_r", self.lora_r.is_some()),
                ("lora_alpha", self.lora_alpha.is_some()),
                ("lora_dropout", self.lora_dropout.is_some()),
                ("use_rslora", self.use_rslora.is_some()),
                ("lora_target_modules", self.lora_target_modules.is_some()),
            ];
            if let Some((key, _)) = set.iter().find(|(_, is_set)| *is_set) {
                return Err(format!(
                    "`{key}` is set but `use_peft` is false and no `adapter` is given: set `use_peft = true` to train a \
                     LoRA adapter, or remove the key"
                ));
            }
        }
        // A fresh adapter's keys are checked here, before any compute (an unknown target
        // module is caught against the model when the adapter is built).
        if self.use_peft && self.adapter.is_none() {
            self.fresh_lora_config().map_err(|e| e.to_string())?;
        }
        if self.uses_lora() && self.ref_model.is_some() {
            return Err("`ref_model` with LoRA (`use_peft` or `adapter`): the reference is the base model with the \
                        starting adapter (none for a fresh one), so there is no reference model to give; remove \
                        `ref_model`"
                .into());
        }
        Ok(())
    }

    /// (loss, weight) terms in order.
    pub fn loss_terms(&self) -> Vec<(LossType, f64)> {
        let types = self.loss_type.to_vec();
        let weights = self.loss_weights.clone().unwrap_or_else(|| vec![1.0; types.len()]);
        types.into_iter().zip(weights).collect()
    }

    /// Whether a reference model (or cached reference log-probs) is needed at all.
    pub fn needs_reference(&self) -> bool {
        self.spo_lambda > 0.0 || self.loss_type.to_vec().iter().any(|t| t.needs_reference())
    }

    pub fn ref_model_path(&self) -> &Path {
        self.ref_model.as_deref().unwrap_or(&self.model)
    }

    /// The length budget of every tokenization of the run (training, evaluation, reference).
    pub fn tokenize_options(&self) -> TokenizeOptions {
        TokenizeOptions {
            max_length: Some(self.max_length),
            max_prompt_length: self.max_prompt_length,
            prompt_boundary: self.prompt_boundary,
        }
    }

    /// The `device` key as a device; an unusable one (`cuda` in a CPU-only build) is an error
    /// that says why.
    pub fn device(&self) -> Result<Device, prefopt_model::ModelError> {
        prefopt_model::parse_device(&self.device)
    }

    /// The `padding_free` and `share_prompt` keys as a batch layout.
    pub fn batch_layout(&self, pad_id: u32) -> BatchLayout {
        BatchLayout { pad_id, padding_free: self.padding_free, share_prompt: self.share_prompt }
    }

    /// The `gradient_checkpointing` key.
    pub fn checkpointing(&self) -> Checkpointing {
        if self.gradient_checkpointing {
            Checkpointing::On
        } else {
            Checkpointing::Off
        }
    }

    /// Whether the run trains a LoRA adapter (`use_peft`, or an `adapter` to continue).
    /// `report_to` names TensorBoard.
    pub fn reports_to_tensorboard(&self) -> bool {
        self.report_to.tensorboard()
    }

    pub fn uses_lora(&self) -> bool {
        self.use_peft || self.adapter.is_some()
    }

    /// The LoRA config of a fresh adapter from the `lora_*` keys and TRL's defaults.
    pub fn fresh_lora_config(&self) -> Result<LoraConfig, TrainError> {
        let targets = match &self.lora_target_modules {
            Some(t) => t.resolve().map_err(|m| TrainError::Config { key: "lora_target_modules", message: m })?,
            None => DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect(),
        };
        let config = LoraConfig {
            r: self.lora_r.unwrap_or(16),
            alpha: self.lora_alpha.unwrap_or(32.0),
            targets,
            use_rslora: self.use_rslora.unwrap_or(false),
            dropout: self.lora_dropout.unwrap_or(0.05),
        };
        config.validate().map_err(|(key, message)| TrainError::Config { key, message })?;
        Ok(config)
    }

    /// Checks that the `lora_*` keys set in this config agree with a loaded adapter's own
    /// config; the error names the key and both values.
    pub fn check_adapter_agrees(&self, adapter: &LoraConfig) -> Result<(), TrainError> {
        let differ = |key: &'static str, set: String, theirs: String| {
            Err(TrainError::Config {
                key,
                message: format!(
                    "is {set} but the adapter being continued has {theirs}; remove the key or make them agree"
                ),
            })
        };
        if let Some(r) = self.lora_r.filter(|&r| r != adapter.r) {
            return differ("lora_r", r.to_string(), adapter.r.to_string());
        }
        if let Some(a) = self.lora_alpha.filter(|&a| a != adapter.alpha) {
            return differ("lora_alpha", a.to_string(), adapter.alpha.to_string());
        }
        if let Some(d) = self.lora_dropout.filter(|&d| d != adapter.dropout) {
            return differ("lora_dropout", d.to_string(), adapter.dropout.to_string());
        }
        if let Some(rs) = self.use_rslora.filter(|&rs| rs != adapter.use_rslora) {
            return differ("use_rslora", rs.to_string(), adapter.use_rslora.to_string());
        }
        if let Some(t) = &self.lora_target_modules {
            let mine = t.resolve().map_err(|m| TrainError::Config { key: "lora_target_modules", message: m })?;
            if mine != adapter.targets {
                return differ("lora_target_modules", format!("{mine:?}"), format!("{:?}", adapter.targets));
            }
        }
        Ok(())
    }

    /// The `bf16` key as the network's precision.
    pub fn precision(&self) -> Precision {
        Precision::from_bf16_flag(self.bf16)
    }
}
