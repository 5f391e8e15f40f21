//! A Hugging Face model folder: `config.json` + safetensors weights in, the same layout out,
//! with the tokenizer and generation files copied so `transformers` loads our output.

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::config::{config_path, LlamaConfig};
use crate::error::{io_error, Result};
use crate::llama::{parameter_shapes, Llama, Mode, Precision};
use crate::params::Params;

/// A causal LM loaded from a local folder.
pub struct HfModel {
    /// Where it was loaded from; its non-weight files are copied on save.
    pub dir: PathBuf,
    pub config: LlamaConfig,
    /// `config.json` as read, so keys we do not interpret survive a save.
    pub raw_config: serde_json::Value,
    pub params: Params,
    /// Stored tensors the architecture does not use (e.g. a tied `lm_head.weight`).
    pub unused_tensors: Vec<String>,
}

impl HfModel {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(io_error(dir, "model folder not found"));
        }
        let (config, raw_config) = LlamaConfig::from_file(&config_path(dir))?;
        let (params, unused_tensors) = Params::load(dir, &parameter_shapes(&config), device)?;
        Ok(Self { dir: dir.to_path_buf(), config, raw_config, params, unused_tensors })
    }

    /// The network over these parameters (see [`Llama::new`]).
    pub fn build(&self, mode: Mode, precision: Precision) -> Result<Llama> {
        Llama::new(&self.config, &self.params, mode, precision)
    }

    /// Saves `params` as a model folder at `out`, atomically: safetensors (f32), `config.json`
    /// (with `torch_dtype` float32), and every other file of the source folder copied.
    pub fn save_with(&self, params: &Params, out: &Path) -> Result<()> {
        save_model_dir(out, &self.raw_config, params, Some(&self.dir))
    }

    pub fn save(&self, out: &Path) -> Result<()> {
        self.save_with(&self.params, out)
    }
}

/// Files a save never copies from the source folder: we write our own weights and config
/// (and a source that is an adapter stack or adapter keeps its own description).
fn is_weight_or_config(name: &str) -> bool {
    name == "config.json"
        || name == crate::stack::ADAPTER_STACK
        || name == crate::lora::ADAPTER_CONFIG
        || name.ends_with(".safetensors")
        || name == "model.safetensors.index.json"
        || name.ends_with(".bin")
        || name.ends_with(".pt")
        || name.ends_with(".pth")
        || name.starts_with('.')
}

/// Copies the tokenizer files of the model folder `source` (tokenizer*, special tokens map,
/// chat template) into `dir`: what an adapter folder or a stack folder needs beside its own
/// files to be self-describing, as TRL's trainer saves them beside an adapter.
pub fn copy_tokenizer_files(source: &Path, dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(source).map_err(|e| io_error(source, e))? {
        let entry = entry.map_err(|e| io_error(source, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let tokenizer_file =
            name.starts_with("tokenizer") || name == "special_tokens_map.json" || name.ends_with(".jinja");
        if entry.path().is_file() && tokenizer_file {
            std::fs::copy(entry.path(), dir.join(&name)).map_err(|e| io_error(entry.path(), e))?;
        }
    }
    Ok(())
}

/// Writes a loadable Hugging Face folder at `out` (atomically replacing an older one).
pub fn save_model_dir(
    out: &Path,
    raw_config: &serde_json::Value,
    params: &Params,
    source: Option<&Path>,
) -> Result<()> {
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
    }
    prefopt_fs::write_dir_atomic(out, |tmp| fill_model_dir(tmp, raw_config, params, source))
}

/// Writes the model files into an existing folder `dir` (for callers that already write
/// atomically, like a training checkpoint): f32 safetensors, `config.json` with the dtype
/// set to float32, and every non-weight file of `source` (tokenizer, generation config).
pub fn fill_model_dir(
    dir: &Path,
    raw_config: &serde_json::Value,
    params: &Params,
    source: Option<&Path>,
) -> Result<()> {
    let mut config = raw_config.clone();
    if let Some(obj) = config.as_object_mut() {
        // transformers 5 writes `dtype`, older versions `torch_dtype`; keep the file's layout.
        let key = if obj.contains_key("dtype") { "dtype" } else { "torch_dtype" };
        obj.insert(key.into(), "float32".into());
    }
    params.save_safetensors(&dir.join("model.safetensors"))?;
    let text = serde_json::to_string_pretty(&config).map_err(|e| io_error(dir, e))?;
    prefopt_fs::write_atomic(&dir.join("config.json"), text.as_bytes())?;
    if let Some(src) = source {
        for entry in std::fs::read_dir(src).map_err(|e| io_error(src, e))? {
            let entry = entry.map_err(|e| io_error(src, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_file() && !is_weight_or_config(&name) {
                std::fs::copy(entry.path(), dir.join(&name)).map_err(|e| io_error(entry.path(), e))?;
            }
        }
    }
    Ok(())
}
