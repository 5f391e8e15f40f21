//! LoRA adapters in PEFT's layout: a low-rank update `W + scale * B A` of chosen linear
//! layers, `A` (r, in) and `B` (out, r), `scale = lora_alpha / r` (`lora_alpha / sqrt(r)`
//! with rsLoRA), dropout on the adapter's input. Folders hold `adapter_config.json` and
//! `adapter_model.safetensors` with PEFT's tensor names
//! (`base_model.model.<module path>.lora_A.weight`), so `PeftModel.from_pretrained(base, dir)`
//! loads what prefopt writes and prefopt loads what PEFT writes.
//!
//! Not supported (a clear error, not a silent misread): other PEFT types, DoRA, LoRA on
//! biases, per-module rank or alpha patterns, `modules_to_save`, `fan_in_fan_out`, layer
//! subsets, and modules other than the seven linear layers of each decoder block.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::LlamaConfig;
use crate::error::{io_error, ModelError, Result};
use crate::params::Params;

/// The linear layers of a decoder block, by their module names.
pub const LINEAR_MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// PEFT's default targets for the Llama family when none are given.
pub const DEFAULT_TARGETS: [&str; 2] = ["q_proj", "v_proj"];

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// `target_modules`: module names, or every linear layer of the blocks (`"all-linear"`,
/// which, as in PEFT, leaves out the LM head).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    /// `"all-linear"` (the only string accepted).
    Preset(String),
}

impl TargetModules {
    /// The module names, checked against the model's linear layers; unknown names are an
    /// error that lists the model's.
    pub fn resolve(&self) -> std::result::Result<Vec<String>, String> {
        let names: Vec<String> = match self {
            TargetModules::Preset(p) if p == "all-linear" => LINEAR_MODULES.iter().map(|s| s.to_string()).collect(),
            TargetModules::Preset(p) => {
                return Err(format!(
                    "target_modules `{p}`: expected a list of module names or \"all-linear\" (regular expressions \
                     are not supported)"
                ))
            }
            TargetModules::Names(n) => n.clone(),
        };
        let unknown: Vec<&String> = names.iter().filter(|n| !LINEAR_MODULES.contains(&n.as_str())).collect();
        if !unknown.is_empty() {
            return Err(format!(
                "target modules {} are not linear layers of this model, whose linear layers are: {}",
                unknown.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", "),
                LINEAR_MODULES.join(", ")
            ));
        }
        if names.is_empty() {
            return Err("target_modules is empty".into());
        }
        // In the model's module order, each once (LINEAR_MODULES has no repeats).
        Ok(LINEAR_MODULES.iter().filter(|m| names.iter().any(|n| n == *m)).map(|s| s.to_string()).collect())
    }
}

/// An adapter's shape and scaling (what `adapter_config.json` holds).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    /// Module names (`q_proj`, ...), in [`LINEAR_MODULES`] order.
    pub targets: Vec<String>,
    pub use_rslora: bool,
    /// Dropout on the adapter's input while training (0 = none).
    pub dropout: f64,
}

impl LoraConfig {
    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Checks the values: an error is (the config key, what is wrong with it).
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.r == 0 {
            return Err(("lora_r", "must be at least 1".into()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(("lora_alpha", format!("must be a positive number, got {}", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(("lora_dropout", format!("must be in [0, 1), got {}", self.dropout)));
        }
        Ok(())
    }
}

/// One adapted linear layer: where it is, and its sizes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdaptedModule {
    /// `model.layers.<i>.self_attn.q_proj` (the base checkpoint's module path).
    pub path: String,
    pub layer: usize,
    /// Index into [`LINEAR_MODULES`].
    pub module: usize,
    pub in_features: usize,
    pub out_features: usize,
}

impl AdaptedModule {
    /// PEFT's name of the A matrix (r, in).
    pub fn a_name(&self) -> String {
        format!("base_model.model.{}.lora_A.weight", self.path)
    }

    /// PEFT's name of the B matrix (out, r).
    pub fn b_name(&self) -> String {
        format!("base_model.model.{}.lora_B.weight", self.path)
    }
}

/// Every module `targets` adapts in a model of `cfg`, in layer order.
pub fn adapted_modules(cfg: &LlamaConfig, targets: &[String]) -> Vec<AdaptedModule> {
    let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * cfg.head_dim(), cfg.num_kv_heads() * cfg.head_dim());
    let mut out = Vec::new();
    for layer in 0..cfg.num_hidden_layers {
        for (module, name) in LINEAR_MODULES.iter().enumerate() {
            if !targets.iter().any(|t| t == name) {
                continue;
            }
            let (group, in_features, out_features) = match *name {
                "q_proj" => ("self_attn", c, q),
                "k_proj" | "v_proj" => ("self_attn", c, kv),
                "o_proj" => ("self_attn", q, c),
                "gate_proj" | "up_proj" => ("mlp", c, f),
                _ => ("mlp", f, c), // down_proj
            };
            out.push(AdaptedModule {
                path: format!("model.layers.{layer}.{group}.{name}"),
                layer,
                module,
                in_features,
                out_features,
            });
        }
    }
    out
}

/// A LoRA adapter for one base model: its config and its A and B matrices under PEFT's names.
#[derive(Clone)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    pub params: Params,
    pub modules: Vec<AdaptedModule>,
}

/// `adapter_config.json` as PEFT writes it (the keys prefopt reads and writes; PEFT's other
/// keys, when present, must have their defaults).
#[derive(Debug, Serialize, Deserialize)]
struct PeftConfigFile {
    peft_type: String,
    #[serde(default)]
    task_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: TargetModules,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default = "default_bias")]
    bias: String,
    #[serde(default)]
    lora_bias: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    modules_to_save: Option<serde_json::Value>,
    #[serde(default)]
    layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    rank_pattern: Option<serde_json::Value>,
    #[serde(default)]
    alpha_pattern: Option<serde_json::Value>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
}

fn default_bias() -> String {
    "none".into()
}

impl LoraAdapter {
    /// A fresh adapter as PEFT initializes one: A from Kaiming-uniform (`a = sqrt(5)`, i.e.
    /// U(-1/sqrt(in), 1/sqrt(in))), B zero, so the adapted model starts equal to the base.
    /// Draws in module order from `seed`.
    pub fn init(cfg: &LlamaConfig, config: LoraConfig, seed: u64, device: &Device) -> Result<Self> {
        config.validate().map_err(|(key, message)| ModelError::Config {
            path: "lora".into(),
            message: format!("{key} {message}"),
        })?;
        let modules = adapted_modules(cfg, &config.targets);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut vars = BTreeMap::new();
        for m in &modules {
            let bound = 1.0 / (m.in_features as f64).sqrt();
            let a: Vec<f32> = (0..config.r * m.in_features).map(|_| rng.gen_range(-bound..bound) as f32).collect();
            let a = Tensor::from_vec(a, (config.r, m.in_features), device)?;
            let b = Tensor::zeros((m.out_features, config.r), DType::F32, device)?;
            vars.insert(m.a_name(), Var::from_tensor(&a)?);
            vars.insert(m.b_name(), Var::from_tensor(&b)?);
        }
        Ok(Self { config, params: Params::new(vars), modules })
    }

    /// Loads a PEFT LoRA folder made for a base of `cfg`. Errors name the file and, for a
    /// mis-shaped tensor (an adapter for another base), the tensor and both shapes.
    pub fn load(dir: &Path, cfg: &LlamaConfig, device: &Device) -> Result<Self> {
        let config_path = dir.join(ADAPTER_CONFIG);
        if !config_path.is_file() {
            return Err(io_error(dir, format!("no {ADAPTER_CONFIG}: not a PEFT adapter folder")));
        }
        let text = std::fs::read_to_string(&config_path).map_err(|e| io_error(&config_path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Json { path: config_path.clone(), message: e.to_string() })?;
        let bad = |message: String| ModelError::Config { path: config_path.clone(), message };
        let kind = json.get("peft_type").and_then(|v| v.as_str()).unwrap_or("");
        if kind != "LORA" {
            return Err(bad(format!("peft_type `{kind}` is not supported; prefopt reads LoRA adapters (`LORA`)")));
        }
        let file: PeftConfigFile = serde_json::from_value(json).map_err(|e| bad(e.to_string()))?;
        let unsupported = |what: &str| Err(bad(format!("{what} is not supported")));
        if file.use_dora {
            return unsupported("DoRA (`use_dora = true`)");
        }
        if file.bias != "none" {
            return unsupported(&format!("bias = `{}` (trained biases)", file.bias));
        }
        if file.lora_bias {
            return unsupported("lora_bias = true (a bias on lora_B)");
        }
        if file.fan_in_fan_out {
            return unsupported("fan_in_fan_out = true");
        }
        if file.modules_to_save.as_ref().is_some_and(|v| !v.is_null()) {
            return unsupported("modules_to_save");
        }
        if file.layers_to_transform.as_ref().is_some_and(|v| !v.is_null()) {
            return unsupported("layers_to_transform");
        }
        let nonempty =
            |v: &Option<serde_json::Value>| v.as_ref().and_then(|v| v.as_object()).is_some_and(|m| !m.is_empty());
        if nonempty(&file.rank_pattern) || nonempty(&file.alpha_pattern) {
            return unsupported("per-module rank_pattern / alpha_pattern");
        }
        let targets = file.target_modules.resolve().map_err(&bad)?;
        let config = LoraConfig {
            r: file.r,
            alpha: file.lora_alpha,
            targets,
            use_rslora: file.use_rslora,
            dropout: file.lora_dropout,
        };
        config
            .validate()
            .map_err(|(key, message)| bad(format!("{} {message}", if key == "lora_r" { "r" } else { key })))?;
        let modules = adapted_modules(cfg, &config.targets);

        let weights = dir.join(ADAPTER_WEIGHTS);
        if !weights.is_file() {
            return Err(io_error(dir, format!("no {ADAPTER_WEIGHTS} (PyTorch .bin adapters are not supported)")));
        }
        let st = unsafe { MmapedSafetensors::new(&weights) }
            .map_err(|e| ModelError::Weights { path: weights.clone(), message: e.to_string() })?;
        let mut vars = BTreeMap::new();
        for m in &modules {
            for (name, shape) in [(m.a_name(), [config.r, m.in_features]), (m.b_name(), [m.out_features, config.r])] {
                // PEFT writes some adapters with the adapter name in the key (`.default.`).
                let stored = [name.clone(), name.replace(".weight", ".default.weight")]
                    .into_iter()
                    .find(|n| st.get(n).is_ok())
                    .ok_or_else(|| ModelError::MissingTensor { path: weights.clone(), name: name.clone() })?;
                let view = st
                    .get(&stored)
                    .map_err(|e| ModelError::Weights { path: weights.clone(), message: e.to_string() })?;
                if view.shape() != shape {
                    return Err(ModelError::TensorShape {
                        path: weights.clone(),
                        name: stored,
                        expected: shape.to_vec(),
                        found: view.shape().to_vec(),
                    });
                }
                let t = st
                    .load(&stored, device)
                    .map_err(|e| ModelError::Weights { path: weights.clone(), message: format!("`{stored}`: {e}") })?;
                vars.insert(name, Var::from_tensor(&t.to_dtype(DType::F32)?)?);
            }
        }
        let expected: std::collections::HashSet<String> =
            modules.iter().flat_map(|m| [m.a_name(), m.b_name()]).collect();
        let extra: Vec<String> = st
            .tensors()
            .into_iter()
            .map(|(n, _)| n.replace(".default.weight", ".weight"))
            .filter(|n| !expected.contains(n))
            .collect();
        if let Some(first) = extra.first() {
            return Err(ModelError::Weights {
                path: weights,
                message: format!(
                    "{} tensor(s) that no targeted module of this model has, e.g. `{first}` (an adapter for another \
                     architecture, or with modules prefopt does not adapt)",
                    extra.len()
                ),
            });
        }
        Ok(Self { config, params: Params::new(vars), modules })
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into the existing folder
    /// `dir` (callers write folders atomically), in PEFT's layout; `base_model` is recorded
    /// as `base_model_name_or_path`.
    pub fn fill_dir(&self, dir: &Path, base_model: &str) -> Result<()> {
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.config.r,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": self.config.targets,
            "use_rslora": self.config.use_rslora,
            "use_dora": false,
            "bias": "none",
            "lora_bias": false,
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
            "base_model_name_or_path": base_model,
        });
        let text = serde_json::to_string_pretty(&config).map_err(|e| io_error(dir, e))? + "\n";
        prefopt_fs::write_atomic(&dir.join(ADAPTER_CONFIG), text.as_bytes())?;
        self.params.save_safetensors(&dir.join(ADAPTER_WEIGHTS))
    }

    /// `scale * B A` (out, in) of one module, in f32.
    pub fn delta(&self, m: &AdaptedModule) -> Result<Tensor> {
        let get = |n: String| {
            self.params
                .get(&n)
                .map(|v| v.as_tensor().detach())
                .ok_or(ModelError::MissingTensor { path: "adapter".into(), name: n })
        };
        let (a, b) = (get(m.a_name())?, get(m.b_name())?);
        Ok(b.matmul(&a)?.affine(self.config.scale(), 0.0)?)
    }
}

/// Weighted adapters as one adapter of their summed rank, exactly: `sum_k c_k scale_k B_k A_k
/// = [c_1 scale_1 B_1, .., c_n scale_n B_n] [A_1; ..; A_n]`, with `lora_alpha = r` (scale 1).
/// For servers that apply one adapter per request (vLLM's `/v1/load_lora_adapter`). Every
/// adapter must adapt the same modules (the APO loop's do: one config for all iterations).
pub fn concatenate(adapters: &[(&LoraAdapter, f64)]) -> Result<LoraAdapter> {
    let Some((first, _)) = adapters.first() else {
        return Err(ModelError::Config { path: "adapters".into(), message: "no adapter to concatenate".into() });
    };
    if let Some((other, _)) = adapters.iter().find(|(a, _)| a.modules != first.modules) {
        return Err(ModelError::Config {
            path: "adapters".into(),
            message: format!(
                "adapters of different modules ({} and {}) do not concatenate",
                first.config.targets.join(","),
                other.config.targets.join(",")
            ),
        });
    }
    let mut vars = BTreeMap::new();
    for m in &first.modules {
        let get = |a: &LoraAdapter, n: String| {
            a.params
                .get(&n)
                .map(|v| v.as_tensor().detach())
                .ok_or(ModelError::MissingTensor { path: "adapter".into(), name: n })
        };
        let mut a_parts = Vec::with_capacity(adapters.len());
        let mut b_parts = Vec::with_capacity(adapters.len());
        for (adapter, coefficient) in adapters {
            a_parts.push(get(adapter, m.a_name())?);
            b_parts.push(get(adapter, m.b_name())?.affine(coefficient * adapter.config.scale(), 0.0)?);
        }
        vars.insert(m.a_name(), Var::from_tensor(&Tensor::cat(&a_parts, 0)?)?);
        vars.insert(m.b_name(), Var::from_tensor(&Tensor::cat(&b_parts, 1)?)?);
    }
    let r: usize = adapters.iter().map(|(a, _)| a.config.r).sum();
    let config =
        LoraConfig { r, alpha: r as f64, targets: first.config.targets.clone(), use_rslora: false, dropout: 0.0 };
    Ok(LoraAdapter { config, params: Params::new(vars), modules: first.modules.clone() })
}

/// The base weights with weighted adapters folded in: `W + sum_k c_k scale_k B_k A_k` for
/// every adapted module (`prefopt merge`, and a model the online loop keeps as a stack).
pub fn merge(base: &Params, adapters: &[(&LoraAdapter, f64)]) -> Result<Params> {
    let mut merged: BTreeMap<String, Tensor> = BTreeMap::new();
    for (adapter, coefficient) in adapters {
        for m in &adapter.modules {
            let name = format!("{}.weight", m.path);
            let delta = adapter.delta(m)?.affine(*coefficient, 0.0)?;
            let current = match merged.remove(&name) {
                Some(t) => t,
                None => base
                    .get(&name)
                    .ok_or_else(|| ModelError::MissingTensor { path: "base model".into(), name: name.clone() })?
                    .as_tensor()
                    .detach(),
            };
            merged.insert(name, (current + delta)?);
        }
    }
    let mut vars = BTreeMap::new();
    for (name, var) in base.iter() {
        let t = match merged.remove(name) {
            Some(t) => t,
            None => var.as_tensor().copy()?,
        };
        vars.insert(name.clone(), Var::from_tensor(&t)?);
    }
    Ok(Params::new(vars))
}
