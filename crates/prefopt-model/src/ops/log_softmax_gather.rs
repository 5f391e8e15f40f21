//! Log-probability of one target token per position, `log_softmax(logits)[target]`, as one
//! node, in f32.
//!
//! The composition (max, subtract, exp, sum, log, gather, subtract) keeps several (N, V)
//! temporaries and runs at every position, prompt tokens included. Here positions without a
//! target (`NO_TARGET`: prompt and padding) cost nothing and give 0, and the backward pass
//! writes the gradient row directly:
//!   lp = x[y] - logsumexp(x),   dx = dlp (onehot(y) - softmax(x)).

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};

use super::fast_exp::exp_in_place;
use super::{contiguous_f32, fused, par_chunks, with_f32, SharedMut};

/// A target id meaning "no token here": its log-prob is 0 and it passes no gradient.
pub const NO_TARGET: u32 = u32::MAX;

/// `log_softmax(logits)[target]` for logits (..., V) and one target per row (row-major
/// order over the leading dims); shape: the leading dims. 0 where the target is `NO_TARGET`.
pub fn token_logps(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    if targets.len() * v != logits.elem_count() {
        bail!("token_logps: {} targets for logits {:?}", targets.len(), logits.shape());
    }
    if let Some(bad) = targets.iter().find(|&&y| y != NO_TARGET && y as usize >= v) {
        bail!("token_logps: target {bad} outside the vocabulary of {v}");
    }
    if fused(&[logits]) {
        logits.contiguous()?.apply_op1(TokenLogps { targets: targets.to_vec() })
    } else {
        token_logps_reference(logits, targets)
    }
}

/// The same from differentiable candle primitives (other devices and dtypes; tests).
pub fn token_logps_reference(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let dims = logits.dims();
    let lead = &dims[..dims.len() - 1];
    let logits = logits.to_dtype(candle_core::DType::F32)?;
    let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?)?;
    let log_norm = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let ids: Vec<u32> = targets.iter().map(|&y| if y == NO_TARGET { 0 } else { y }).collect();
    let mask: Vec<f32> = targets.iter().map(|&y| if y == NO_TARGET { 0.0 } else { 1.0 }).collect();
    let mut idx_shape = lead.to_vec();
    idx_shape.push(1);
    let ids = Tensor::from_vec(ids, idx_shape, logits.device())?;
    let picked = shifted.gather(&ids, D::Minus1)?.broadcast_sub(&log_norm)?.squeeze(D::Minus1)?;
    picked * Tensor::from_vec(mask, lead, logits.device())?
}

struct TokenLogps {
    targets: Vec<u32>,
}

/// (max, log of the sum of exp(x - max)) of one row: log-softmax is x - max - that log.
/// `scratch` is a buffer the row's exponentials are computed in.
fn shift_and_log_norm(row: &[f32], scratch: &mut Vec<f32>) -> (f32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    scratch.clear();
    scratch.extend(row.iter().map(|x| x - max));
    exp_in_place(scratch);
    (max, scratch.iter().sum::<f32>().ln())
}

impl CustomOp1 for TokenLogps {
    fn name(&self) -> &'static str {
        "token-logps"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "token-logps")?;
        let dims = layout.dims();
        let v = dims[dims.len() - 1];
        let mut out = vec![0f32; self.targets.len()];
        let ptr = SharedMut(out.as_mut_ptr());
        par_chunks(self.targets.len(), 16, |start, end| {
            let mut scratch = Vec::with_capacity(v);
            for r in start..end {
                let y = self.targets[r];
                if y == NO_TARGET {
                    continue;
                }
                let (max, log_norm) = shift_and_log_norm(&x[r * v..(r + 1) * v], &mut scratch);
                // SAFETY: element r of out belongs to this chunk alone.
                unsafe { *ptr.get().add(r) = (x[r * v + y as usize] - max) - log_norm };
            }
        });
        Ok((CpuStorage::F32(out), Shape::from_dims(&dims[..dims.len() - 1])))
    }

    fn bwd(&self, x: &Tensor, _lp: &Tensor, dlp: &Tensor) -> Result<Option<Tensor>> {
        let v = x.dim(D::Minus1)?;
        let dx = with_f32([x, dlp], "token-logps", |[x, dlp]| {
            let mut dx = vec![0f32; x.len()];
            let ptr = SharedMut(dx.as_mut_ptr());
            par_chunks(self.targets.len(), 16, |start, end| {
                let mut scratch = Vec::with_capacity(v);
                for r in start..end {
                    let y = self.targets[r];
                    if y == NO_TARGET {
                        continue;
                    }
                    let row = &x[r * v..(r + 1) * v];
                    let (max, log_norm) = shift_and_log_norm(row, &mut scratch);
                    // SAFETY: row r of dx belongs to this chunk alone.
                    let out = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(r * v), v) };
                    let g = dlp[r];
                    out.iter_mut().zip(row).for_each(|(o, xv)| *o = xv - max - log_norm);
                    exp_in_place(out);
                    out.iter_mut().for_each(|o| *o *= -g);
                    out[y as usize] += g;
                }
            });
            Ok(dx)
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}
