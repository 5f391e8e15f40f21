//! Optimizers with fp32 state: AdamW, RMSprop and SGD with PyTorch's exact update rules
//! (`torch.optim.*`, single-tensor code path, torch 2.15), and their checkpoints.
//!
//! As in the Hugging Face Trainer (which TRL uses), weight decay applies only to parameters
//! whose names are not biases or norm weights: see [`hf_decays`].
//!
//! Each update is a handful of element-wise candle ops per parameter, on the parameter's device,
//! in the order torch performs them, so results agree with torch to float32 rounding. AdamW on
//! f32 CPU tensors runs the same arithmetic as three fused in-place passes (`fused_adamw`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use prefopt_model::Params;

mod fused_adamw;
use fused_adamw::AdamwScalars;

/// File names inside a checkpoint folder.
pub const STATE_FILE: &str = "optimizer.safetensors";
pub const META_FILE: &str = "optimizer.json";

/// Which update rule. Names follow `TrainingArguments.optim` (`adamw_torch` and
/// `adamw_torch_fused` are accepted for AdamW: same arithmetic).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// `torch.optim.AdamW`: Adam with decoupled weight decay.
    #[serde(alias = "adamw_torch", alias = "adamw_torch_fused")]
    Adamw,
    /// `torch.optim.RMSprop` (not centered); weight decay is added to the gradient (L2).
    Rmsprop,
    /// `torch.optim.SGD` (no dampening, no Nesterov); weight decay is added to the gradient (L2).
    Sgd,
}

impl std::fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Adamw => "adamw",
            Self::Rmsprop => "rmsprop",
            Self::Sgd => "sgd",
        })
    }
}

/// Hyper-parameters of all three optimizers; each uses the fields that apply to it.
/// The learning rate is not here: it comes with every [`Optimizer::step`] (from the schedule).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    /// Decoupled (AdamW) or L2 (RMSprop, SGD) weight decay, applied to the parameters
    /// [`hf_decays`] selects. HF default 0.
    pub weight_decay: f64,
    /// AdamW beta1 (HF default 0.9).
    pub adam_beta1: f64,
    /// AdamW beta2 (HF default 0.999).
    pub adam_beta2: f64,
    /// The eps of AdamW and also of RMSprop (default 1e-8, torch's for both).
    pub adam_epsilon: f64,
    /// RMSprop smoothing constant (torch default 0.99).
    pub rmsprop_alpha: f64,
    /// Momentum of RMSprop and SGD (default 0: none). Ignored by AdamW.
    pub momentum: f64,
}

impl Default for OptimizerConfig {
    /// AdamW with the Hugging Face `TrainingArguments` defaults.
    fn default() -> Self {
        Self {
            kind: OptimizerKind::Adamw,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            rmsprop_alpha: 0.99,
            momentum: 0.0,
        }
    }
}

impl OptimizerConfig {
    /// Rejects the values torch's constructors reject.
    fn validate(&self) -> candle_core::Result<()> {
        let checks = [
            ("weight_decay", self.weight_decay, self.weight_decay >= 0.0),
            ("adam_beta1", self.adam_beta1, (0.0..1.0).contains(&self.adam_beta1)),
            ("adam_beta2", self.adam_beta2, (0.0..1.0).contains(&self.adam_beta2)),
            ("adam_epsilon", self.adam_epsilon, self.adam_epsilon >= 0.0),
            ("rmsprop_alpha", self.rmsprop_alpha, self.rmsprop_alpha >= 0.0),
            ("momentum", self.momentum, self.momentum >= 0.0),
        ];
        for (name, value, ok) in checks {
            if !ok || !value.is_finite() {
                candle_core::bail!("optimizer: invalid {name} = {value}");
            }
        }
        Ok(())
    }

    /// Names of the per-parameter state tensors, as torch's `state_dict` calls them.
    fn slots(&self) -> &'static [&'static str] {
        match (self.kind, self.momentum > 0.0) {
            (OptimizerKind::Adamw, _) => &["exp_avg", "exp_avg_sq"],
            (OptimizerKind::Rmsprop, false) => &["square_avg"],
            (OptimizerKind::Rmsprop, true) => &["square_avg", "momentum_buffer"],
            (OptimizerKind::Sgd, false) => &[],
            (OptimizerKind::Sgd, true) => &["momentum_buffer"],
        }
    }
}

/// Whether the Hugging Face Trainer applies weight decay to the parameter `name`
/// (transformers 5.23 `Trainer.get_decay_parameter_names`): not when the lower-cased name
/// contains `bias`, `layernorm` or `rmsnorm`, has a component `norm`, or a component ending
/// in `_norm` (e.g. `model.norm.weight`, `input_layernorm.weight`, `q_norm.weight`, `q_proj.bias`).
pub fn hf_decays(name: &str) -> bool {
    let name = name.to_lowercase();
    let forbidden = name.contains("bias")
        || name.contains("layernorm")
        || name.contains("rmsnorm")
        || name.split('.').any(|part| part == "norm" || part.ends_with("_norm"));
    !forbidden
}

/// What went wrong saving or loading optimizer state. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: optimizer state `{tensor}` for parameter `{param}` is missing")]
    MissingTensor { path: PathBuf, tensor: String, param: String },
    #[error("{path}: optimizer state `{tensor}` has shape {found:?}, but parameter `{param}` has shape {expected:?}")]
    TensorShape { path: PathBuf, tensor: String, param: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{path}: the checkpoint holds `{found}` optimizer state, but the config asks for `{expected}`")]
    KindMismatch { path: PathBuf, expected: OptimizerKind, found: OptimizerKind },
    #[error(transparent)]
    Fs(#[from] prefopt_fs::FsError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> OptimError {
    OptimError::Io { path: path.to_path_buf(), message: e.to_string() }
}

/// `optimizer.json`: what the state tensors mean.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    format: String,
    kind: OptimizerKind,
    steps_taken: u64,
    /// The hyper-parameters in use when saved (informational: `load` takes the caller's).
    config: OptimizerConfig,
    /// Parameters without weight decay.
    no_decay: Vec<String>,
}

const META_FORMAT: &str = "prefopt-optimizer-v1";

/// fp32 state per parameter, in `Params` name order.
pub struct Optimizer {
    cfg: OptimizerConfig,
    /// Parameter names and shapes at construction, in `Params` order: each step checks them.
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    /// Per parameter: the weight decay it gets (`cfg.weight_decay` or 0, see [`hf_decays`]).
    weight_decay: Vec<f64>,
    /// `state[k][i]`: state tensor `cfg.slots()[k]` of parameter `i`, f32 on its device.
    state: Vec<Vec<Tensor>>,
    steps: u64,
}

impl std::fmt::Debug for Optimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Optimizer")
            .field("cfg", &self.cfg)
            .field("parameters", &self.names.len())
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl Optimizer {
    /// Fresh state (zeros, f32, on each parameter's device) for every parameter of `params`.
    pub fn new(cfg: OptimizerConfig, params: &Params) -> candle_core::Result<Self> {
        cfg.validate()?;
        let mut names = Vec::with_capacity(params.len());
        let mut shapes = Vec::with_capacity(params.len());
        let mut weight_decay = Vec::with_capacity(params.len());
        for (name, var) in params.iter() {
            names.push(name.clone());
            shapes.push(var.dims().to_vec());
            weight_decay.push(if hf_decays(name) { cfg.weight_decay } else { 0.0 });
        }
        let state = cfg
            .slots()
            .iter()
            .map(|_| params.iter().map(|(_, v)| v.as_tensor().zeros_like()?.to_dtype(DType::F32)).collect())
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { cfg, names, shapes, weight_decay, state, steps: 0 })
    }

    pub fn config(&self) -> &OptimizerConfig {
        &self.cfg
    }

    /// Parameters that get no weight decay (biases and norm weights), for logging.
    pub fn no_decay_names(&self) -> Vec<&str> {
        self.names.iter().filter(|n| !hf_decays(n)).map(String::as_str).collect()
    }

    /// One update: `grads[i]` is the gradient of the i-th parameter in `params.iter()` order. Updates the Vars in place (Var::set), so models built over these Vars see the new values.
    ///
    /// `lr` is this step's learning rate (e.g. [`crate::schedule::Schedule::lr_at`]).
    pub fn step(&mut self, params: &Params, grads: &[Tensor], lr: f64) -> candle_core::Result<()> {
        if grads.len() != self.names.len() || params.len() != self.names.len() {
            candle_core::bail!(
                "optimizer step: {} gradients for {} parameters; the optimizer was built for {}",
                grads.len(),
                params.len(),
                self.names.len()
            );
        }
        for (i, ((name, var), g)) in params.iter().zip(grads).enumerate() {
            if *name != self.names[i] || var.dims() != self.shapes[i].as_slice() || g.dims() != var.dims() {
                candle_core::bail!(
                    "optimizer step: parameter {i} is `{name}` {:?} with gradient {:?}; expected `{}` {:?}",
                    var.dims(),
                    g.dims(),
                    self.names[i],
                    self.shapes[i]
                );
            }
        }
        self.steps += 1;
        for (i, ((_, var), g)) in params.iter().zip(grads).enumerate() {
            let g = g.detach().to_dtype(DType::F32)?;
            match self.cfg.kind {
                OptimizerKind::Adamw => self.adamw(i, var, &g, lr)?,
                OptimizerKind::Rmsprop => var.set(&self.rmsprop(i, var.as_tensor().detach(), g, lr)?)?,
                OptimizerKind::Sgd => var.set(&self.sgd(i, var.as_tensor().detach(), g, lr)?)?,
            }
        }
        Ok(())
    }

    /// torch `_single_tensor_adam` with `decoupled_weight_decay=True`: in place on f32 CPU
    /// tensors ([`fused_adamw`]), otherwise as the composition [`adamw_composed`].
    fn adamw(&mut self, i: usize, var: &candle_core::Var, g: &Tensor, lr: f64) -> candle_core::Result<()> {
        let c = &self.cfg;
        let s = AdamwScalars::new(c.adam_beta1, c.adam_beta2, c.adam_epsilon, self.weight_decay[i], lr, self.steps);
        let (p, m, v) = (var.as_tensor(), &self.state[0][i], &self.state[1][i]);
        if fused_adamw::applies(p, m, v) {
            return fused_adamw::update(p, m, v, g, s);
        }
        let (p, m, v) = adamw_composed(p.detach(), m, v, g, s)?;
        var.set(&p)?;
        self.state[0][i] = m;
        self.state[1][i] = v;
        Ok(())
    }

    /// torch `_single_tensor_rmsprop`, not centered.
    fn rmsprop(&mut self, i: usize, p: Tensor, mut g: Tensor, lr: f64) -> candle_core::Result<Tensor> {
        let c = &self.cfg;
        let wd = self.weight_decay[i];
        if wd != 0.0 {
            g = (g + p.affine(wd, 0.0)?)?; // grad.add(param, alpha=weight_decay)
        }
        // square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
        let v = (self.state[0][i].affine(c.rmsprop_alpha, 0.0)? + g.affine(1.0 - c.rmsprop_alpha, 0.0)?.mul(&g)?)?;
        let avg = v.sqrt()?.affine(1.0, c.adam_epsilon)?;
        let p = if c.momentum > 0.0 {
            // buf.mul_(momentum).addcdiv_(grad, avg); param.add_(buf, alpha=-lr)
            let buf = (self.state[1][i].affine(c.momentum, 0.0)? + g.div(&avg)?)?;
            let p = (p + buf.affine(-lr, 0.0)?)?;
            self.state[1][i] = buf;
            p
        } else {
            // param.addcdiv_(grad, avg, value=-lr)
            (p + g.div(&avg)?.affine(-lr, 0.0)?)?
        };
        self.state[0][i] = v;
        Ok(p)
    }

    /// torch `_single_tensor_sgd`, dampening 0, no Nesterov.
    fn sgd(&mut self, i: usize, p: Tensor, mut g: Tensor, lr: f64) -> candle_core::Result<Tensor> {
        let wd = self.weight_decay[i];
        if wd != 0.0 {
            g = (g + p.affine(wd, 0.0)?)?;
        }
        if self.cfg.momentum > 0.0 {
            // torch starts the buffer at the first gradient; from zeros, `0 * m + g` is exactly that.
            let buf = (self.state[0][i].affine(self.cfg.momentum, 0.0)? + &g)?;
            self.state[0][i] = buf.clone();
            g = buf;
        }
        p + g.affine(-lr, 0.0)? // param.add_(grad, alpha=-lr)
    }

    /// Number of updates applied so far (torch's `state["step"]`), restored by [`Optimizer::load`].
    pub fn steps_taken(&self) -> u64 {
        self.steps
    }

    /// Checkpointing: writes `optimizer.safetensors` (state tensors named e.g. `exp_avg.<param name>`) and `optimizer.json` (kind, step count, hyper-parameters) into `dir`, atomically per file; `load` restores them and errors clearly (naming the file and the parameter) if a tensor is missing or mis-shaped or the kind differs.
    ///
    /// `dir` is created if needed. The tensors file is written first, so a present
    /// `optimizer.json` always comes with its tensors.
    pub fn save(&self, dir: &Path) -> Result<(), OptimError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let state_path = dir.join(STATE_FILE);
        let mut tensors = Vec::new();
        for (slot, states) in self.cfg.slots().iter().zip(&self.state) {
            for (name, t) in self.names.iter().zip(states) {
                tensors.push((format!("{slot}.{name}"), t.to_device(&Device::Cpu)?.contiguous()?));
            }
        }
        let metadata = HashMap::from([("format".to_string(), META_FORMAT.to_string())]);
        let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
            .map_err(|e| io_err(&state_path, e))?;
        prefopt_fs::write_atomic(&state_path, &bytes)?;

        let meta_path = dir.join(META_FILE);
        let meta = Meta {
            format: META_FORMAT.to_string(),
            kind: self.cfg.kind,
            steps_taken: self.steps,
            config: self.cfg.clone(),
            no_decay: self.no_decay_names().into_iter().map(String::from).collect(),
        };
        let json = serde_json::to_string_pretty(&meta).map_err(|e| io_err(&meta_path, e))? + "\n";
        Ok(prefopt_fs::write_atomic(&meta_path, json.as_bytes())?)
    }

    /// Restores state saved by [`Optimizer::save`] for the same parameters. The hyper-parameters
    /// are the caller's `cfg` (its kind must match the checkpoint's); the step count and the
    /// state tensors come from `dir`. State for a parameter `params` does not have is an error.
    pub fn load(cfg: OptimizerConfig, params: &Params, dir: &Path) -> Result<Self, OptimError> {
        let meta_path = dir.join(META_FILE);
        let text = std::fs::read_to_string(&meta_path).map_err(|e| io_err(&meta_path, e))?;
        let meta: Meta = serde_json::from_str(&text).map_err(|e| OptimError::Format {
            path: meta_path.clone(),
            message: format!("not a prefopt optimizer file: {e}"),
        })?;
        if meta.format != META_FORMAT {
            return Err(OptimError::Format {
                path: meta_path,
                message: format!("format `{}`, expected `{META_FORMAT}`", meta.format),
            });
        }
        if meta.kind != cfg.kind {
            return Err(OptimError::KindMismatch { path: meta_path, expected: cfg.kind, found: meta.kind });
        }

        let state_path = dir.join(STATE_FILE);
        let bytes = std::fs::read(&state_path).map_err(|e| io_err(&state_path, e))?;
        let stored = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| OptimError::Format { path: state_path.clone(), message: e.to_string() })?;
        // State of a parameter the model lacks means the checkpoint is for another model.
        let known: std::collections::HashSet<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
        let mut stray: Vec<&str> = stored
            .keys()
            .map(|k| k.split_once('.').map_or(k.as_str(), |(_, p)| p))
            .filter(|p| !known.contains(p))
            .collect();
        stray.sort();
        if let Some(first) = stray.first() {
            return Err(OptimError::Format {
                path: state_path,
                message: format!(
                    "holds optimizer state for {} parameter(s) the model does not have, e.g. `{first}`",
                    stray.len()
                ),
            });
        }

        let mut opt = Self::new(cfg, params)?;
        let by_name: BTreeMap<&str, &Tensor> = stored.iter().map(|(k, t)| (k.as_str(), t)).collect();
        for (k, slot) in opt.cfg.slots().iter().enumerate() {
            for (i, (name, var)) in params.iter().enumerate() {
                let tensor = format!("{slot}.{name}");
                let t = by_name.get(tensor.as_str()).ok_or_else(|| OptimError::MissingTensor {
                    path: state_path.clone(),
                    tensor: tensor.clone(),
                    param: name.clone(),
                })?;
                if t.dims() != var.dims() {
                    return Err(OptimError::TensorShape {
                        path: state_path.clone(),
                        tensor,
                        param: name.clone(),
                        expected: var.dims().to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
                opt.state[k][i] = t.to_dtype(DType::F32)?.to_device(var.device())?;
            }
        }
        opt.steps = meta.steps_taken;
        Ok(opt)
    }
}

/// One AdamW update as candle ops, in the order torch performs them: the new parameter and
/// moments. What runs on other devices, and what the fused CPU passes are tested against.
fn adamw_composed(
    mut p: Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    s: AdamwScalars,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    if let Some(decay) = s.decay {
        p = p.affine(decay, 0.0)?;
    }
    // exp_avg.lerp_(grad, 1 - beta1), with torch's two-sided lerp formula.
    let w = s.lerp_weight;
    let diff = (g - m)?;
    let m = if w < 0.5 { (m + diff.affine(w, 0.0)?)? } else { (g - diff.affine(1.0 - w, 0.0)?)? };
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    let v = (v.affine(s.beta2, 0.0)? + g.affine(1.0 - s.beta2, 0.0)?.mul(g)?)?;
    // denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    let denom = v.sqrt()?.affine(s.inv_bias_correction2_sqrt, s.eps)?;
    // param.addcdiv_(exp_avg, denom, value=-step_size)
    let p = (p + m.div(&denom)?.affine(s.neg_step_size, 0.0)?)?;
    Ok((p, m, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn fixture() -> serde_json::Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/expected/optim/optim.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn floats(v: &serde_json::Value) -> Vec<f32> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn shapes(fx: &serde_json::Value) -> BTreeMap<String, Vec<usize>> {
        fx["shapes"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(n, s)| (n.clone(), s.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()))
            .collect()
    }

    fn tensors(values: &serde_json::Value, shapes: &BTreeMap<String, Vec<usize>>) -> BTreeMap<String, Tensor> {
        shapes
            .iter()
            .map(|(n, s)| (n.clone(), Tensor::from_vec(floats(&values[n]), s.as_slice(), &Device::Cpu).unwrap()))
            .collect()
    }

    fn config_of(case: &serde_json::Value) -> OptimizerConfig {
        OptimizerConfig {
            kind: serde_json::from_value(case["kind"].clone()).unwrap(),
            weight_decay: case["weight_decay"].as_f64().unwrap(),
            adam_beta1: case["adam_beta1"].as_f64().unwrap(),
            adam_beta2: case["adam_beta2"].as_f64().unwrap(),
            adam_epsilon: case["adam_epsilon"].as_f64().unwrap(),
            rmsprop_alpha: case["rmsprop_alpha"].as_f64().unwrap(),
            momentum: case["momentum"].as_f64().unwrap(),
        }
    }

    fn params_of(init: BTreeMap<String, Tensor>) -> Params {
        Params::new(init.into_iter().map(|(n, t)| (n, Var::from_tensor(&t).unwrap())).collect())
    }

    #[test]
    fn updates_match_torch_optim_for_five_steps() {
        let fx = fixture();
        let shapes = shapes(&fx);
        let cases = fx["optimizers"].as_array().unwrap();
        assert_eq!(cases.len(), 9);
        for case in cases {
            let params = params_of(tensors(&case["init"], &shapes));
            let mut opt = Optimizer::new(config_of(case), &params).unwrap();
            let mut max_rel = 0f64;
            // Per element, the largest magnitude it has had so far.
            let mut peak: BTreeMap<String, Vec<f32>> =
                params.iter().map(|(n, v)| (n.clone(), flat(&v.as_tensor().abs().unwrap()))).collect();
            for (step, (grads, after)) in
                case["grads"].as_array().unwrap().iter().zip(case["after"].as_array().unwrap()).enumerate()
            {
                let grads: Vec<Tensor> = tensors(grads, &shapes).into_values().collect();
                let lr = case["lrs"][step].as_f64().unwrap();
                opt.step(&params, &grads, lr).unwrap();
                for (name, var) in params.iter() {
                    let peak = peak.get_mut(name).unwrap();
                    for (j, (got, want)) in flat(var.as_tensor()).into_iter().zip(floats(&after[name])).enumerate() {
                        // Relative to the element's largest magnitude so far: float32 rounding of
                        // `p + update` is relative to its operands (and torch fuses some of these
                        // into FMAs), so where updates nearly cancel p the error carries over.
                        peak[j] = peak[j].max(want.abs());
                        let scale = peak[j].max(1e-6);
                        let rel = ((got - want).abs() / scale) as f64;
                        max_rel = max_rel.max(rel);
                        assert!(rel <= 1e-6, "{}: step {}: {name}[{j}] = {got}, torch {want}", case["name"], step + 1);
                    }
                }
            }
            assert_eq!(opt.steps_taken(), 5);
            eprintln!("{}: max relative error vs torch over 5 steps {max_rel:e}", case["name"].as_str().unwrap());
        }
    }

    #[test]
    fn weight_decay_skips_biases_and_norms_like_hf_trainer() {
        for name in [
            "model.norm.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.3.post_attention_layernorm.weight",
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.self_attn.q_norm.weight",
            "transformer.ln_f.RMSNorm.weight",
        ] {
            assert!(!hf_decays(name), "{name} should not decay");
        }
        for name in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.normal_proj.weight",
        ] {
            assert!(hf_decays(name), "{name} should decay");
        }
    }

    #[test]
    fn step_updates_vars_in_place() {
        let var = Var::from_slice(&[1f32, -2.0], 2, &Device::Cpu).unwrap();
        let params = Params::new(BTreeMap::from([("w".to_string(), var.clone())]));
        let seen_by_model = var.as_tensor().clone();
        let cfg = OptimizerConfig { kind: OptimizerKind::Sgd, ..Default::default() };
        let mut opt = Optimizer::new(cfg, &params).unwrap();
        let g = Tensor::new(&[1f32, 1.0], &Device::Cpu).unwrap();
        opt.step(&params, &[g], 0.5).unwrap();
        assert_eq!(flat(&seen_by_model), vec![0.5, -2.5]);
    }

    #[test]
    fn step_rejects_mismatched_gradients() {
        let params = params_of(BTreeMap::from([
            ("a".to_string(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()),
            ("b".to_string(), Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap()),
        ]));
        let mut opt = Optimizer::new(OptimizerConfig::default(), &params).unwrap();
        let g3 = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let err = opt.step(&params, std::slice::from_ref(&g3), 1e-3).unwrap_err().to_string();
        assert!(err.contains("1 gradients for 2 parameters"), "{err}");
        let err = opt.step(&params, &[g3.clone(), g3], 1e-3).unwrap_err().to_string();
        assert!(err.contains("`b`"), "{err}");
        assert_eq!(opt.steps_taken(), 0);
        let bad = OptimizerConfig { adam_beta2: 1.0, ..Default::default() };
        assert!(Optimizer::new(bad, &params).unwrap_err().to_string().contains("adam_beta2"));
    }

    /// A small model-like parameter set with gradients that differ per step.
    fn toy() -> (Params, impl Fn(usize) -> Vec<Tensor>) {
        let dev = Device::Cpu;
        let params = params_of(BTreeMap::from([
            ("model.layers.0.mlp.up_proj.weight".to_string(), Tensor::randn(0f32, 1.0, (4, 3), &dev).unwrap()),
            ("model.norm.weight".to_string(), Tensor::randn(1f32, 0.1, 3, &dev).unwrap()),
        ]));
        let grads = move |step: usize| {
            let s = (step as f64 + 1.0).sin();
            vec![
                Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap().reshape((4, 3)).unwrap().affine(s, 0.1).unwrap(),
                Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap().affine(s, 0.0).unwrap(),
            ]
        };
        (params, grads)
    }

    #[test]
    fn save_then_load_gives_identical_next_steps() {
        let cfgs = [
            OptimizerConfig { weight_decay: 0.01, ..Default::default() },
            OptimizerConfig { kind: OptimizerKind::Rmsprop, weight_decay: 0.01, momentum: 0.9, ..Default::default() },
            OptimizerConfig { kind: OptimizerKind::Sgd, momentum: 0.9, ..Default::default() },
            OptimizerConfig { kind: OptimizerKind::Sgd, ..Default::default() },
        ];
        for cfg in cfgs {
            let (params, grads) = toy();
            let mut opt = Optimizer::new(cfg.clone(), &params).unwrap();
            for s in 0..2 {
                opt.step(&params, &grads(s), 1e-2).unwrap();
            }
            let dir = tempfile::tempdir().unwrap();
            let ckpt = dir.path().join("checkpoint-2");
            opt.save(&ckpt).unwrap();
            let resumed_params = params.deep_clone().unwrap();
            let mut resumed = Optimizer::load(cfg.clone(), &resumed_params, &ckpt).unwrap();
            assert_eq!(resumed.steps_taken(), 2);
            for s in 2..5 {
                opt.step(&params, &grads(s), 1e-2).unwrap();
                resumed.step(&resumed_params, &grads(s), 1e-2).unwrap();
            }
            for ((n, a), (_, b)) in params.iter().zip(resumed_params.iter()) {
                assert_eq!(flat(a.as_tensor()), flat(b.as_tensor()), "{:?}: {n}", cfg.kind);
            }
            let meta: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(ckpt.join(META_FILE)).unwrap()).unwrap();
            assert_eq!(meta["steps_taken"], 2);
            assert_eq!(meta["no_decay"], serde_json::json!(["model.norm.weight"]));
        }
    }

    #[test]
    fn load_errors_name_the_file_and_the_parameter() {
        let (params, grads) = toy();
        let cfg = OptimizerConfig::default();
        let mut opt = Optimizer::new(cfg.clone(), &params).unwrap();
        opt.step(&params, &grads(0), 1e-3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        opt.save(dir.path()).unwrap();
        let state_path = dir.path().join(STATE_FILE);
        let meta_path = dir.path().join(META_FILE);
        let state_file = state_path.display().to_string();
        let meta_file = meta_path.display().to_string();

        // Different kind.
        let sgd = OptimizerConfig { kind: OptimizerKind::Sgd, ..Default::default() };
        let err = Optimizer::load(sgd, &params, dir.path()).err().unwrap().to_string();
        assert!(err.contains(&meta_file) && err.contains("`adamw`") && err.contains("`sgd`"), "{err}");

        // Missing and mis-shaped tensors.
        let write_state = |tensors: Vec<(&str, Tensor)>| {
            let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (*n, t)), None).unwrap();
            std::fs::write(&state_path, bytes).unwrap();
        };
        let z = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        write_state(vec![
            ("exp_avg.model.layers.0.mlp.up_proj.weight", z(&[4, 3])),
            ("exp_avg_sq.model.layers.0.mlp.up_proj.weight", z(&[4, 3])),
            ("exp_avg.model.norm.weight", z(&[3])),
        ]);
        let err = Optimizer::load(cfg.clone(), &params, dir.path()).err().unwrap().to_string();
        assert!(
            err.contains(&state_file) && err.contains("exp_avg_sq.model.norm.weight") && err.contains("missing"),
            "{err}"
        );
        write_state(vec![
            ("exp_avg.model.layers.0.mlp.up_proj.weight", z(&[3, 4])),
            ("exp_avg_sq.model.layers.0.mlp.up_proj.weight", z(&[4, 3])),
            ("exp_avg.model.norm.weight", z(&[3])),
            ("exp_avg_sq.model.norm.weight", z(&[3])),
        ]);
        let err = Optimizer::load(cfg.clone(), &params, dir.path()).err().unwrap().to_string();
        assert!(err.contains(&state_file) && err.contains("`model.layers.0.mlp.up_proj.weight`"), "{err}");
        assert!(err.contains("[3, 4]") && err.contains("[4, 3]"), "{err}");

        // State for a parameter the model lacks: another model's checkpoint.
        write_state(vec![("exp_avg.lm_head.weight", z(&[2]))]);
        let err = Optimizer::load(cfg.clone(), &params, dir.path()).err().unwrap().to_string();
        assert!(err.contains(&state_file) && err.contains("`lm_head.weight`"), "{err}");

        // Missing and corrupt files.
        std::fs::write(&meta_path, "{").unwrap();
        let err = Optimizer::load(cfg.clone(), &params, dir.path()).err().unwrap().to_string();
        assert!(err.contains(&meta_file), "{err}");
        std::fs::remove_file(&meta_path).unwrap();
        let err = Optimizer::load(cfg, &params, dir.path()).err().unwrap().to_string();
        assert!(err.contains(&meta_file), "{err}");
    }

    #[test]
    fn kind_names_follow_hf_optim() {
        let parse = |s: &str| serde_json::from_str::<OptimizerKind>(&format!("\"{s}\"")).unwrap();
        assert_eq!(parse("adamw"), OptimizerKind::Adamw);
        assert_eq!(parse("adamw_torch"), OptimizerKind::Adamw);
        assert_eq!(parse("rmsprop"), OptimizerKind::Rmsprop);
        assert_eq!(parse("sgd"), OptimizerKind::Sgd);
        assert_eq!(OptimizerKind::Rmsprop.to_string(), "rmsprop");
    }
}
