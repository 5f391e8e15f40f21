//! APO's Nesterov step in parameter space (methods.md section 3):
//! `theta_t = theta_hat_t + alpha * (theta_hat_t - theta_hat_{t-1})`, elementwise over every
//! parameter, in f32. The momentum is taken between the two last TRAINED models; the paper's
//! ablation shows the alternative (`theta_hat_t - theta_t-1`) is worse. `alpha = 0` runs the
//! very same code and returns `theta_hat_t` bit for bit: that is plain iterative DPO.

use std::collections::BTreeMap;

use candle_core::Var;
use prefopt_model::Params;

/// Why two parameter sets cannot be extrapolated.
#[derive(Debug, thiserror::Error)]
pub enum ExtrapolateError {
    #[error("parameter `{0}` is in the newer model but not in the older one")]
    Missing(String),
    #[error("parameter `{name}` has shape {newer:?} in the newer model and {older:?} in the older one")]
    Shape { name: String, newer: Vec<usize>, older: Vec<usize> },
    #[error("the models have different parameter sets ({newer} vs {older} tensors)")]
    Count { newer: usize, older: usize },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// `newer + alpha * (newer - older)` for every parameter.
pub fn extrapolate(newer: &Params, older: &Params, alpha: f64) -> Result<Params, ExtrapolateError> {
    if newer.len() != older.len() {
        return Err(ExtrapolateError::Count { newer: newer.len(), older: older.len() });
    }
    let mut out = BTreeMap::new();
    for (name, var) in newer.iter() {
        let new = var.as_tensor();
        let old = older.get(name).ok_or_else(|| ExtrapolateError::Missing(name.clone()))?.as_tensor();
        if new.dims() != old.dims() {
            return Err(ExtrapolateError::Shape {
                name: name.clone(),
                newer: new.dims().to_vec(),
                older: old.dims().to_vec(),
            });
        }
        // (newer - older) * alpha + newer: with alpha = 0 the added term is exactly zero.
        let step = ((new - old)?.affine(alpha, 0.0)? + new)?;
        out.insert(name.clone(), Var::from_tensor(&step.detach())?);
    }
    Ok(Params::new(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn params(values: &[(&str, Vec<f32>)]) -> Params {
        Params::new(
            values
                .iter()
                .map(|(n, v)| {
                    (n.to_string(), Var::from_tensor(&Tensor::new(v.as_slice(), &Device::Cpu).unwrap()).unwrap())
                })
                .collect(),
        )
    }

    fn values(p: &Params, name: &str) -> Vec<f32> {
        p.get(name).unwrap().as_tensor().to_vec1().unwrap()
    }

    #[test]
    fn extrapolates_between_the_two_trained_models() {
        let newer = params(&[("a", vec![1.0, 2.0]), ("b", vec![-1.0])]);
        let older = params(&[("a", vec![0.5, 2.5]), ("b", vec![1.0])]);
        let out = extrapolate(&newer, &older, 0.3).unwrap();
        assert_eq!(values(&out, "a"), vec![1.0 + 0.3 * 0.5, 2.0 - 0.3 * 0.5]);
        assert_eq!(values(&out, "b"), vec![-1.0 - 0.3 * 2.0]);
    }

    #[test]
    fn alpha_zero_returns_the_trained_model_bit_for_bit() {
        let newer = params(&[("a", vec![1.0e-30, -3.25, 7.0])]);
        let older = params(&[("a", vec![5.0, 1.0e20, -2.0])]);
        let out = extrapolate(&newer, &older, 0.0).unwrap();
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        assert_eq!(bits(values(&out, "a")), bits(values(&newer, "a")));
    }

    #[test]
    fn mismatched_models_are_named() {
        let newer = params(&[("a", vec![1.0, 2.0])]);
        let err = |older: Params| extrapolate(&newer, &older, 0.3).err().expect("must fail").to_string();
        assert!(err(params(&[("b", vec![1.0, 2.0])])).contains("`a`"));
        let shape = err(params(&[("a", vec![1.0])]));
        assert!(shape.contains("[2]") && shape.contains("[1]"), "{shape}");
    }
}
