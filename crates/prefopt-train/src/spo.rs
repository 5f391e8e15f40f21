//! SPO, Stable Preference Optimization (methods.md section 4): keeping the chosen response's
//! likelihood from falling while a pairwise loss pushes the margin.
//!
//! This formulation is prefopt's own design. It follows the paper's description (Jian, Yang et
//! al., arXiv 2507.07723: a bilevel problem, preference loss above, SFT on preferred responses
//! below, the lower level turned into a "safe alignment region" and a penalty, single-step
//! gradient updates); the paper's body could not be read, so its exact equations may differ.
//!
//! - Upper level: `L_PO`, any loss of [`crate::losses`]. Lower level: SFT on `y_w`.
//! - Safe region: `q_i = max(0, -lp(y_w)/|y_w| + lp_ref(y_w)/|y_w|)`, i.e. the chosen
//!   response's per-token log-prob is no lower than under the anchor (reference / SFT model);
//!   the violation is `mean_i q_i` ([`safe_region_violation`]).
//! - [`SpoSolver::Penalty`]: minimize `L_PO + lambda * mean_i q_i` ([`penalty_loss`]), one
//!   backward pass.
//! - [`SpoSolver::Dynamic`]: a single-step bilevel update with an adaptive weight, as in
//!   value-function bilevel methods. With `g_p = grad L_PO` and `g_q = grad mean_i q_i` (two
//!   backward passes), step along `g_p + lambda_t * g_q` ([`combine_grads`]) with
//!   `lambda_t = max(0, (eta*|g_q|^2 - <g_p, g_q>) / |g_q|^2)` ([`dynamic_weight`]), so that
//!   `<step, g_q> >= eta*|g_q|^2`: every step also decreases the violation at rate `eta`, and
//!   `lambda_t = 0` when the preference step already does so or when `g_q = 0` (inside the
//!   safe region, boundary included, `q` exerts no pull).

use candle_core::{DType, Tensor};

use crate::losses::{relu_strict, LossError};

/// How the safe-region constraint enters the update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpoSolver {
    /// Fixed weight: minimize `L_PO + lambda * violation`.
    Penalty,
    /// Adaptive weight per step from the two gradients (see the module doc).
    Dynamic,
}

impl SpoSolver {
    /// The config name, `penalty` or `dynamic`.
    pub fn name(&self) -> &'static str {
        match self {
            SpoSolver::Penalty => "penalty",
            SpoSolver::Dynamic => "dynamic",
        }
    }
}

/// `mean_i max(0, -lp(y_w,i)/|y_w,i| + lp_ref(y_w,i)/|y_w,i|)`: how far, per token, the chosen
/// responses' log-probs fell below the anchor's. Scalar, differentiable in `chosen` (the
/// reference and lengths are detached; lengths clamped to >= 1). Gradient 0 where a pair sits
/// exactly on the boundary.
pub fn safe_region_violation(chosen: &Tensor, ref_chosen: &Tensor, chosen_lens: &Tensor) -> Result<Tensor, LossError> {
    let b = match chosen.dims() {
        [b] if *b > 0 => *b,
        d => return Err(LossError::BatchShape(d.to_vec())),
    };
    for (name, t) in [("ref_chosen", ref_chosen), ("chosen_lens", chosen_lens)] {
        if t.dims() != [b] {
            return Err(LossError::Shape { name, got: t.dims().to_vec(), b });
        }
        if t.dtype() != chosen.dtype() {
            return Err(LossError::DType { name, got: t.dtype(), want: chosen.dtype() });
        }
    }
    let lens = chosen_lens.detach().maximum(1.0)?;
    let per_token_drop = ((ref_chosen.detach() - chosen)? / lens)?; // (B,)
    Ok(relu_strict(&per_token_drop)?.mean_all()?)
}

/// The penalty solver's objective, `po_loss + lambda * violation` (both scalars).
pub fn penalty_loss(po_loss: &Tensor, violation: &Tensor, lambda: f64) -> Result<Tensor, LossError> {
    if !(lambda.is_finite() && lambda >= 0.0) {
        return Err(LossError::BadParam { loss: "spo", param: "lambda", expected: ">= 0", value: lambda });
    }
    Ok((po_loss + violation.affine(lambda, 0.0)?)?)
}

/// The dynamic solver's weight `lambda_t = max(0, (eta*|g_q|^2 - <g_p, g_q>) / |g_q|^2)` over
/// flat gradient lists (one tensor per parameter, same order and shapes in both lists);
/// 0 when `|g_q|^2 == 0`. Products are summed per tensor in f32 (f64 for f64 gradients) and
/// across tensors in f64, with one device-to-host copy.
pub fn dynamic_weight(g_p: &[Tensor], g_q: &[Tensor], eta: f64) -> Result<f64, LossError> {
    check_grads(g_p, g_q)?;
    if !(eta.is_finite() && eta >= 0.0) {
        return Err(LossError::BadParam { loss: "spo", param: "eta", expected: ">= 0", value: eta });
    }
    if g_q.is_empty() {
        return Ok(0.0);
    }
    let mut dots = Vec::with_capacity(g_q.len());
    let mut sqs = Vec::with_capacity(g_q.len());
    for (p, q) in g_p.iter().zip(g_q) {
        let (p, q) = (upcast(p)?, upcast(q)?);
        dots.push((&p * &q)?.sum_all()?.to_dtype(DType::F64)?);
        sqs.push(q.sqr()?.sum_all()?.to_dtype(DType::F64)?);
    }
    let dot = Tensor::stack(&dots, 0)?.sum_all()?;
    let sq = Tensor::stack(&sqs, 0)?.sum_all()?;
    let v = Tensor::stack(&[dot, sq], 0)?.to_vec1::<f64>()?;
    let (dot, sq) = (v[0], v[1]);
    if !(dot.is_finite() && sq.is_finite()) {
        return Err(LossError::NonFinite(format!("gradients: <g_p, g_q> = {dot}, |g_q|^2 = {sq}")));
    }
    if sq == 0.0 {
        return Ok(0.0);
    }
    Ok(((eta * sq - dot) / sq).max(0.0))
}

/// `g_p + lambda_t * g_q`, elementwise per tensor: the dynamic solver's update direction.
pub fn combine_grads(g_p: &[Tensor], g_q: &[Tensor], lambda_t: f64) -> Result<Vec<Tensor>, LossError> {
    check_grads(g_p, g_q)?;
    if !lambda_t.is_finite() {
        return Err(LossError::BadParam { loss: "spo", param: "lambda_t", expected: "finite", value: lambda_t });
    }
    g_p.iter()
        .zip(g_q)
        .map(|(p, q)| if lambda_t == 0.0 { Ok(p.clone()) } else { Ok((p + q.affine(lambda_t, 0.0)?)?) })
        .collect()
}

/// Half-precision gradients are reduced in f32.
fn upcast(t: &Tensor) -> candle_core::Result<Tensor> {
    match t.dtype() {
        DType::F64 | DType::F32 => Ok(t.clone()),
        _ => t.to_dtype(DType::F32),
    }
}

fn check_grads(g_p: &[Tensor], g_q: &[Tensor]) -> Result<(), LossError> {
    if g_p.len() != g_q.len() {
        return Err(LossError::GradMismatch(format!("{} tensors in g_p, {} in g_q", g_p.len(), g_q.len())));
    }
    for (i, (p, q)) in g_p.iter().zip(g_q).enumerate() {
        if p.shape() != q.shape() {
            return Err(LossError::GradMismatch(format!("tensor {i}: g_p {:?}, g_q {:?}", p.dims(), q.dims())));
        }
        if p.dtype() != q.dtype() {
            return Err(LossError::GradMismatch(format!("tensor {i}: g_p {:?}, g_q {:?}", p.dtype(), q.dtype())));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn violation_is_zero_inside_the_safe_region_with_no_pull() {
        let reference = t(&[-6.0, -2.0, -9.0]);
        let lens = t(&[3.0, 1.0, 4.0]);
        let chosen = Var::new(&[-6.0f32, -1.5, -8.0], &Device::Cpu).unwrap(); // on the boundary, above, above
        let v = safe_region_violation(chosen.as_tensor(), &reference, &lens).unwrap();
        assert_eq!(v.rank(), 0);
        assert_eq!(v.to_scalar::<f32>().unwrap(), 0.0);
        let g = v.backward().unwrap();
        let g = g.get(chosen.as_tensor()).map(|g| g.to_vec1::<f32>().unwrap()).unwrap_or(vec![0.0; 3]);
        assert_eq!(g, vec![0.0; 3]);
    }

    #[test]
    fn violation_is_the_mean_per_token_drop_and_its_gradient_raises_chosen() {
        let reference = t(&[-6.0, -2.0, -9.0]);
        let lens = t(&[3.0, 1.0, 4.0]);
        let chosen = Var::new(&[-7.5f32, -1.0, -11.0], &Device::Cpu).unwrap(); // drops 0.5/token, none, 0.5/token
        let v = safe_region_violation(chosen.as_tensor(), &reference, &lens).unwrap();
        assert!((v.to_scalar::<f32>().unwrap() - (0.5 + 0.0 + 0.5) / 3.0).abs() < 1e-7);
        let g = v.backward().unwrap();
        let g = g.get(chosen.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        // d/d lp_i = -1/(B |y_i|) where violated: descent raises lp(y_w).
        let want = [-1.0 / 9.0, 0.0, -1.0 / 12.0];
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-7, "{g:?}");
        }
    }

    #[test]
    fn violation_checks_shapes() {
        let e = safe_region_violation(&t(&[-1.0, -2.0]), &t(&[-1.0]), &t(&[1.0, 1.0])).unwrap_err();
        assert_eq!(e.to_string(), "`ref_chosen` has shape [1], expected (2,) like `chosen`");
    }

    #[test]
    fn penalty_adds_lambda_times_violation() {
        let l =
            penalty_loss(&Tensor::new(0.7f32, &Device::Cpu).unwrap(), &Tensor::new(0.2f32, &Device::Cpu).unwrap(), 2.0)
                .unwrap();
        assert!((l.to_scalar::<f32>().unwrap() - 1.1).abs() < 1e-6);
        let z = Tensor::new(0f32, &Device::Cpu).unwrap();
        assert!(penalty_loss(&z, &z, -1.0).is_err());
    }

    fn grads(parts: &[&[f32]]) -> Vec<Tensor> {
        parts.iter().map(|p| t(p)).collect()
    }

    #[test]
    fn dynamic_weight_on_hand_made_gradients() {
        let eta = 0.5;
        let g_q = grads(&[&[1.0, 0.0], &[0.0]]); // |g_q|^2 = 1
                                                 // Orthogonal: <g_p, g_q> = 0, so lambda = eta.
        let ortho = grads(&[&[0.0, 3.0], &[2.0]]);
        assert!((dynamic_weight(&ortho, &g_q, eta).unwrap() - 0.5).abs() < 1e-12);
        // Aligned and already decreasing q faster than eta: no extra weight.
        let aligned = grads(&[&[2.0, 1.0], &[0.0]]);
        assert_eq!(dynamic_weight(&aligned, &g_q, eta).unwrap(), 0.0);
        // Aligned but slower than eta: tops up to eta.
        let slow = grads(&[&[0.2, 1.0], &[0.0]]);
        assert!((dynamic_weight(&slow, &g_q, eta).unwrap() - 0.3).abs() < 1e-7);
        // Opposite: cancels the conflict and adds eta.
        let opposite = grads(&[&[-2.0, 0.0], &[0.0]]);
        assert!((dynamic_weight(&opposite, &g_q, eta).unwrap() - 2.5).abs() < 1e-12);
        // Zero g_q: no step on q.
        let zero = grads(&[&[0.0, 0.0], &[0.0]]);
        assert_eq!(dynamic_weight(&opposite, &zero, eta).unwrap(), 0.0);
        assert_eq!(dynamic_weight(&[], &[], eta).unwrap(), 0.0);
        // The combined step then decreases q at rate eta: <g_p + lambda g_q, g_q> = eta |g_q|^2.
        let lam = dynamic_weight(&opposite, &g_q, eta).unwrap();
        let step = combine_grads(&opposite, &g_q, lam).unwrap();
        let dot: f32 =
            step.iter().zip(&g_q).map(|(a, b)| (a * b).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()).sum();
        assert!((dot - 0.5).abs() < 1e-6);
    }

    #[test]
    fn combine_grads_is_elementwise_and_checks_shapes() {
        let g_p = grads(&[&[1.0, 2.0], &[3.0]]);
        let g_q = grads(&[&[10.0, 20.0], &[30.0]]);
        let c = combine_grads(&g_p, &g_q, 0.5).unwrap();
        assert_eq!(c[0].to_vec1::<f32>().unwrap(), vec![6.0, 12.0]);
        assert_eq!(c[1].to_vec1::<f32>().unwrap(), vec![18.0]);
        assert_eq!(combine_grads(&g_p, &g_q, 0.0).unwrap()[0].to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
        let short = grads(&[&[1.0, 2.0]]);
        assert!(matches!(combine_grads(&g_p, &short, 1.0), Err(LossError::GradMismatch(_))));
        let odd = grads(&[&[1.0], &[3.0]]);
        assert!(matches!(dynamic_weight(&g_p, &odd, 1.0), Err(LossError::GradMismatch(_))));
        assert!(dynamic_weight(&g_p, &g_q, -1.0).is_err());
    }

    #[test]
    fn solver_names_are_snake_case() {
        for s in [SpoSolver::Penalty, SpoSolver::Dynamic] {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{}\"", s.name()));
        }
    }
}
