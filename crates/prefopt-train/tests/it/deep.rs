//! A random model with a real checkpoint's depth and vocabulary (24 layers, vocab 50,304;
//! fixtures/models/llama-deep-50k, made by scripts/make_deep_fixture.py): summed completion
//! log-probs against transformers in float64, within twice transformers' own float32 error.
//! The fixtures' vocabulary of 512 hid a +1e-4 nats-per-token bias of the f32 log-sum-exp
//! that this vocabulary shows.

use prefopt_data::{HfTokenizer, TokenizeOptions};
use prefopt_model::{HfModel, Mode, Precision};
use prefopt_train::dataset::PairDataset;
use prefopt_train::{score_pairs, TrainConfig};

use crate::util::{device, fixtures};

#[test]
fn deep_wide_vocabulary_log_probs_are_within_twice_transformers_f32_error() {
    let dir = fixtures().join("models/llama-deep-50k");
    let tok = HfTokenizer::from_dir(&dir).unwrap();
    let net = HfModel::load(&dir, &device()).unwrap().build(Mode::Infer, Precision::F32).unwrap();
    let opts = TokenizeOptions { max_length: Some(100_000), ..TokenizeOptions::default() };
    for dataset in ["plain", "chat"] {
        let data = PairDataset::load(&fixtures().join(format!("data/{dataset}.jsonl")), &tok, &opts).unwrap();
        let pairs: Vec<_> = data.pairs.iter().collect();
        let got = score_pairs(&net, &pairs, 4, TrainConfig::default().batch_layout(tok.padding_id()), |_| {}).unwrap();
        let path = fixtures().join(format!("expected/deep/llama-deep-50k__{dataset}.jsonl"));
        let want: Vec<serde_json::Value> =
            std::fs::read_to_string(&path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(got.len(), want.len(), "{dataset}: pairs");
        let (mut ours, mut theirs) = (0f64, 0f64);
        for ((w, l), e) in got.iter().zip(&want) {
            for (value, side) in [(*w, "chosen"), (*l, "rejected")] {
                let f64_ = e[format!("logp_{side}")].as_f64().unwrap();
                ours = ours.max((value as f64 - f64_).abs());
                theirs = theirs.max((e[format!("logp_{side}_f32")].as_f64().unwrap() - f64_).abs());
            }
        }
        eprintln!("{dataset}: prefopt vs f64 {ours:.2e}, transformers-f32 vs f64 {theirs:.2e}");
        assert!(ours <= 2.0 * theirs.max(5e-6), "{dataset}: prefopt {ours:e}, transformers-f32 {theirs:e}");
    }
}
