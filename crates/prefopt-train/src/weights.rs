//! What a run trains: every weight of a model, or a LoRA adapter on a frozen base. One place
//! decides which tensors are trainable, how the network is built over them, what a checkpoint
//! or `final/` holds, and what the reference is.

use std::path::Path;

use candle_core::Device;
use prefopt_model::{copy_tokenizer_files, fill_model_dir, AdapterUse, HfModel, Llama, LlamaConfig, LoraAdapter, Mode};
use prefopt_model::{Params, Policy, Precision};

use crate::config::TrainConfig;
use crate::TrainError;

/// The trainable state of a run.
pub enum Weights {
    /// Every parameter of the model; `final/` is a model folder.
    Full(HfModel),
    /// A LoRA adapter on a frozen policy (a model, or an adapter stack whose adapters stay
    /// frozen beneath it); `final/` is a PEFT adapter folder.
    Lora { base: Policy, adapter: LoraAdapter },
}

impl Weights {
    /// The weights a run starts from: `cfg.model`'s, or a checkpoint's (`resume`). An adapter
    /// stack as `cfg.model` trains as its merged weights, or with LoRA as a frozen base. With
    /// LoRA the base is always `cfg.model`, and the adapter comes from the checkpoint, from
    /// `cfg.adapter` (continuing a PEFT adapter), or fresh from the run's seed.
    pub fn load(cfg: &TrainConfig, resume: Option<&Path>, device: &Device) -> Result<Self, TrainError> {
        if !cfg.uses_lora() {
            return Ok(Weights::Full(match resume {
                Some(dir) => HfModel::load(dir, device)?,
                None => Policy::load(&cfg.model, device)?.merged()?,
            }));
        }
        let base = Policy::load(&cfg.model, device)?;
        let adapter = match resume.or(cfg.adapter.as_deref()) {
            Some(dir) => {
                let adapter = LoraAdapter::load(dir, &base.base.config, device)?;
                cfg.check_adapter_agrees(&adapter.config)?;
                adapter
            }
            None => LoraAdapter::init(&base.base.config, cfg.fresh_lora_config()?, cfg.seed, device)?,
        };
        Ok(Weights::Lora { base, adapter })
    }

    /// The tensors the optimizer updates.
    pub fn trainable(&self) -> &Params {
        match self {
            Weights::Full(model) => &model.params,
            Weights::Lora { adapter, .. } => &adapter.params,
        }
    }

    pub fn config(&self) -> &LlamaConfig {
        match self {
            Weights::Full(model) => &model.config,
            Weights::Lora { base, .. } => &base.base.config,
        }
    }

    /// The network over the current weights: for `Mode::Train` with a graph to the trainable
    /// tensors; for `Mode::Infer` without one (evaluation). A LoRA base is always a frozen
    /// view, never a copy.
    pub fn network(&self, mode: Mode, precision: Precision) -> Result<Llama, TrainError> {
        Ok(match self {
            Weights::Full(model) => model.build(mode, precision)?,
            Weights::Lora { base, adapter } => {
                let mut uses = base.frozen_adapters();
                uses.push(AdapterUse { adapter, coefficient: 1.0, trainable: mode == Mode::Train });
                Llama::with_adapters(&base.base.config, &base.base.params, Mode::Frozen, precision, &uses)?
            }
        })
    }

    /// Writes the weights into the existing folder `dir` (a checkpoint's or `final/`, which
    /// callers write atomically): a Hugging Face model folder, or a PEFT adapter folder with
    /// the tokenizer files of `source` beside it. `name` is what the folder says it came from
    /// (`_name_or_path` in config.json, `base_model_name_or_path` of an adapter): the hub name
    /// the run was given, or else `source`'s absolute path.
    pub fn fill_dir(&self, dir: &Path, source: &Path, name: Option<&str>) -> Result<(), TrainError> {
        let absolute = std::fs::canonicalize(source).unwrap_or_else(|_| source.to_path_buf());
        let name = name.map_or_else(|| absolute.display().to_string(), str::to_string);
        match self {
            Weights::Full(model) => {
                let mut config = model.raw_config.clone();
                if let Some(c) = config.as_object_mut() {
                    c.insert("_name_or_path".into(), name.into());
                }
                fill_model_dir(dir, &config, &model.params, Some(source))?
            }
            Weights::Lora { adapter, .. } => {
                // A PEFT folder holds no model config or weights (transformers would take it
                // for a model); the tokenizer files make it self-describing.
                adapter.fill_dir(dir, &name)?;
                copy_tokenizer_files(source, dir)?;
            }
        }
        Ok(())
    }
}

/// The reference policy of a run, as a graph-free network: the reference model (or stack);
/// with LoRA, the base policy with the starting adapter frozen on top when continuing one,
/// over views of the base's weights, without a second copy.
pub fn reference_network(cfg: &TrainConfig, device: &Device) -> Result<Llama, TrainError> {
    let mut reference = Policy::load(cfg.ref_model_path(), device)?;
    if let Some(start) = cfg.adapter.as_deref() {
        reference = reference.with_adapter(start, 1.0, device)?;
    }
    let mode = if cfg.uses_lora() { Mode::Frozen } else { Mode::Infer };
    Ok(reference.network(mode, cfg.precision())?)
}
