//! APO's Nesterov step in parameter space (methods.md section 3):
//! `theta_t = theta_hat_t + alpha * (theta_hat_t - theta_hat_{t-1})`, elementwise over every
//! parameter, in f32. The momentum is taken between the two last TRAINED models, as the paper
//! does; its ablation (one run each) finds the alternative (`theta_hat_t - theta_t-1`) "less
//! stable and generally lower", though not at every alpha. `alpha = 0` runs the very same
//! code and returns `theta_hat_t` bit for bit: that is plain iterative DPO.
//!
//! [`extrapolate_logps`] is the policy-space step itself, for any network, applied to the
//! reference log-probs of the next iteration's pairs (`extrapolation = "logprob"`):
//! `pi_t ∝ pi_hat_t (pi_hat_t / pi_hat_{t-1})^alpha`, so
//! `lp_ref(y) = (1 + alpha) lp_{pi_hat_t}(y) - alpha lp_{pi_hat_{t-1}}(y) - log Z'(x)`. The
//! normalizer `log Z'(x)` depends on the prompt alone and is dropped here: it cancels only in
//! losses that see the reference through `rho_w - rho_l` with equal weights (`sigmoid`, cDPO,
//! `robust`, `hinge`), not in `ipo`, `sppo`, `sppo_hard`, `nca_pair`, `dpop` or SPO's
//! safe-region term.
//!
//! [`extrapolate_stack`] is the parameter step for LoRA runs (our design; the paper trains
//! full weights): every iterate is the base plus a weighted stack of the adapters trained so
//! far, `W_0 + sum_k c_k D_k` (`D_k = scale_k B_k A_k`), and the step acts on the coefficients,
//! `c(theta_t) = (1 + alpha) c(theta_hat_t) - alpha c(theta_hat_{t-1})`. The effective weights
//! are linear in the coefficients, so this is the full-weight step exactly, where
//! extrapolating A and B separately is not (their product is bilinear).

use std::collections::BTreeMap;

use candle_core::Var;
use prefopt_model::{Params, StackEntry};

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

/// The extrapolated reference's log-probs from the two last trained models' ones:
/// `(1 + alpha) * newer - alpha * older`, per (chosen, rejected) pair, in f64.
pub fn extrapolate_logps(newer: &[(f32, f32)], older: &[(f32, f32)], alpha: f64) -> Vec<(f64, f64)> {
    let step = |n: f32, o: f32| (1.0 + alpha) * n as f64 - alpha * o as f64;
    newer.iter().zip(older).map(|(n, o)| (step(n.0, o.0), step(n.1, o.1))).collect()
}

/// The restart rule's signal on an iteration's pairs (prefopt's own design; the simulator's
/// `prefopt_sim::restart` states and tests the rule): with `u = lp(pi_hat_t) - lp(pi_{t-1})`
/// (the step the data asked for, the fitted reward over beta) and `m = lp(pi_hat_t) -
/// lp(pi_hat_{t-1})` (the momentum), `sum over pairs of (u_w - u_l)(m_w - m_l)`: the pairs are
/// draws from `pi_{t-1}`, so this estimates twice the simulator's covariance of u and m, and
/// the differences cancel each prompt's constant. Negative: the step came back against the
/// momentum, the extrapolation overshot. Arguments: (chosen, rejected) log-probs per pair
/// under `pi_hat_t`, `pi_{t-1}` (the reference) and `pi_hat_{t-1}`.
pub fn momentum_agreement(hat: &[(f32, f32)], reference: &[(f32, f32)], older: &[(f32, f32)]) -> f64 {
    let diff = |a: (f32, f32), b: (f32, f32)| (a.0 as f64 - b.0 as f64) - (a.1 as f64 - b.1 as f64);
    hat.iter().zip(reference).zip(older).map(|((&h, &r), &o)| diff(h, r) * diff(h, o)).sum()
}

/// The step on adapter stacks: `(1 + alpha) c_newer - alpha c_older` per adapter (the union
/// of both stacks, the newer's order first). Terms whose coefficient is exactly zero (an
/// adapter only the older stack has, at `alpha = 0`) are left out; they add nothing.
pub fn extrapolate_stack(newer: &[StackEntry], older: &[StackEntry], alpha: f64) -> Vec<StackEntry> {
    let coefficient = |stack: &[StackEntry], e: &StackEntry| {
        stack.iter().filter(|o| o.adapter == e.adapter).map(|o| o.coefficient).sum::<f64>()
    };
    let mut out: Vec<StackEntry> = Vec::new();
    for e in newer.iter().chain(older) {
        if out.iter().any(|o| o.adapter == e.adapter) {
            continue;
        }
        let c = (1.0 + alpha) * coefficient(newer, e) - alpha * coefficient(older, e);
        if c != 0.0 {
            out.push(StackEntry { adapter: e.adapter.clone(), coefficient: c });
        }
    }
    out
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
    fn logprob_extrapolation_is_the_normalized_policy_step() {
        // Two "trained policies" over three responses of one prompt, as log-probs.
        let newer = [0.5f64, 0.3, 0.2].map(f64::ln);
        let older = [0.2f64, 0.3, 0.5].map(f64::ln);
        let alpha = 0.3;
        let pairs = |v: [f64; 3]| [(v[0] as f32, v[1] as f32), (v[0] as f32, v[2] as f32)];
        let got = extrapolate_logps(&pairs(newer), &pairs(older), alpha);
        // pi ∝ newer * (newer / older)^alpha, normalized: its log-ratios are what a pairwise
        // loss sees, and they must equal the combined reference's.
        let w: Vec<f64> = (0..3).map(|i| newer[i] + alpha * (newer[i] - older[i])).collect();
        let z = w.iter().map(|x| x.exp()).sum::<f64>().ln();
        let pi: Vec<f64> = w.iter().map(|x| x - z).collect();
        for (k, j) in [(0, 1), (1, 2)] {
            let ratio = got[k].0 - got[k].1;
            assert!((ratio - (pi[0] - pi[j])).abs() < 1e-6, "pair {k}: {ratio} vs {}", pi[0] - pi[j]);
        }
        assert_eq!(got[0].0, 1.3 * (0.5f32.ln() as f64) - 0.3 * (0.2f32.ln() as f64));
        // alpha = 0 is the newer model's own log-probs.
        let same = extrapolate_logps(&pairs(newer), &pairs(older), 0.0);
        assert_eq!(same[1], (newer[0] as f32 as f64, newer[2] as f32 as f64));
    }

    #[test]
    fn a_stack_extrapolates_by_its_coefficients() {
        let e = |name: &str, c: f64| StackEntry { adapter: name.into(), coefficient: c };
        // pi_hat_1 = D1; pi_1 = (1 + a) D1; pi_hat_2 = pi_1 + D2; pi_2 = (1 + a) pi_hat_2 - a pi_hat_1.
        let a = 0.3;
        let pi_1 = extrapolate_stack(&[e("d1", 1.0)], &[], a);
        assert_eq!(pi_1, vec![e("d1", 1.3)]);
        let hat_2 = [pi_1[0].clone(), e("d2", 1.0)];
        let pi_2 = extrapolate_stack(&hat_2, &[e("d1", 1.0)], a);
        assert_eq!(pi_2, vec![e("d1", 1.3 * 1.3 - 0.3), e("d2", 1.3)]);
        // alpha = 0: the newer stack exactly; an adapter only the older one has drops out.
        assert_eq!(extrapolate_stack(&hat_2, &[e("d0", 2.0)], 0.0), hat_2.to_vec());
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
