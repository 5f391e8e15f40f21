//! Gradient bookkeeping between `backward()` and the optimizer: collecting a candle `GradStore`
//! into a list in `Params` order, accumulation over micro-batches, finiteness checks and global
//! norm clipping with `torch.nn.utils.clip_grad_norm_`'s formula.
//!
//! Every function keeps the work on the tensors' device and reads back at most one scalar.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use prefopt_model::Params;

/// Sum of squares of `g`, as an f64 scalar tensor. Rows are summed in f32 (short sums, small
/// rounding error) and the row sums in f64, so a large tensor does not lose precision the way
/// one long f32 sum would, without an f64 copy of the whole tensor.
fn sum_sq_f64(g: &Tensor) -> candle_core::Result<Tensor> {
    let dims = g.dims();
    let sq = g.to_dtype(DType::F32)?.sqr()?;
    let partial = match dims.last() {
        Some(&last) if dims.len() >= 2 && last > 1 && last <= 65_536 => sq.sum(dims.len() - 1)?,
        _ => sq,
    };
    partial.to_dtype(DType::F64)?.sum_all()
}

/// Global L2 norm over all gradients (f64 accumulation), as torch.nn.utils.clip_grad_norm_ returns it.
/// `NaN` or `inf` when any gradient element is non-finite.
pub fn global_norm(grads: &[Tensor]) -> candle_core::Result<f64> {
    let mut total: Option<Tensor> = None;
    for g in grads {
        let s = sum_sq_f64(g)?;
        total = Some(match total {
            Some(t) => (t + s)?,
            None => s,
        });
    }
    match total {
        Some(t) => Ok(t.to_scalar::<f64>()?.sqrt()),
        None => Ok(0.0),
    }
}

/// Scales grads in place by min(1, max_norm/(norm+1e-6)) (torch's formula) when max_norm > 0; returns the norm BEFORE clipping.
///
/// When the norm is not finite the gradients are left untouched (torch would turn them into
/// NaN): check the returned norm, or [`all_finite`], and skip the step.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> candle_core::Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                *g = g.affine(coef, 0.0)?;
            }
        }
    }
    Ok(norm)
}

/// Collects gradients from a candle GradStore in `params.iter()` order; a parameter with no gradient gets zeros (documented) — but also return the names of those without one so callers can warn.
///
/// Torch's optimizers skip a parameter whose `.grad` is `None`; a zero gradient is not quite
/// the same (AdamW still applies weight decay and its running moments to it), so callers
/// should warn about the returned names. Gradients are returned detached, in f32.
pub fn collect(params: &Params, store: &GradStore) -> candle_core::Result<(Vec<Tensor>, Vec<String>)> {
    let mut grads = Vec::with_capacity(params.len());
    let mut missing = Vec::new();
    for (name, var) in params.iter() {
        match store.get(var.as_tensor()) {
            Some(g) => grads.push(g.detach().to_dtype(DType::F32)?),
            None => {
                missing.push(name.clone());
                grads.push(var.as_tensor().zeros_like()?.to_dtype(DType::F32)?);
            }
        }
    }
    Ok((grads, missing))
}

/// Accumulation: `acc[i] += g[i] * scale`.
///
/// An empty `acc` starts the sum (`acc = g * scale`), so a loop over micro-batches can begin
/// with `Vec::new()`.
pub fn accumulate(acc: &mut Vec<Tensor>, grads: &[Tensor], scale: f64) -> candle_core::Result<()> {
    let scaled = |g: &Tensor| if scale == 1.0 { Ok(g.clone()) } else { g.affine(scale, 0.0) };
    if acc.is_empty() {
        *acc = grads.iter().map(scaled).collect::<candle_core::Result<_>>()?;
        return Ok(());
    }
    if acc.len() != grads.len() {
        candle_core::bail!("accumulate: {} accumulated gradients but {} new ones", acc.len(), grads.len());
    }
    for (i, (a, g)) in acc.iter_mut().zip(grads).enumerate() {
        if a.dims() != g.dims() {
            candle_core::bail!("accumulate: gradient {i} has shape {:?}, the accumulator {:?}", g.dims(), a.dims());
        }
        *a = (&*a + scaled(g)?)?;
    }
    Ok(())
}

/// Whether every element of every gradient is finite (no NaN, no ±inf).
pub fn all_finite(grads: &[Tensor]) -> candle_core::Result<bool> {
    // g - g is 0 for a finite element and NaN otherwise, so the sum is NaN iff one is not
    // finite; unlike summing g itself, large finite values cannot overflow into a false alarm.
    let mut total: Option<Tensor> = None;
    for g in grads {
        let s = g.sub(g)?.to_dtype(DType::F32)?.sum_all()?;
        total = Some(match total {
            Some(t) => (t + s)?,
            None => s,
        });
    }
    match total {
        Some(t) => Ok(t.to_scalar::<f32>()?.is_finite()),
        None => Ok(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use std::collections::BTreeMap;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    fn flat(x: &Tensor) -> Vec<f32> {
        x.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn fixture() -> serde_json::Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/expected/optim/optim.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn floats(v: &serde_json::Value) -> Vec<f32> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    }

    #[test]
    fn norm_and_clipping_match_torch_clip_grad_norm() {
        let fx = fixture();
        let mut max_err = 0f64;
        for case in fx["clipping"].as_array().unwrap() {
            let shapes: Vec<Vec<usize>> = case["shapes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect())
                .collect();
            let mut grads: Vec<Tensor> =
                case["grads"].as_array().unwrap().iter().zip(&shapes).map(|(g, s)| t(&floats(g), s)).collect();
            let max_norm = case["max_norm"].as_f64().unwrap();
            let want_norm = case["norm"].as_f64().unwrap();
            let norm = clip_grad_norm(&mut grads, max_norm).unwrap();
            assert!((norm - want_norm).abs() <= 1e-6 * want_norm, "norm {norm} vs torch {want_norm}");
            for (g, want) in grads.iter().zip(case["clipped"].as_array().unwrap()) {
                for (a, b) in flat(g).iter().zip(floats(want)) {
                    let err = ((a - b).abs() / b.abs().max(1e-30)) as f64;
                    max_err = max_err.max(err);
                    assert!((a - b).abs() <= 1e-6 * b.abs() + 1e-12, "clipped {a} vs torch {b}");
                }
            }
        }
        eprintln!("clipping: max relative error vs torch {max_err:e}");
    }

    #[test]
    fn clipped_norm_equals_max_norm_and_returns_the_norm_before() {
        let mut grads = vec![t(&[3.0, 4.0], &[2]), t(&[0.0, 12.0, 0.0, 0.0], &[2, 2])];
        let before = clip_grad_norm(&mut grads, 1.0).unwrap();
        assert!((before - 13.0).abs() < 1e-9);
        let after = global_norm(&grads).unwrap();
        assert!((after - 1.0).abs() < 1e-6, "{after}");
    }

    #[test]
    fn no_change_below_max_norm_or_when_disabled() {
        let orig = vec![t(&[3.0, 4.0], &[2])];
        for max_norm in [5.1, 100.0, 0.0, -1.0] {
            let mut grads = orig.clone();
            assert!((clip_grad_norm(&mut grads, max_norm).unwrap() - 5.0).abs() < 1e-9);
            assert_eq!(flat(&grads[0]), vec![3.0, 4.0], "max_norm {max_norm}");
        }
    }

    #[test]
    fn non_finite_gradients_are_reported_and_left_alone() {
        let mut grads = vec![t(&[1.0, f32::NAN], &[2]), t(&[2.0], &[1])];
        assert!(!all_finite(&grads).unwrap());
        assert!(clip_grad_norm(&mut grads, 1.0).unwrap().is_nan());
        assert_eq!(flat(&grads[1]), vec![2.0]);
        assert!(!all_finite(&[t(&[f32::INFINITY], &[1])]).unwrap());
        // Huge but finite values are not a false alarm.
        assert!(all_finite(&[t(&[3e38, 3e38, 3e38], &[3])]).unwrap());
        assert!(all_finite(&[]).unwrap());
    }

    #[test]
    fn global_norm_is_accurate_for_large_tensors() {
        // 4M elements of 0.1: an f32 running sum of squares would drift visibly.
        let n = 1 << 22;
        let g = Tensor::full(0.1f32, (1024, n / 1024), &Device::Cpu).unwrap();
        let want = (n as f64 * (0.1f32 as f64).powi(2)).sqrt();
        let got = global_norm(&[g.clone(), g.flatten_all().unwrap()]).unwrap();
        assert!((got - want * 2f64.sqrt()).abs() < 1e-6 * want, "{got} vs {}", want * 2f64.sqrt());
    }

    #[test]
    fn accumulate_sums_scaled_micro_batches() {
        let mut acc = Vec::new();
        accumulate(&mut acc, &[t(&[1.0, 2.0], &[2])], 0.5).unwrap();
        accumulate(&mut acc, &[t(&[3.0, 5.0], &[2])], 0.5).unwrap();
        assert_eq!(flat(&acc[0]), vec![2.0, 3.5]);
        assert!(accumulate(&mut acc, &[t(&[1.0], &[1])], 1.0).is_err());
        assert!(accumulate(&mut acc, &[], 1.0).is_err());
    }

    #[test]
    fn collect_orders_by_name_and_zero_fills_missing() {
        let dev = Device::Cpu;
        let a = Var::from_slice(&[1f32, 2.0], 2, &dev).unwrap();
        let b = Var::from_slice(&[3f32], 1, &dev).unwrap();
        let unused = Var::from_slice(&[5f32, 6.0, 7.0], 3, &dev).unwrap();
        let params = Params::new(BTreeMap::from([
            ("b".to_string(), b.clone()),
            ("a".to_string(), a.clone()),
            ("c.unused".to_string(), unused),
        ]));
        let loss = ((a.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap()
            + (b.as_tensor() * 3.0).unwrap().sum_all().unwrap())
        .unwrap();
        let store = loss.backward().unwrap();
        let (grads, missing) = collect(&params, &store).unwrap();
        assert_eq!(missing, vec!["c.unused".to_string()]);
        assert_eq!(flat(&grads[0]), vec![1.0, 2.0]); // a: d(a^2/2)/da = a
        assert_eq!(flat(&grads[1]), vec![3.0]); // b
        assert_eq!(flat(&grads[2]), vec![0.0, 0.0, 0.0]);
    }
}
