//! A policy on disk: a Hugging Face model folder, or an adapter stack folder, a base model
//! plus weighted LoRA adapters, `W + sum_k c_k scale_k B_k A_k` for every adapted module.
//!
//! Stacks are how the APO loop keeps its iterates exact with LoRA: the extrapolation
//! `theta_t = theta_hat_t + alpha (theta_hat_t - theta_hat_{t-1})` is linear in the
//! coefficients `c_k`, while extrapolating A and B separately is not (their product is
//! bilinear). A stack folder holds `adapter_stack.json` (the base model's path and the
//! adapters' paths and coefficients) and the tokenizer files; the adapters stay in their own
//! PEFT folders. `prefopt merge` folds a stack into a plain model folder.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::config::{config_path, LlamaConfig};
use crate::error::{io_error, ModelError, Result};
use crate::hf::{copy_tokenizer_files, HfModel};
use crate::llama::{AdapterUse, Llama, Mode, Precision};
use crate::lora::{concatenate, merge, LoraAdapter};

pub const ADAPTER_STACK: &str = "adapter_stack.json";

/// One adapter of a stack and its weight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StackEntry {
    /// A PEFT LoRA folder; absolute in memory, relative to the stack folder in the file
    /// (so a run's output folder can move as a whole).
    pub adapter: PathBuf,
    pub coefficient: f64,
}

/// `adapter_stack.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StackFile {
    /// The base model folder (absolute).
    base_model: PathBuf,
    adapters: Vec<StackEntry>,
}

/// A policy loaded from a folder: its base model and its weighted adapters (none for a
/// plain model folder).
pub struct Policy {
    pub base: HfModel,
    pub adapters: Vec<(LoraAdapter, f64)>,
    /// The stack's entries (empty for a plain model folder).
    pub entries: Vec<StackEntry>,
}

/// Whether `dir` is an adapter stack folder.
pub fn is_stack(dir: &Path) -> bool {
    dir.join(ADAPTER_STACK).is_file()
}

/// The base model folder and entries of `dir`: a stack's, or (`dir`, none) for a model folder.
pub fn read_stack(dir: &Path) -> Result<(PathBuf, Vec<StackEntry>)> {
    if !is_stack(dir) {
        return Ok((dir.to_path_buf(), Vec::new()));
    }
    let path = dir.join(ADAPTER_STACK);
    let text = std::fs::read_to_string(&path).map_err(|e| io_error(&path, e))?;
    let file: StackFile =
        serde_json::from_str(&text).map_err(|e| ModelError::Json { path: path.clone(), message: e.to_string() })?;
    let base = dir.join(&file.base_model);
    if is_stack(&base) {
        return Err(ModelError::Config {
            path,
            message: format!(
                "base_model {} is itself a stack; a stack's base is a model folder",
                file.base_model.display()
            ),
        });
    }
    // Resolved, so the same adapter reached from two stacks is one path (a missing one stays
    // as written, for the loader's error).
    let entries = file
        .adapters
        .into_iter()
        .map(|e| {
            let joined = dir.join(&e.adapter);
            StackEntry { adapter: std::fs::canonicalize(&joined).unwrap_or(joined), coefficient: e.coefficient }
        })
        .collect();
    // A relative base (a hand-written stack) is relative to the stack folder, as its adapters.
    Ok((base, entries))
}

/// The folders whose files make up the policy at `dir` (for content hashes such as the
/// reference cache's key): the folder itself, and for a stack its base and adapters.
pub fn source_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let (base, entries) = read_stack(dir)?;
    let mut dirs = vec![dir.to_path_buf()];
    if is_stack(dir) {
        dirs.push(base);
        dirs.extend(entries.into_iter().map(|e| e.adapter));
    }
    Ok(dirs)
}

impl From<HfModel> for Policy {
    fn from(base: HfModel) -> Self {
        Self { base, adapters: Vec::new(), entries: Vec::new() }
    }
}

impl Policy {
    /// Loads a model folder or a stack folder (its base and every adapter).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let (base_dir, entries) = read_stack(dir)?;
        let base = HfModel::load(&base_dir, device)?;
        let adapters = load_adapters(&entries, &base.config, device)?;
        Ok(Self { base, adapters, entries })
    }

    /// One more adapter on top, with weight `coefficient` (`--adapter`).
    pub fn with_adapter(mut self, dir: &Path, coefficient: f64, device: &Device) -> Result<Self> {
        let adapter = LoraAdapter::load(dir, &self.base.config, device)?;
        self.adapters.push((adapter, coefficient));
        self.entries.push(StackEntry { adapter: dir.to_path_buf(), coefficient });
        Ok(self)
    }

    /// The adapters as frozen network terms.
    pub fn frozen_adapters(&self) -> Vec<AdapterUse<'_>> {
        self.adapters
            .iter()
            .map(|(adapter, coefficient)| AdapterUse { adapter, coefficient: *coefficient, trainable: false })
            .collect()
    }

    /// The network without a graph, the adapters as low-rank terms (the base weights are
    /// never copied per adapter): `Mode::Infer` lays the base out for inference (a transposed
    /// copy, faster), `Mode::Frozen` keeps views of the loaded weights (no copy at all).
    pub fn network(&self, mode: Mode, precision: Precision) -> Result<Llama> {
        debug_assert!(mode != Mode::Train, "a policy's network has no graph");
        Llama::with_adapters(&self.base.config, &self.base.params, mode, precision, &self.frozen_adapters())
    }

    /// The effective weights as a plain model (`W + sum_k c_k scale_k B_k A_k`); the base
    /// itself when there are no adapters.
    pub fn merged(self) -> Result<HfModel> {
        if self.adapters.is_empty() {
            return Ok(self.base);
        }
        let pairs: Vec<(&LoraAdapter, f64)> = self.adapters.iter().map(|(a, c)| (a, *c)).collect();
        let params = merge(&self.base.params, &pairs)?;
        Ok(HfModel { params, ..self.base })
    }
}

/// The stack's adapters, each with its coefficient, shaped for a base of `config`.
fn load_adapters(entries: &[StackEntry], config: &LlamaConfig, device: &Device) -> Result<Vec<(LoraAdapter, f64)>> {
    entries.iter().map(|e| Ok((LoraAdapter::load(&e.adapter, config, device)?, e.coefficient))).collect()
}

/// Writes the weighted adapters `entries` over the model folder `base` as one PEFT adapter
/// folder at `out`, atomically ([`concatenate`]: the same weights, rank the sum of the
/// adapters' ranks); returns its rank. Reads the base's `config.json` (the adapters' shapes),
/// not its weights.
pub fn save_concatenated_adapter(base: &Path, entries: &[StackEntry], out: &Path, device: &Device) -> Result<usize> {
    let (config, _) = LlamaConfig::from_file(&config_path(base))?;
    let adapters = load_adapters(entries, &config, device)?;
    let pairs: Vec<(&LoraAdapter, f64)> = adapters.iter().map(|(a, c)| (a, *c)).collect();
    let adapter = concatenate(&pairs)?;
    let base = base.display().to_string();
    prefopt_fs::write_dir_atomic(out, |tmp| adapter.fill_dir(tmp, &base))?;
    Ok(adapter.config.r)
}

/// Writes a stack folder at `out` atomically: `adapter_stack.json` over the model folder
/// `base_model` and `entries`, and `base_model`'s tokenizer files (so the folder works as a
/// `--model` anywhere a model folder does).
pub fn save_stack_dir(out: &Path, base_model: &Path, entries: &[StackEntry]) -> Result<()> {
    if is_stack(base_model) {
        return Err(ModelError::Config {
            path: out.join(ADAPTER_STACK),
            message: format!("base_model {} is a stack; flatten it first", base_model.display()),
        });
    }
    let base = std::fs::canonicalize(base_model).map_err(|e| io_error(base_model, e))?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
    let name = out.file_name().ok_or_else(|| io_error(out, "not a folder name"))?;
    // `out` does not exist yet (it is written atomically): its parent, resolved, plus its name.
    let out_abs = std::fs::canonicalize(parent).map_err(|e| io_error(parent, e))?.join(name);
    let adapters = entries
        .iter()
        .map(|e| {
            let abs = std::fs::canonicalize(&e.adapter).map_err(|err| io_error(&e.adapter, err))?;
            Ok(StackEntry { adapter: relative_to(&abs, &out_abs), coefficient: e.coefficient })
        })
        .collect::<Result<Vec<_>>>()?;
    let text =
        serde_json::to_string_pretty(&StackFile { base_model: base, adapters }).map_err(|e| io_error(out, e))? + "\n";
    prefopt_fs::write_dir_atomic(out, |tmp| {
        prefopt_fs::write_atomic(&tmp.join(ADAPTER_STACK), text.as_bytes())?;
        copy_tokenizer_files(base_model, tmp)
    })
}

/// `path` relative to the folder `dir` (both absolute and resolved), through `..` where needed.
fn relative_to(path: &Path, dir: &Path) -> PathBuf {
    let (p, d): (Vec<_>, Vec<_>) = (path.components().collect(), dir.components().collect());
    let common = p.iter().zip(&d).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..d.len() {
        out.push("..");
    }
    for c in &p[common..] {
        out.push(c);
    }
    out
}
