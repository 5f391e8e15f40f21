//! Helpers shared by the test modules.

use std::path::{Path, PathBuf};

use candle_core::Device;
use prefopt_data::{HfTokenizer, TokenizeOptions};
use prefopt_loop::apo::LoopObserver;
use prefopt_model::{Mode, Policy, Precision};
use prefopt_train::dataset::PairDataset;

/// An observer that reports nothing.
pub struct Silent;
impl prefopt_train::Observer for Silent {}
impl LoopObserver for Silent {}

/// The repository's `fixtures/` folder.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// (lp(chosen), lp(rejected)) of every kept row of a pairs file under `model` (a model or
/// adapter stack folder), tokenized with `opts`.
pub fn pair_logps(model: &Path, pairs: &Path, opts: &TokenizeOptions) -> Vec<(f64, f64)> {
    let tok = HfTokenizer::from_dir(model).unwrap();
    let data = PairDataset::load(pairs, &tok, opts).unwrap();
    assert_eq!(data.dropped, 0, "{}: rows dropped by the length budget", pairs.display());
    let net = Policy::load(model, &Device::Cpu).unwrap().network(Mode::Infer, Precision::F32).unwrap();
    let lp = prefopt_train::reference::compute(
        &net,
        &data,
        8,
        prefopt_train::TrainConfig::default().batch_layout(tok.padding_id()),
        |_| {},
    )
    .unwrap();
    lp.into_iter().map(|(w, l)| (w as f64, l as f64)).collect()
}
