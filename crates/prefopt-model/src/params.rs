//! Named parameters (Hugging Face names -> candle variables) and their safetensors I/O.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor, Var};

use crate::error::{io_error, ModelError, Result};

/// All trainable tensors of a model, f32, keyed by their checkpoint names.
/// Tied embeddings are one entry (`model.embed_tokens.weight`), as in PyTorch.
#[derive(Clone, Default)]
pub struct Params {
    vars: BTreeMap<String, Var>,
}

impl Params {
    pub fn new(vars: BTreeMap<String, Var>) -> Self {
        Self { vars }
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }

    /// In name order, so every walk over the parameters is deterministic.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.vars.iter()
    }

    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// Total number of scalar parameters.
    pub fn num_elements(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// A deep copy: new variables holding the same values.
    pub fn deep_clone(&self) -> Result<Self> {
        let mut vars = BTreeMap::new();
        for (name, var) in &self.vars {
            vars.insert(name.clone(), Var::from_tensor(&var.as_tensor().copy()?)?);
        }
        Ok(Self { vars })
    }

    /// Reads the tensors named in `expected` from `model.safetensors` or a sharded
    /// `model.safetensors.index.json` in `dir`, checks each shape, and upcasts bf16/f16 to f32.
    /// Returns the parameters and the names of stored tensors the config does not use.
    pub fn load(dir: &Path, expected: &[(String, Vec<usize>)], device: &Device) -> Result<(Self, Vec<String>)> {
        let (files, shard_of) = weight_files(dir)?;
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| ModelError::Weights { path: dir.to_path_buf(), message: e.to_string() })?;
        // Errors name the file that holds (or should hold) the tensor.
        let file_of = |name: &str| -> PathBuf {
            match &shard_of {
                Some(map) => map.get(name).cloned().unwrap_or_else(|| dir.join("model.safetensors.index.json")),
                None => files[0].clone(),
            }
        };
        let mut vars = BTreeMap::new();
        for (name, shape) in expected {
            let view =
                st.get(name).map_err(|_| ModelError::MissingTensor { path: file_of(name), name: name.clone() })?;
            if view.shape() != shape.as_slice() {
                return Err(ModelError::TensorShape {
                    path: file_of(name),
                    name: name.clone(),
                    expected: shape.clone(),
                    found: view.shape().to_vec(),
                });
            }
            let tensor = st
                .load(name, device)
                .map_err(|e| ModelError::Weights { path: file_of(name), message: format!("tensor `{name}`: {e}") })?;
            match tensor.dtype() {
                DType::F32 | DType::BF16 | DType::F16 => {}
                other => {
                    return Err(ModelError::Weights {
                        path: file_of(name),
                        message: format!("tensor `{name}` has dtype {other:?}; expected f32, bf16 or f16"),
                    })
                }
            }
            vars.insert(name.clone(), Var::from_tensor(&tensor.to_dtype(DType::F32)?)?);
        }
        let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        let mut unused: Vec<String> =
            st.tensors().into_iter().map(|(n, _)| n).filter(|n| !known.contains(n.as_str())).collect();
        unused.sort();
        Ok((Self { vars }, unused))
    }

    /// Writes all parameters as f32 to one safetensors file, atomically (temp file + rename),
    /// with the `{"format": "pt"}` metadata that transformers looks for.
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_device(&Device::Cpu)?.contiguous()?)))
            .collect::<Result<_>>()?;
        let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
            .map_err(|e| ModelError::Weights { path: path.to_path_buf(), message: e.to_string() })?;
        Ok(prefopt_fs::write_atomic(path, &bytes)?)
    }
}

/// Tensor name -> the shard file that holds it, from a sharded checkpoint's index.
type ShardMap = std::collections::HashMap<String, PathBuf>;

/// The safetensors files of a model folder: one file, or the shards an index names.
fn weight_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<ShardMap>)> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok((vec![single], None));
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| io_error(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Json { path: index.clone(), message: e.to_string() })?;
        let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::Weights {
            path: index.clone(),
            message: "missing object `weight_map`".into(),
        })?;
        let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
            return Err(ModelError::Weights {
                path: index,
                message: format!("shard {} is listed but missing", missing.display()),
            });
        }
        let shard_of = map.iter().filter_map(|(name, file)| Some((name.clone(), dir.join(file.as_str()?)))).collect();
        return Ok((paths, Some(shard_of)));
    }
    let hint = if dir.join("pytorch_model.bin").exists() {
        " (PyTorch .bin checkpoints are not supported: convert to safetensors)"
    } else {
        ""
    };
    Err(io_error(dir, format!("no model.safetensors or model.safetensors.index.json found{hint}")))
}
