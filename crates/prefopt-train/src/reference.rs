//! Reference log-probs `lp_ref(y_w)`, `lp_ref(y_l)` for every pair: computed once with the
//! frozen reference model, and with `precompute_ref_log_probs` cached on disk under a key
//! that hashes the reference weights, the data file and the tokenization settings, so a
//! second run with the same key does no reference forward pass at all.

use std::io::Read;
use std::path::{Path, PathBuf};

use prefopt_fs::FsError;
use prefopt_model::Llama;
use sha2::{Digest, Sha256};

use crate::dataset::PairDataset;
use crate::logps::{score_pairs, BatchLayout};
use crate::TrainError;

/// (lp_ref(chosen), lp_ref(rejected)) per pair, in dataset order.
pub type RefLogps = Vec<(f32, f32)>;

/// Reference log-probs of `data` under the frozen network `reference`, `batch_size` pairs
/// per forward pass laid out as `layout`; `progress` hears the pairs done so far.
pub fn compute(
    reference: &Llama,
    data: &PairDataset,
    batch_size: usize,
    layout: BatchLayout,
    progress: impl FnMut(usize),
) -> Result<RefLogps, TrainError> {
    let pairs: Vec<_> = data.pairs.iter().collect();
    Ok(score_pairs(reference, &pairs, batch_size, layout, progress)?)
}

/// Hex SHA-256 over the reference's model folders' weight, adapter and tokenizer files (the
/// reference model, and a starting LoRA adapter), the data file, and the tokenization
/// settings (`settings`, any stable text).
pub fn cache_key(model_dirs: &[&Path], data_path: &Path, settings: &str) -> Result<String, TrainError> {
    let mut hasher = Sha256::new();
    let mut files = Vec::new();
    for dir in model_dirs {
        let mut in_dir: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| FsError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                p.is_file()
                    && (name.ends_with(".safetensors")
                        || name.starts_with("tokenizer")
                        || name == "config.json"
                        || name == prefopt_model::lora::ADAPTER_CONFIG
                        || name == prefopt_model::stack::ADAPTER_STACK
                        || name.ends_with(".jinja"))
            })
            .collect();
        in_dir.sort();
        files.extend(in_dir);
    }
    files.push(data_path.to_path_buf());
    for f in &files {
        hasher.update(f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        hash_file(&mut hasher, f)?;
    }
    hasher.update(settings.as_bytes());
    Ok(format!("{:x}", hasher.finalize()))
}

fn hash_file(hasher: &mut Sha256, path: &Path) -> Result<(), TrainError> {
    let mut f = std::fs::File::open(path).map_err(|e| FsError::io(path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| FsError::io(path, e))?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
    }
}

/// The cache folder: the configured one, else `$PREFOPT_CACHE`, else `~/.cache/prefopt`.
pub fn cache_dir(configured: Option<&Path>) -> PathBuf {
    if let Some(dir) = configured {
        return dir.to_path_buf();
    }
    if let Some(dir) = std::env::var_os("PREFOPT_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("prefopt")
}

/// Reads a cached entry; `None` if absent or unreadable (then it is recomputed).
pub fn load_cached(dir: &Path, key: &str, expected_len: usize) -> Option<RefLogps> {
    let text = std::fs::read_to_string(dir.join("ref-logps").join(format!("{key}.json"))).ok()?;
    let values: RefLogps = serde_json::from_str(&text).ok()?;
    (values.len() == expected_len).then_some(values)
}

/// Writes an entry atomically.
pub fn store_cached(dir: &Path, key: &str, values: &RefLogps) -> Result<PathBuf, TrainError> {
    let folder = dir.join("ref-logps");
    std::fs::create_dir_all(&folder).map_err(|e| FsError::io(&folder, e))?;
    let path = folder.join(format!("{key}.json"));
    let text = serde_json::to_string(values).map_err(|e| FsError::io(&path, e))?;
    prefopt_fs::write_atomic(&path, text.as_bytes())?;
    Ok(path)
}
