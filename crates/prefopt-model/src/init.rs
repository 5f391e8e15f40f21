//! Fresh weights for a config (`prefopt init`): the starting point of a model trained from
//! scratch, as transformers' `from_config` initializes a Llama: linear and embedding weights
//! drawn from N(0, initializer_range^2), norm weights 1, biases 0.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::LlamaConfig;
use crate::error::Result;
use crate::llama::parameter_shapes;
use crate::params::Params;

/// Every parameter of `cfg`, a pure function of `seed` (draws in parameter-name order).
pub fn init_params(cfg: &LlamaConfig, std: f64, seed: u64, device: &Device) -> Result<Params> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut vars = BTreeMap::new();
    let mut shapes = parameter_shapes(cfg);
    shapes.sort();
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| (std * standard_normal(&mut rng)) as f32).collect()
        };
        vars.insert(name, Var::from_tensor(&Tensor::from_vec(values, shape, device)?)?);
    }
    Ok(Params::new(vars))
}

/// Box-Muller: one N(0, 1) draw from two uniforms.
pub(crate) fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>(); // in (0, 1], so ln is finite
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> LlamaConfig {
        let raw = serde_json::json!({
            "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 40, "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true,
            "max_position_embeddings": 64
        });
        LlamaConfig::from_json(&raw, std::path::Path::new("config.json")).unwrap()
    }

    #[test]
    fn same_seed_same_weights_and_the_stated_distribution() {
        let cfg = tiny();
        let a = init_params(&cfg, 0.02, 7, &Device::Cpu).unwrap();
        let b = init_params(&cfg, 0.02, 7, &Device::Cpu).unwrap();
        let c = init_params(&cfg, 0.02, 8, &Device::Cpu).unwrap();
        let flat = |p: &Params, name: &str| p.get(name).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let emb = "model.embed_tokens.weight";
        assert_eq!(flat(&a, emb), flat(&b, emb));
        assert_ne!(flat(&a, emb), flat(&c, emb));
        assert!(flat(&a, "model.norm.weight").iter().all(|&x| x == 1.0));
        let w = flat(&a, emb);
        let mean = w.iter().map(|&x| x as f64).sum::<f64>() / w.len() as f64;
        let sd = (w.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        assert!(mean.abs() < 0.003 && (sd - 0.02).abs() < 0.002, "mean {mean} sd {sd}");
        assert_eq!(a.len(), parameter_shapes(&cfg).len());
    }
}
