//! Helpers shared by the test modules: the committed fixtures and the device under test.

use std::path::{Path, PathBuf};

use candle_core::Device;
use prefopt_model::{HfModel, Llama, Mode, Precision};

/// The repository's `fixtures/` folder.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// A fixture model folder by name (`llama-tied`, `qwen2-untied`, ...).
pub fn fixture_model(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

/// The device under test: `PREFOPT_TEST_DEVICE` (`cpu`, `cuda`, `cuda:N`), default the CPU.
pub fn device() -> Device {
    let spec = std::env::var("PREFOPT_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    prefopt_model::parse_device(&spec).unwrap_or_else(|e| panic!("PREFOPT_TEST_DEVICE: {e}"))
}

/// A fixture model loaded on the device under test.
pub fn load(name: &str) -> HfModel {
    HfModel::load(&fixture_model(name), &device()).unwrap()
}

/// A fixture model's f32 network for `mode`.
pub fn network(name: &str, mode: Mode) -> Llama {
    load(name).build(mode, Precision::F32).unwrap()
}

/// Logits of new tokens after the positions in `cache` (which is extended), with left
/// padding `pad_lens` (empty: none): `logits(hidden_states(..))`, as generation runs them.
pub fn cached_logits(
    model: &Llama,
    input_ids: &candle_core::Tensor,
    pad_lens: &[usize],
    cache: &mut prefopt_model::KvCache,
) -> prefopt_model::Result<candle_core::Tensor> {
    model.logits(&model.hidden_states(input_ids, pad_lens, Some(cache))?)
}
