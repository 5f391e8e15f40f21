//! Fuzzing the model loaders: `config.json` with any value in any size field, and a
//! safetensors file with any header (dtypes, shapes, offsets, lengths) and any data, load or
//! fail with an error, never a panic or an allocation beyond the file. 1,500 + 1,000 cases.

use candle_core::Device;
use prefopt_model::{HfModel, LlamaConfig};
use proptest::prelude::*;
use serde_json::{json, Value};

use crate::util::fixtures;

fn base_config() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("models/qwen2-tied/config.json")).unwrap()).unwrap()
}

/// Values a size field might hold in a broken or hostile file.
fn size_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0u64..70).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        Just(Value::Null),
        Just(json!("64")),
        Just(json!([64])),
    ]
}

const SIZE_KEYS: [&str; 9] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rope_theta",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]
    #[test]
    fn any_size_fields_parse_or_fail_naming_the_file(edits in proptest::collection::vec((0..SIZE_KEYS.len(), size_value()), 1..5)) {
        let mut raw = base_config();
        for (k, v) in edits {
            raw[SIZE_KEYS[k]] = v;
        }
        let path = std::path::Path::new("fuzz/config.json");
        match LlamaConfig::from_json(&raw, path) {
            // An accepted config's parameter count fits in memory, so listing its shapes is safe.
            Ok(cfg) => {
                prop_assert!(cfg.num_parameters().is_some());
                let _ = prefopt_model::parameter_shapes(&cfg);
            }
            Err(e) => prop_assert!(e.to_string().contains("fuzz/config.json"), "{e}"),
        }
    }
}

fn tensor_entry() -> impl Strategy<Value = Value> {
    let dtype = proptest::sample::select(vec!["F32", "F16", "BF16", "I64", "U8", "F64", "Q4", ""]);
    let dim = prop_oneof![0usize..80, Just(1usize << 40), any::<usize>()];
    (dtype, proptest::collection::vec(dim, 0..3), any::<u32>(), any::<u32>())
        .prop_map(|(d, shape, a, b)| json!({"dtype": d, "shape": shape, "data_offsets": [a % 5000, b % 5000]}))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]
    #[test]
    fn any_safetensors_header_loads_or_fails(
        entries in proptest::collection::vec((0usize..4, tensor_entry()), 0..4),
        declared in prop_oneof![Just(None), any::<u64>().prop_map(Some)],
        tail in proptest::collection::vec(any::<u8>(), 0..3000),
    ) {
        let names = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight", "x"];
        let header: serde_json::Map<String, Value> =
            entries.into_iter().map(|(i, e)| (names[i].to_string(), e)).collect();
        let header = Value::Object(header).to_string().into_bytes();
        let mut bytes = declared.unwrap_or(header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&tail);
        let dir = tempfile::tempdir().unwrap();
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(fixtures().join("models/qwen2-tied").join(f), dir.path().join(f)).unwrap();
        }
        std::fs::write(dir.path().join("model.safetensors"), &bytes).unwrap();
        let _ = HfModel::load(dir.path(), &Device::Cpu);
    }
}
