//! RMSNorm, `w * x / sqrt(mean(x^2) + eps)` over the last dimension, as one node.
//!
//! The composition (square, mean, add, sqrt, broadcast divide, broadcast multiply) is six
//! autograd nodes with a full-size temporary each; here the forward is one pass per row and
//! the backward one more:
//!   r = 1/sqrt(mean(x^2) + eps),  x^ = x r
//!   dx = r (g - x^ mean(g x^)) with g = dy w,     dw = sum over rows of dy x^.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, D};

use super::{contiguous_f32, dot_f64, fused, par_chunks, with_f32, SharedMut};

/// RMSNorm of `x` (..., C) with weight `w` (C,), computed in f32.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(&[x, w]) && w.rank() == 1 {
        // apply_op2 records a backward node only when x or w tracks gradients.
        x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
    } else {
        rms_norm_reference(x, w, eps)
    }
}

/// The same from differentiable candle primitives (other devices and dtypes; tests).
pub fn rms_norm_reference(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(candle_core::DType::F32)?;
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    let x = x.broadcast_div(&(mean_sq + eps)?.sqrt()?)?;
    x.to_dtype(dtype)?.broadcast_mul(w)
}

struct RmsNorm {
    eps: f64,
}

/// `1/sqrt(mean(x^2) + eps)`, the mean of squares accumulated in f64 (a long f32 sum loses
/// the small squares beside a real model's outlier dimensions).
fn inv_rms(row: &[f32], eps: f64) -> f32 {
    let mean_sq = dot_f64(row, row) / row.len() as f64;
    (1.0 / (mean_sq + eps).sqrt()) as f32
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "rms-norm")?;
        let w = contiguous_f32(ws, wl, "rms-norm")?;
        let c = w.len();
        let rows = x.len() / c;
        let mut y = vec![0f32; x.len()];
        let out = SharedMut(y.as_mut_ptr());
        par_chunks(rows, 64, |start, end| {
            // SAFETY: rows start..end of y belong to this chunk alone.
            let y = unsafe { std::slice::from_raw_parts_mut(out.get().add(start * c), (end - start) * c) };
            for (xr, yr) in x[start * c..end * c].chunks_exact(c).zip(y.chunks_exact_mut(c)) {
                let r = inv_rms(xr, self.eps);
                for ((yv, xv), wv) in yr.iter_mut().zip(xr).zip(w) {
                    *yv = wv * (xv * r);
                }
            }
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let c = w.elem_count();
        let rows = x.elem_count() / c;
        let (dx, dw) = with_f32([x, w, dy], "rms-norm", |[x, w, dy]| {
            let mut dx = vec![0f32; x.len()];
            let out = SharedMut(dx.as_mut_ptr());
            let partial_dw = std::sync::Mutex::new(Vec::new());
            par_chunks(rows, 64, |start, end| {
                // SAFETY: rows start..end of dx belong to this chunk alone.
                let dx = unsafe { std::slice::from_raw_parts_mut(out.get().add(start * c), (end - start) * c) };
                let mut dw = vec![0f32; c];
                let mut g = vec![0f32; c]; // dy * w of one row
                let rows = x[start * c..end * c].chunks_exact(c).zip(dy[start * c..end * c].chunks_exact(c));
                for ((xr, dyr), dxr) in rows.zip(dx.chunks_exact_mut(c)) {
                    let r = inv_rms(xr, self.eps);
                    for ((((gv, xv), dyv), wv), dwv) in g.iter_mut().zip(xr).zip(dyr).zip(w).zip(dw.iter_mut()) {
                        *gv = dyv * wv;
                        *dwv += dyv * (xv * r);
                    }
                    // mean(g * x^) = r * mean(g * x), accumulated in f64.
                    let mean = (r as f64 * dot_f64(&g, xr) / c as f64) as f32;
                    for ((dxv, xv), gv) in dxr.iter_mut().zip(xr).zip(&g) {
                        *dxv = r * (gv - xv * r * mean);
                    }
                }
                partial_dw.lock().expect("no panics while held").push((start, dw));
            });
            // Sum the chunks' partial weight gradients in row order (deterministic).
            let mut parts = partial_dw.into_inner().expect("no panics while held");
            parts.sort_by_key(|(start, _)| *start);
            let mut dw = vec![0f32; c];
            for (_, part) in parts {
                dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
            }
            Ok((dx, dw))
        })?;
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), Some(Tensor::from_vec(dw, w.shape(), w.device())?)))
    }
}
