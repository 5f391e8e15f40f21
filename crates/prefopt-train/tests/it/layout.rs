//! Padding-free batches and shared prompts (`padding_free`, `share_prompt`) against the padded
//! layout: the same loss, metrics and gradients of a DPO step, to 1e-6 relative, with and
//! without gradient checkpointing, on models with and without q/k/v biases. (A few small
//! gradients, such as a k_proj bias's, are sums that cancel to ~1e-6 of their terms: f32
//! fixes them only to about 1e-6, as the padded step itself shows when its pairs come in
//! another order. Those get twice that noise floor.)

use prefopt_data::{HfTokenizer, TokenizeOptions};
use prefopt_model::HfModel;
use prefopt_train::dataset::PairDataset;
use prefopt_train::trainer::accumulate_step;
use prefopt_train::{score_pairs, BatchLayout, PreferenceObjective, TrainConfig};

use crate::util::{device, fixtures};

/// ||a - b|| / ||b||, the relative error of a gradient tensor as a whole.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let norm = |x: &mut dyn Iterator<Item = f64>| x.map(|v| v * v).sum::<f64>().sqrt();
    let diff = norm(&mut a.iter().zip(b).map(|(&x, &y)| x as f64 - y as f64));
    diff / norm(&mut b.iter().map(|&y| y as f64)).max(1e-30)
}

/// A parameter's name and its flattened gradient.
type NamedGrad = (String, Vec<f32>);

/// One DPO step's metrics and flattened gradients for `layout`'s keys, the pairs in order or
/// `reversed`.
fn step(
    model: &str,
    data: &str,
    layout: (bool, bool),
    checkpointing: bool,
    reversed: bool,
) -> (Vec<(String, f64)>, Vec<NamedGrad>) {
    let dir = fixtures().join("models").join(model);
    let hf = HfModel::load(&dir, &device()).unwrap();
    let tok = HfTokenizer::from_dir(&dir).unwrap();
    let opts = TokenizeOptions { max_length: Some(512), ..TokenizeOptions::default() };
    let data = PairDataset::load(&fixtures().join(format!("data/{data}.jsonl")), &tok, &opts).unwrap();
    let cfg = TrainConfig {
        batch_size: data.len(),
        gradient_checkpointing: checkpointing,
        padding_free: layout.0,
        share_prompt: layout.1,
        ..TrainConfig::default()
    };
    let reference = hf.build(prefopt_model::Mode::Infer, prefopt_model::Precision::F32).unwrap();
    let pairs: Vec<_> = data.pairs.iter().collect();
    let refs = score_pairs(&reference, &pairs, 4, cfg.batch_layout(tok.padding_id()), |_| {}).unwrap();
    let n = data.len();
    let mut objective = PreferenceObjective::new(&cfg, data, Some(refs), tok.padding_id());
    let policy = hf.build(prefopt_model::Mode::Train, prefopt_model::Precision::F32).unwrap();
    let mut all: Vec<usize> = (0..n).collect();
    if reversed {
        all.reverse();
    }
    let acc = accumulate_step(&mut objective, &policy, &hf.params, &all, cfg.batch_size, 7).unwrap();
    let names = hf.params.iter().map(|(name, _)| name.clone());
    let grads = names.zip(&acc.grads).map(|(n, g)| (n, g.flatten_all().unwrap().to_vec1().unwrap())).collect();
    (acc.metrics(), grads)
}

#[test]
fn packed_and_shared_prompt_steps_equal_the_padded_step() {
    for (model, data) in [("llama-tied", "plain"), ("qwen2-untied", "chat"), ("mistral", "chat")] {
        for checkpointing in [false, true] {
            let (want_metrics, want_grads) = step(model, data, (false, false), checkpointing, false);
            let (_, reordered) = step(model, data, (false, false), checkpointing, true);
            for layout in [(true, false), (false, true), (true, true)] {
                let what =
                    format!("{model} {data} checkpointing {checkpointing} (padding_free, share_prompt) {layout:?}");
                let (metrics, grads) = step(model, data, layout, checkpointing, false);
                assert_eq!(metrics.len(), want_metrics.len(), "{what}: metrics");
                for ((name, got), (want_name, want)) in metrics.iter().zip(&want_metrics) {
                    assert_eq!(name, want_name);
                    // 1e-6 relative, or 1e-8 absolute for a value near zero (the random
                    // fixtures' mean logits are ~1e-3, a sum of terms that cancel).
                    let err = (got - want).abs();
                    assert!(err <= 1e-6 * want.abs() + 1e-8, "{what}: {name} {got} vs padded {want} ({err:.1e})");
                }
                assert_eq!(grads.len(), want_grads.len());
                for (((name, g), (_, w)), (_, r)) in grads.iter().zip(&want_grads).zip(&reordered) {
                    let (err, floor) = (rel(g, w), rel(r, w));
                    assert!(
                        err < 1e-6f64.max(2.0 * floor),
                        "{what}: the gradient of {name} differs by {err:.1e} relative (reordered padded: {floor:.1e})"
                    );
                }
            }
        }
    }
}

#[test]
fn pairs_with_different_prompt_tokens_keep_two_prompts() {
    use prefopt_data::TokenizedSequence;
    let c = TokenizedSequence::new(vec![1, 2, 3, 4, 5], 3);
    let r = TokenizedSequence::new(vec![1, 2, 9, 6], 3); // another prompt: no sharing
    let s = TokenizedSequence::new(vec![1, 2, 3, 7], 3); // the same prompt as c
    let layout = BatchLayout { pad_id: 0, padding_free: true, share_prompt: true };
    let shared = prefopt_train::SequenceBatch::pairs(&[&c], &[&s], layout, &device()).unwrap();
    assert_eq!((shared.forward_tokens, shared.spans.len(), shared.num_tokens), (6, 1, 9));
    let separate = prefopt_train::SequenceBatch::pairs(&[&c], &[&r], layout, &device()).unwrap();
    assert_eq!((separate.forward_tokens, separate.spans.len()), (9, 2));
    let padded = prefopt_train::SequenceBatch::pairs(
        &[&c, &c],
        &[&s, &r],
        BatchLayout { padding_free: false, ..layout },
        &device(),
    )
    .unwrap();
    // Two pairs, each in a row as wide as the widest (9 tokens: the unshared one).
    assert_eq!(padded.forward_tokens, 18);
}
