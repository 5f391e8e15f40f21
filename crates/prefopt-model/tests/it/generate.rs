//! Generation: left-padded batches and the KV cache against full recomputes, sampling
//! determinism, greedy decoding, sequence log-probs, stop tokens, batching independence,
//! and greedy tokens against `transformers` (fixtures/expected/generate, made by
//! scripts/make_generate_fixtures.py).

use candle_core::Tensor;
use prefopt_model::{generate, sample_rng, Generated, KvCache, Llama, Mode, Precision, SamplingParams};
use rand_chacha::ChaCha8Rng;

use crate::util::{cached_logits, device, fixtures, network};

fn model(name: &str) -> Llama {
    network(name, Mode::Infer)
}

/// Deterministic pseudo-random token ids below 480 (the fixture tokenizers' ordinary ids).
fn ids(len: usize, salt: u64) -> Vec<u32> {
    let mut x = salt.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) % 480) as u32
        })
        .collect()
}

/// Logits (T, V) of one unpadded sequence, recomputed from scratch.
fn full_logits(model: &Llama, seq: &[u32]) -> Vec<Vec<f32>> {
    let input = Tensor::new(seq, &device()).unwrap().unsqueeze(0).unwrap();
    model.forward(&input).unwrap().squeeze(0).unwrap().to_vec2().unwrap()
}

fn log_softmax(row: &[f32], token: u32) -> f64 {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let z: f64 = row.iter().map(|&l| (l as f64 - m).exp()).sum();
    row[token as usize] as f64 - m - z.ln()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn rngs(seed: u64, n: usize) -> Vec<ChaCha8Rng> {
    (0..n as u64).map(|s| sample_rng(seed, s)).collect()
}

fn params(temperature: f64, max_new_tokens: usize) -> SamplingParams {
    SamplingParams { temperature, max_new_tokens, ..Default::default() }
}

#[test]
fn left_padded_batch_rows_equal_each_row_alone_in_prefill_and_cached_steps() {
    for name in ["llama-tied", "qwen2-untied", "mistral"] {
        let model = model(name);
        let prompts = [ids(3, 1), ids(11, 2), ids(1, 3), ids(7, 4)];
        let steps: Vec<Vec<u32>> = (0..4).map(|k| ids(prompts.len(), 10 + k)).collect(); // fed tokens
        let t = prompts.iter().map(Vec::len).max().unwrap();
        let pads: Vec<usize> = prompts.iter().map(|p| t - p.len()).collect();
        let padded: Vec<u32> =
            prompts.iter().flat_map(|p| std::iter::repeat_n(0, t - p.len()).chain(p.iter().copied())).collect();
        let mut cache = KvCache::default();
        let input = Tensor::from_vec(padded, (prompts.len(), t), &device()).unwrap();
        let prefill: Vec<Vec<Vec<f32>>> = cached_logits(&model, &input, &pads, &mut cache).unwrap().to_vec3().unwrap();
        let mut decoded: Vec<Vec<Vec<f32>>> = Vec::new(); // [step][row] -> (V,)
        for step in &steps {
            let input = Tensor::new(step.as_slice(), &device()).unwrap().unsqueeze(1).unwrap();
            let out = cached_logits(&model, &input, &pads, &mut cache).unwrap().squeeze(1).unwrap();
            decoded.push(out.to_vec2().unwrap());
        }
        assert_eq!(cache.len(), t + steps.len());
        for (b, prompt) in prompts.iter().enumerate() {
            let mut seq = prompt.clone();
            seq.extend(steps.iter().map(|s| s[b]));
            let want = full_logits(&model, &seq);
            for (i, row) in want.iter().enumerate() {
                let got = if i < prompt.len() { &prefill[b][pads[b] + i] } else { &decoded[i - prompt.len()][b] };
                let diff = max_diff(got, row);
                assert!(diff < 1e-5, "{name}: row {b} position {i}: padded vs alone max diff {diff}");
            }
        }
    }
}

#[test]
fn zero_padding_equals_no_padding() {
    let model = model("qwen2-tied");
    let seq = ids(9, 5);
    let input = Tensor::new(seq.as_slice(), &device()).unwrap().unsqueeze(0).unwrap();
    let (mut a, mut b) = (KvCache::default(), KvCache::default());
    let x: Vec<f32> = cached_logits(&model, &input, &[0], &mut a).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let y: Vec<f32> = cached_logits(&model, &input, &[], &mut b).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(x, y);
    let err = cached_logits(&model, &input, &[0, 0], &mut a).unwrap_err().to_string();
    assert!(err.contains("2 pad lengths for a batch of 1"), "{err}");
}

/// Checks one generation against a full recompute of prompt + completion: the summed
/// log-softmax equals `logprob`, and greedy tokens are the argmax at every step.
fn check_against_recompute(model: &Llama, prompt: &[u32], g: &Generated, greedy: bool, what: &str) {
    let mut seq = prompt.to_vec();
    seq.extend(&g.tokens);
    let logits = full_logits(model, &seq);
    let mut logprob = 0.0;
    for (j, &tok) in g.tokens.iter().enumerate() {
        let row = &logits[prompt.len() + j - 1];
        logprob += log_softmax(row, tok);
        if greedy {
            let best = (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b });
            assert_eq!(tok as usize, best, "{what}: greedy token {j} is not the argmax of a full recompute");
        }
    }
    assert!((logprob - g.logprob).abs() < 1e-4, "{what}: logprob {} vs recomputed {logprob}", g.logprob);
}

#[test]
fn cached_sampling_logprobs_equal_a_full_recompute() {
    for name in ["llama-untied", "qwen2-tied", "mistral"] {
        let model = model(name);
        let prompts = vec![ids(4, 20), ids(13, 21), ids(2, 22)];
        let k = 3;
        for p in [
            params(1.0, 12),
            SamplingParams { temperature: 0.7, top_k: 20, top_p: 0.8, max_new_tokens: 12, ..Default::default() },
        ] {
            let out = generate(&model, &prompts, &p, &mut rngs(3, prompts.len() * k)).unwrap();
            assert_eq!(out.len(), prompts.len() * k);
            for (s, g) in out.iter().enumerate() {
                assert_eq!(g.tokens.len(), 12);
                assert!(!g.stopped);
                check_against_recompute(&model, &prompts[s / k], g, false, &format!("{name} {p:?} sequence {s}"));
            }
        }
    }
}

#[test]
fn greedy_is_the_argmax_of_a_full_recompute_step_by_step() {
    for name in ["llama-tied", "qwen2-untied"] {
        let model = model(name);
        let prompts = vec![ids(5, 30), ids(1, 31), ids(9, 32)];
        let out = generate(&model, &prompts, &params(0.0, 16), &mut rngs(0, 3)).unwrap();
        for (i, g) in out.iter().enumerate() {
            assert_eq!(g.tokens.len(), 16);
            check_against_recompute(&model, &prompts[i], g, true, &format!("{name} prompt {i}"));
        }
    }
}

#[test]
fn same_seed_gives_identical_samples_and_another_seed_different_ones() {
    let model = model("qwen2-tied");
    let prompts = vec![ids(6, 40), ids(3, 41)];
    let run = |seed| generate(&model, &prompts, &params(1.0, 20), &mut rngs(seed, 4)).unwrap();
    let a = run(11);
    assert_eq!(a, run(11));
    let b = run(12);
    assert_ne!(a.iter().map(|g| &g.tokens).collect::<Vec<_>>(), b.iter().map(|g| &g.tokens).collect::<Vec<_>>());
    // The two samples of one prompt differ too (each has its own stream).
    assert_ne!(a[0].tokens, a[1].tokens);
}

#[test]
fn a_sequence_ends_at_its_first_stop_token_and_the_others_go_on() {
    let model = model("llama-tied");
    let prompts = vec![ids(5, 50), ids(8, 51)];
    let free = generate(&model, &prompts, &params(0.0, 10), &mut rngs(0, 2)).unwrap();
    // Stop on prompt 0's fourth greedy token (where it first occurs), which prompt 1 does not produce.
    let stop = free[0].tokens[3];
    let first = free[0].tokens.iter().position(|&t| t == stop).unwrap();
    assert!(!free[1].tokens.contains(&stop), "pick other fixture prompts");
    let p = SamplingParams { stop_ids: vec![999, stop], ..params(0.0, 10) };
    let out = generate(&model, &prompts, &p, &mut rngs(0, 2)).unwrap();
    assert!(out[0].stopped);
    assert_eq!(out[0].tokens, free[0].tokens[..=first].to_vec(), "nothing follows the stop token");
    assert!(!out[1].stopped);
    assert_eq!(out[1].tokens, free[1].tokens);
    check_against_recompute(&model, &prompts[0], &out[0], true, "stopped sequence");
    // The greedy first token as the stop id: a one-token completion.
    let p = SamplingParams { stop_ids: vec![free[0].tokens[0]], ..params(0.0, 10) };
    let out = generate(&model, &prompts[..1], &p, &mut rngs(0, 1)).unwrap();
    assert_eq!(out[0].tokens, vec![free[0].tokens[0]]);
    assert!(out[0].stopped);
}

#[test]
fn samples_do_not_depend_on_what_else_is_in_the_batch() {
    let model = model("mistral");
    let prompts = vec![ids(3, 60), ids(10, 61), ids(6, 62), ids(1, 63)];
    let k = 2;
    let p = SamplingParams { temperature: 0.9, top_p: 0.95, ..params(1.0, 15) };
    let together = generate(&model, &prompts, &p, &mut rngs(5, prompts.len() * k)).unwrap();
    for (i, prompt) in prompts.iter().enumerate() {
        let mut own: Vec<ChaCha8Rng> = (0..k as u64).map(|j| sample_rng(5, i as u64 * k as u64 + j)).collect();
        let alone = generate(&model, std::slice::from_ref(prompt), &p, &mut own).unwrap();
        for j in 0..k {
            let (a, b) = (&alone[j], &together[i * k + j]);
            assert_eq!(a.tokens, b.tokens, "prompt {i} sample {j}");
            // Bitwise equality would need batch-invariant kernels: candle's matmul takes a
            // gemv path for one row, and the sum over padded keys regroups its SIMD lanes.
            let tol = 1e-6 * a.logprob.abs();
            assert!((a.logprob - b.logprob).abs() <= tol, "prompt {i} sample {j}: {} vs {}", a.logprob, b.logprob);
        }
    }
}

#[test]
fn the_context_limit_ends_a_sequence_and_a_full_prompt_is_an_error() {
    let model = model("qwen2-tied"); // max_position_embeddings 256
    let prompts = vec![ids(250, 70), ids(3, 71)];
    let out = generate(&model, &prompts, &params(1.0, 10), &mut rngs(0, 2)).unwrap();
    assert_eq!(out[0].tokens.len(), 6);
    assert!(!out[0].stopped);
    assert_eq!(out[1].tokens.len(), 10);
    let err = generate(&model, &[ids(256, 72)], &params(1.0, 10), &mut rngs(0, 1)).unwrap_err().to_string();
    assert!(err.contains("prompt 0 has 256 tokens") && err.contains("max_position_embeddings (256)"), "{err}");
    let err = generate(&model, &[vec![]], &params(1.0, 10), &mut rngs(0, 1)).unwrap_err().to_string();
    assert!(err.contains("prompt 0 has no tokens"), "{err}");
    let err = generate(&model, &[ids(3, 1)], &params(1.0, 0), &mut rngs(0, 1)).unwrap_err().to_string();
    assert!(err.contains("max_new_tokens"), "{err}");
}

#[test]
fn greedy_tokens_match_transformers_with_all_prompts_in_one_padded_batch() {
    for name in ["llama-untied", "llama-tied", "qwen2-tied", "qwen2-untied", "mistral"] {
        let path = fixtures().join(format!("expected/generate/{name}.json"));
        let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let get = |key: &str| want[key].clone();
        let prompts: Vec<Vec<u32>> = serde_json::from_value(get("prompts")).unwrap();
        let tokens: Vec<Vec<u32>> = serde_json::from_value(get("tokens")).unwrap();
        let stopped: Vec<bool> = serde_json::from_value(get("stopped")).unwrap();
        let logprob: Vec<f64> = serde_json::from_value(get("logprob")).unwrap();
        let p = SamplingParams {
            stop_ids: serde_json::from_value(get("stop_ids")).unwrap(),
            ..params(0.0, get("max_new_tokens").as_u64().unwrap() as usize)
        };
        let model = model(name);
        let out = generate(&model, &prompts, &p, &mut rngs(0, prompts.len())).unwrap();
        for (i, g) in out.iter().enumerate() {
            assert_eq!(g.tokens, tokens[i], "{name} prompt {i}: tokens differ from transformers");
            assert_eq!(g.stopped, stopped[i], "{name} prompt {i}");
            assert!(
                (g.logprob - logprob[i]).abs() < 1e-4,
                "{name} prompt {i}: logprob {} vs {}",
                g.logprob,
                logprob[i]
            );
        }
    }
}

#[test]
fn top_k_and_top_p_keep_what_transformers_warpers_keep() {
    let path = fixtures().join("expected/generate/warpers.json");
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let name = want["model"].as_str().unwrap();
    let model = model(name);
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("expected/generate/{name}.json"))).unwrap(),
    )
    .unwrap();
    let prompts: Vec<Vec<u32>> = serde_json::from_value(expected["prompts"].clone()).unwrap();
    let cases = want["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let prompt = &prompts[case["prompt"].as_u64().unwrap() as usize];
        let logits = full_logits(&model, prompt).pop().unwrap();
        let p = SamplingParams {
            temperature: case["temperature"].as_f64().unwrap(),
            top_k: case["top_k"].as_u64().unwrap() as usize,
            top_p: case["top_p"].as_f64().unwrap(),
            ..Default::default()
        };
        let mut got = prefopt_model::generate::sampling_distribution(&logits, &p);
        got.sort_by_key(|d| d.0);
        let tokens: Vec<u32> = serde_json::from_value(case["tokens"].clone()).unwrap();
        let probs: Vec<f64> = serde_json::from_value(case["probs"].clone()).unwrap();
        assert_eq!(got.iter().map(|d| d.0).collect::<Vec<_>>(), tokens, "{case}");
        for ((_, a), b) in got.iter().zip(&probs) {
            assert!((a - b).abs() < 1e-5, "{p:?}: probability {a} vs {b}");
        }
    }
}

#[test]
fn a_trainable_model_backpropagates_through_the_kv_cache() {
    // The cache concatenates (rather than writing in place) when keys carry gradients, so a
    // loss on a cached step reaches the earlier positions' key/value projections.
    let hf = crate::util::load("llama-untied");
    let model = hf.build(Mode::Train, Precision::F32).unwrap();
    let seq = ids(10, 80);
    let input = Tensor::new(seq.as_slice(), &device()).unwrap().unsqueeze(0).unwrap();
    let full = model.forward(&input).unwrap().narrow(1, 9, 1).unwrap().sqr().unwrap().sum_all().unwrap();
    let mut cache = KvCache::default();
    cached_logits(&model, &input.narrow(1, 0, 9).unwrap(), &[], &mut cache).unwrap();
    let step = cached_logits(&model, &input.narrow(1, 9, 1).unwrap(), &[], &mut cache).unwrap();
    let cached = step.sqr().unwrap().sum_all().unwrap();
    let (g_full, g_cached) = (full.backward().unwrap(), cached.backward().unwrap());
    for name in ["model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"] {
        let var = hf.params.get(name).unwrap();
        let a: Vec<f32> = g_full.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = g_cached.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.0 && max_diff(&a, &b) < 1e-4 * scale.max(1.0), "{name}: cached vs full gradient");
    }
}
