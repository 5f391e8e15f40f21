//! The model against `transformers` on the committed fixtures (see fixtures/README.md),
//! plus gradients, the KV cache, save/load round trips and bad-input errors.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use prefopt_model::{HfModel, Mode, ModelError, Precision};

use crate::util::{cached_logits, device, fixtures, load};

const MODELS: [&str; 5] = ["llama-untied", "llama-tied", "qwen2-tied", "qwen2-untied", "mistral"];

fn expected_logits(name: &str) -> (Vec<u32>, Vec<Vec<f32>>) {
    let path = fixtures().join(format!("expected/{name}__logits.json"));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ids = serde_json::from_value(json["input_ids"].clone()).unwrap();
    let logits = serde_json::from_value(json["logits"].clone()).unwrap();
    (ids, logits)
}

#[test]
fn logits_match_transformers_for_every_fixture_architecture() {
    for name in MODELS {
        let model = load(name).build(Mode::Infer, Precision::F32).unwrap();
        let (ids, want) = expected_logits(name);
        let input = Tensor::new(ids.as_slice(), &device()).unwrap().unsqueeze(0).unwrap();
        let got: Vec<Vec<f32>> = model.forward(&input).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        let max_diff = got.iter().flatten().zip(want.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max_diff < 1e-4, "{name}: max |logit diff| = {max_diff}");
    }
}

#[test]
fn every_parameter_receives_a_nonzero_gradient() {
    for name in ["llama-untied", "llama-tied", "qwen2-tied", "mistral"] {
        let hf = load(name);
        let model = hf.build(Mode::Train, Precision::F32).unwrap();
        let (ids, _) = expected_logits(name);
        let input = Tensor::new(ids.as_slice(), &device()).unwrap().unsqueeze(0).unwrap();
        // Any scalar that depends on every logit: the mean log-softmax of the next tokens.
        let logits = model.forward(&input).unwrap();
        let loss = candle_nn::ops::log_softmax(&logits, 2).unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        assert!(hf.params.len() > 10);
        for (pname, var) in hf.params.iter() {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {pname}"));
            let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient of {pname} has norm {norm}");
        }
    }
}

/// Gradient checkpointing recomputes each block in the backward pass: every parameter's
/// gradient equals the plain backward's, for a loss through the fused LM-head log-prob op.
#[test]
fn checkpointed_gradients_equal_the_plain_backward() {
    for name in ["llama-untied", "llama-tied", "qwen2-tied", "mistral"] {
        let hf = load(name);
        let (ids, _) = expected_logits(name);
        let input = Tensor::new(&ids[..ids.len() - 1], &device()).unwrap().unsqueeze(0).unwrap();
        let targets: Vec<u32> = ids[1..].to_vec();
        for precision in [Precision::F32, Precision::Bf16] {
            let model = hf.build(Mode::Train, precision).unwrap();
            let loss_of = |h: &Tensor| {
                let h = h.squeeze(0).unwrap();
                model.token_logps(&h, &targets).unwrap().sqr().unwrap().sum_all().unwrap()
            };
            let plain = loss_of(&model.hidden_states(&input, &[], None).unwrap()).backward().unwrap();
            let (h, ckpt) = model.hidden_states_for_training(&input, &[], true, None).unwrap();
            let ckpt = ckpt.expect("checkpointing keeps the blocks' inputs");
            let checkpointed = model.backward_checkpointed(&ckpt, loss_of(&h).backward().unwrap()).unwrap();
            for (pname, var) in hf.params.iter() {
                let a = plain.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {pname}"));
                let b = checkpointed
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no checkpointed gradient for {pname}"));
                let scale: f32 = a.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                let diff: f32 = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert!(
                    diff <= 1e-6 * scale.max(1e-12),
                    "{name} {precision:?}: {pname} differs by {diff} (scale {scale})"
                );
            }
        }
    }
}

#[test]
fn kv_cache_logits_equal_a_full_recompute() {
    for name in ["llama-tied", "qwen2-tied"] {
        let model = load(name).build(Mode::Infer, Precision::F32).unwrap();
        let (ids, _) = expected_logits(name);
        let input = Tensor::new(ids.as_slice(), &device()).unwrap().unsqueeze(0).unwrap();
        let full: Vec<Vec<f32>> = model.forward(&input).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        let mut cache = prefopt_model::KvCache::default();
        // A prompt chunk, then one token at a time.
        let mut got: Vec<Vec<f32>> = cached_logits(&model, &input.narrow(1, 0, 5).unwrap(), &[], &mut cache)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        for p in 5..ids.len() {
            let step = cached_logits(&model, &input.narrow(1, p, 1).unwrap(), &[], &mut cache).unwrap();
            got.extend(step.squeeze(0).unwrap().to_vec2::<f32>().unwrap());
        }
        assert_eq!(cache.len(), ids.len());
        let max_diff = got.iter().flatten().zip(full.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max_diff < 1e-5, "{name}: cached vs full max diff {max_diff}");
    }
}

#[test]
fn save_then_load_gives_bit_identical_weights_and_copies_tokenizer_files() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["llama-tied", "qwen2-untied"] {
        let hf = load(name);
        let out = tmp.path().join(name);
        hf.save(&out).unwrap();
        for file in
            ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
        {
            assert!(out.join(file).is_file(), "{name}: {file} not saved");
        }
        let again = HfModel::load(&out, &device()).unwrap();
        assert_eq!(hf.params.len(), again.params.len());
        for (pname, var) in hf.params.iter() {
            let a: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = again.params.get(pname).unwrap().as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name}: {pname} changed");
        }
        // Saving over an existing folder replaces it whole.
        hf.save(&out).unwrap();
        assert!(HfModel::load(&out, &device()).is_ok());
    }
    // The tied checkpoint stays tied: no lm_head tensor is written.
    let saved = std::fs::read(tmp.path().join("llama-tied/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&saved).unwrap();
    assert!(st.names().iter().all(|n| *n != "lm_head.weight"));
}

/// A copy of a fixture model that a test may break.
fn scratch_copy(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixtures().join("models").join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    (tmp, dir)
}

fn load_err(dir: &Path) -> String {
    match HfModel::load(dir, &device()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(path, serde_json::to_string(&json).unwrap()).unwrap();
}

/// transformers' input embedding has `padding_idx = pad_token_id`: the pad id's row gets no
/// gradient from the lookup, also where the pad id occurs in the data (SmolLM2's pad id is
/// its EOS). The other rows still do, and the values are unchanged.
#[test]
fn the_pad_tokens_embedding_row_gets_no_lookup_gradient_as_in_transformers() {
    let (_tmp, dir) = scratch_copy("llama-untied");
    let (ids, _) = expected_logits("llama-untied");
    let (pad, other) = (ids[3], ids[4]);
    let before = HfModel::load(&dir, &device()).unwrap().build(Mode::Infer, Precision::F32).unwrap();
    edit_config(&dir, |c| c["pad_token_id"] = pad.into());
    let hf = HfModel::load(&dir, &device()).unwrap();
    let model = hf.build(Mode::Train, Precision::F32).unwrap();
    let input = Tensor::new(ids.as_slice(), &device()).unwrap().unsqueeze(0).unwrap();
    let logits = model.forward(&input).unwrap();
    let same: f32 =
        (&logits - before.forward(&input).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    assert_eq!(same, 0.0, "the pad rule changed a value");
    let grads = logits.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let embed = grads.get(hf.params.get("model.embed_tokens.weight").unwrap().as_tensor()).unwrap();
    let row = |i: u32| -> f32 { embed.get(i as usize).unwrap().abs().unwrap().sum_all().unwrap().to_scalar().unwrap() };
    assert_eq!(row(pad), 0.0);
    assert!(row(other) > 0.0);
}

#[test]
fn missing_or_malformed_config_names_the_file() {
    let (_tmp, dir) = scratch_copy("qwen2-tied");
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("config.json") && msg.contains("not valid JSON"), "{msg}");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("config.json"), "{msg}");
    assert!(load_err(&dir.join("nope")).contains("model folder not found"));
}

#[test]
fn unsupported_model_type_and_activation_are_named() {
    let (_tmp, dir) = scratch_copy("qwen2-tied");
    edit_config(&dir, |c| c["model_type"] = "gpt2".into());
    let msg = load_err(&dir);
    assert!(msg.contains("unsupported model_type `gpt2`") && msg.contains("config.json"), "{msg}");
    edit_config(&dir, |c| {
        c["model_type"] = "qwen2".into();
        c["hidden_act"] = "gelu".into();
    });
    assert!(load_err(&dir).contains("unsupported hidden_act `gelu`"));
    edit_config(&dir, |c| {
        c["hidden_act"] = "silu".into();
        c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    });
    assert!(load_err(&dir).contains("unsupported rope_scaling type `yarn`"));
}

#[test]
fn missing_and_misshaped_tensors_are_named_with_both_shapes() {
    let (_tmp, dir) = scratch_copy("qwen2-tied");
    edit_config(&dir, |c| c["intermediate_size"] = 96.into());
    let msg = load_err(&dir);
    assert!(
        msg.contains("model.safetensors")
            && msg.contains("mlp.")
            && msg.contains("[128, 64]")
            && msg.contains("[96, 64]"),
        "{msg}"
    );
    edit_config(&dir, |c| {
        c["intermediate_size"] = 128.into();
        c["tie_word_embeddings"] = false.into();
    });
    let msg = load_err(&dir);
    assert!(msg.contains("tensor `lm_head.weight` is missing"), "{msg}");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert!(load_err(&dir).contains("no model.safetensors"));
}

#[test]
fn sharded_index_errors_name_the_shard() {
    let (_tmp, dir) = scratch_copy("llama-tied");
    edit_config(&dir, |c| c["num_hidden_layers"] = 3.into());
    let msg = load_err(&dir);
    assert!(msg.contains("model.layers.2") && msg.contains("missing"), "{msg}");
    matches!(HfModel::load(&dir, &device()), Err(ModelError::MissingTensor { .. }));
}

/// The parameter count the config check uses (before any shape exists) is the sum over the
/// tensors the model loads, for every fixture architecture (biases, tying, GQA); and a config
/// whose count cannot fit in memory is refused before anything is allocated.
#[test]
fn the_parameter_count_is_the_loaded_tensors_and_a_config_beyond_memory_is_refused() {
    for name in ["llama-untied", "llama-tied", "qwen2-tied", "qwen2-untied", "mistral", "llama-deep-50k"] {
        let (cfg, _) =
            prefopt_model::LlamaConfig::from_file(&fixtures().join(format!("models/{name}/config.json"))).unwrap();
        let from_shapes: u64 =
            prefopt_model::parameter_shapes(&cfg).iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum();
        assert_eq!(cfg.num_parameters(), Some(from_shapes), "{name}");
    }
    let dir = tempfile::tempdir().unwrap();
    let mut raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("models/llama-tied/config.json")).unwrap())
            .unwrap();
    raw["vocab_size"] = serde_json::json!(1_000_000_000_000u64);
    let path = dir.path().join("config.json");
    let err = prefopt_model::LlamaConfig::from_json(&raw, &path).unwrap_err().to_string();
    assert!(
        err.contains("config.json") && err.contains("GB as f32") && err.contains("vocab_size (1000000000000)"),
        "{err}"
    );
    raw["num_hidden_layers"] = serde_json::json!(u64::MAX / 2);
    let err = prefopt_model::LlamaConfig::from_json(&raw, &path).unwrap_err().to_string();
    assert!(err.contains("more parameters than a 64-bit count holds"), "{err}");
}
