//! LoRA adapters in the model: a merged model equals base + adapter, a weighted stack
//! equals the merge of its weighted sum, a fresh adapter leaves the base unchanged, and every
//! kind of bad adapter folder is refused with an error that says what is wrong.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use prefopt_model::lora::{merge, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use prefopt_model::{AdapterUse, Llama, LoraAdapter, LoraConfig, Mode, Precision, TargetModules};

use crate::util::{device, fixtures, load};

fn adapter_dir() -> PathBuf {
    fixtures().join("adapters/llama-untied-lora")
}

fn ids() -> Tensor {
    Tensor::new(&[[1u32, 17, 204, 33, 9, 402, 77, 5, 300, 12]], &device()).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

#[test]
fn a_merged_model_equals_base_plus_adapter_and_a_stack_equals_its_weighted_merge() {
    let hf = load("llama-untied");
    let adapter = LoraAdapter::load(&adapter_dir(), &hf.config, &device()).unwrap();
    let uses = [AdapterUse { adapter: &adapter, coefficient: 1.0, trainable: false }];
    let with_adapter = Llama::with_adapters(&hf.config, &hf.params, Mode::Infer, Precision::F32, &uses).unwrap();
    let merged =
        Llama::new(&hf.config, &merge(&hf.params, &[(&adapter, 1.0)]).unwrap(), Mode::Infer, Precision::F32).unwrap();
    let (a, b) = (with_adapter.forward(&ids()).unwrap(), merged.forward(&ids()).unwrap());
    let base = hf.build(Mode::Infer, Precision::F32).unwrap().forward(&ids()).unwrap();
    assert!(max_abs_diff(&a, &base) > 0.1, "the adapter changes nothing");
    assert!(max_abs_diff(&a, &b) < 1e-4, "merged vs adapter: {}", max_abs_diff(&a, &b));

    // Two adapters with coefficients (an APO iterate's stack) = the merge of the weighted sum.
    let other = LoraAdapter::init(&hf.config, adapter.config.clone(), 3, &device()).unwrap();
    let other = LoraAdapter { params: scaled_b(&other, &adapter), ..other };
    let stack = [
        AdapterUse { adapter: &adapter, coefficient: 1.3, trainable: false },
        AdapterUse { adapter: &other, coefficient: -0.3, trainable: false },
    ];
    let stacked = Llama::with_adapters(&hf.config, &hf.params, Mode::Infer, Precision::F32, &stack).unwrap();
    let folded = merge(&hf.params, &[(&adapter, 1.3), (&other, -0.3)]).unwrap();
    let folded = Llama::new(&hf.config, &folded, Mode::Infer, Precision::F32).unwrap();
    let (s, f) = (stacked.forward(&ids()).unwrap(), folded.forward(&ids()).unwrap());
    assert!(max_abs_diff(&s, &f) < 1e-4, "stack vs merge: {}", max_abs_diff(&s, &f));
}

/// `init`'s A with the fixture adapter's B (so the second adapter is not zero).
fn scaled_b(fresh: &LoraAdapter, like: &LoraAdapter) -> prefopt_model::Params {
    let vars = fresh
        .params
        .iter()
        .map(|(n, v)| {
            let t = if n.contains("lora_B") {
                like.params.get(n).unwrap().as_tensor().copy().unwrap()
            } else {
                v.as_tensor().clone()
            };
            (n.clone(), candle_core::Var::from_tensor(&t).unwrap())
        })
        .collect();
    prefopt_model::Params::new(vars)
}

#[test]
fn a_fresh_adapter_starts_at_the_base_and_rslora_scales_by_the_root_of_r() {
    let hf = load("qwen2-tied");
    let config = LoraConfig {
        r: 16,
        alpha: 32.0,
        targets: TargetModules::Preset("all-linear".into()).resolve().unwrap(),
        use_rslora: false,
        dropout: 0.0,
    };
    assert_eq!(config.scale(), 2.0);
    assert_eq!(LoraConfig { use_rslora: true, ..config.clone() }.scale(), 8.0);
    let fresh = LoraAdapter::init(&hf.config, config, 0, &device()).unwrap();
    let uses = [AdapterUse { adapter: &fresh, coefficient: 1.0, trainable: true }];
    let adapted = Llama::with_adapters(&hf.config, &hf.params, Mode::Train, Precision::F32, &uses).unwrap();
    let base = hf.build(Mode::Infer, Precision::F32).unwrap();
    let d = max_abs_diff(&adapted.forward(&ids()).unwrap(), &base.forward(&ids()).unwrap());
    assert!(d < 1e-5, "a fresh adapter moved the logits by {d}");
    // A is Kaiming-uniform: within +-1/sqrt(in), and not all zero.
    let a = fresh.params.get("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight").unwrap().as_tensor();
    let bound = 1.0 / (hf.config.intermediate_size as f32).sqrt();
    let max: f32 = a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
    assert!(max <= bound && max > 0.5 * bound, "A's largest entry {max}, bound {bound}");
}

/// A copy of the fixture adapter in a temp folder, with its config edited by `edit`.
fn edited_adapter(tmp: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = tmp.join("adapter");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(adapter_dir().join(ADAPTER_WEIGHTS), dir.join(ADAPTER_WEIGHTS)).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter_dir().join(ADAPTER_CONFIG)).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dir.join(ADAPTER_CONFIG), serde_json::to_string(&config).unwrap()).unwrap();
    dir
}

fn load_error(dir: &Path) -> String {
    let hf = load("llama-untied");
    match LoraAdapter::load(dir, &hf.config, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_adapter_folders_are_refused_with_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let case = |name: &str, edit: &dyn Fn(&mut serde_json::Value), expect: &[&str]| {
        let dir = edited_adapter(&tmp.path().join(name), |c| edit(c));
        let message = load_error(&dir);
        for e in expect {
            assert!(message.contains(e), "{name}: `{message}` lacks `{e}`");
        }
    };
    // An adapter for another base: r 8 in the config, 4 in the tensors.
    case("shape", &|c| c["r"] = 8.into(), &["model.layers.0.self_attn.q_proj.lora_A.weight", "[4, 64]", "[8, 64]"]);
    case(
        "unknown-target",
        &|c| c["target_modules"] = serde_json::json!(["q_proj", "lm_head", "c_attn"]),
        &["`lm_head`", "`c_attn`", "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"],
    );
    case("r0", &|c| c["r"] = 0.into(), &["r must be at least 1", ADAPTER_CONFIG]);
    case("dora", &|c| c["use_dora"] = true.into(), &["DoRA", "not supported"]);
    case("ia3", &|c| c["peft_type"] = "IA3".into(), &["peft_type `IA3`", "not supported"]);
    case("bias", &|c| c["bias"] = "all".into(), &["bias", "not supported"]);
    case("lora-bias", &|c| c["lora_bias"] = true.into(), &["lora_bias", "not supported"]);
    case("layers", &|c| c["layers_to_transform"] = serde_json::json!([0]), &["layers_to_transform", "not supported"]);
    case("pattern", &|c| c["rank_pattern"] = serde_json::json!({"q_proj": 8}), &["rank_pattern", "not supported"]);

    // Fewer targets in the config than tensors in the file: the extra tensors are named.
    case(
        "extra",
        &|c| c["target_modules"] = serde_json::json!(["q_proj"]),
        &["tensor(s) that no targeted module", "lora_"],
    );

    let missing = tmp.path().join("no-config");
    std::fs::create_dir_all(&missing).unwrap();
    std::fs::copy(adapter_dir().join(ADAPTER_WEIGHTS), missing.join(ADAPTER_WEIGHTS)).unwrap();
    let message = load_error(&missing);
    assert!(message.contains("no adapter_config.json") && message.contains("not a PEFT adapter folder"), "{message}");

    let no_weights = edited_adapter(&tmp.path().join("no-weights"), |_| {});
    std::fs::remove_file(no_weights.join(ADAPTER_WEIGHTS)).unwrap();
    assert!(load_error(&no_weights).contains("no adapter_model.safetensors"));

    // An adapter for a deeper model lacks nothing here, but one for a shallower one would:
    // the deep fixture (24 layers) finds layer 2's tensors missing in a 2-layer adapter.
    let deep = load("llama-deep-50k");
    let err = LoraAdapter::load(&adapter_dir(), &deep.config, &Device::Cpu)
        .err()
        .expect("loaded on another base")
        .to_string();
    assert!(err.contains("lora_A.weight") && (err.contains("missing") || err.contains("shape")), "{err}");
}

#[test]
fn every_adapter_parameter_gets_a_gradient_and_no_base_weight_does() {
    let hf = load("llama-untied");
    let adapter = LoraAdapter::load(&adapter_dir(), &hf.config, &device()).unwrap();
    let adapter = LoraAdapter { config: LoraConfig { dropout: 0.2, ..adapter.config.clone() }, ..adapter };
    let uses = [AdapterUse { adapter: &adapter, coefficient: 1.0, trainable: true }];
    let model = Llama::with_adapters(&hf.config, &hf.params, Mode::Frozen, Precision::F32, &uses).unwrap();
    let input = ids().narrow(1, 0, 9).unwrap();
    let targets: Vec<u32> = ids().squeeze(0).unwrap().to_vec1::<u32>().unwrap()[1..].to_vec();
    let mut per_mode: Vec<Vec<Tensor>> = Vec::new();
    for checkpointing in [false, true] {
        let dropout = prefopt_model::Dropout { seed: 7, sequences: vec![0] };
        let (h, ckpt) = model.hidden_states_for_training(&input, &[], checkpointing, Some(dropout)).unwrap();
        let loss = model.token_logps(&h.squeeze(0).unwrap(), &targets).unwrap().sum_all().unwrap();
        let mut grads = loss.backward().unwrap();
        if let Some(ckpt) = &ckpt {
            grads = model.backward_checkpointed(ckpt, grads).unwrap();
        }
        for (name, var) in adapter.params.iter() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("checkpointing {checkpointing}: no gradient for {name}"));
            let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(norm > 0.0, "checkpointing {checkpointing}: zero gradient for {name}");
        }
        for (name, var) in hf.params.iter() {
            assert!(
                grads.get(var.as_tensor()).is_none(),
                "checkpointing {checkpointing}: the frozen base's {name} has a gradient"
            );
        }
        per_mode.push(adapter.params.iter().map(|(_, v)| grads.get(v.as_tensor()).unwrap().clone()).collect());
    }
    // The recomputed blocks draw the same dropout masks: the same gradients.
    for (plain, checkpointed) in per_mode[0].iter().zip(&per_mode[1]) {
        let scale: f32 = plain.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        assert!(max_abs_diff(plain, checkpointed) <= 1e-6 * scale, "checkpointed dropout gradients differ");
    }
}
