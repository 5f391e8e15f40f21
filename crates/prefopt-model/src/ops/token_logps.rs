//! Log-probability of one target token per row through the LM head,
//! `log_softmax(h W^T)[target]`, as one node that never holds the (rows x vocab) logits.
//!
//! The composition (the LM head's matmul, then max, subtract, exp, sum, log, gather) keeps
//! the whole (R, V) logits for the backward pass: 0.7 GB for 3,600 completion tokens of a
//! 49k vocabulary, and twice that with their gradient. Here the rows go through in chunks of
//! a fixed size: a chunk's logits are computed (one gemm), reduced to each row's log-sum-exp
//! and target logit, and dropped; the backward pass recomputes them chunk by chunk and writes
//! `dlogits = dlp (onehot(y) - softmax)` into the same buffer before the two gemms that give
//! `dh = dlogits W` and `dW^T += h^T dlogits`:
//!   lp = x[y] - logsumexp(x),   x = h W^T (one row),   dx = dlp (onehot(y) - softmax(x)).
//!
//! The log-sum-exp accumulates the exponentials in f64 (`sum_f64`): a sequential f32 sum over
//! 49k terms drops the small ones and biased a real model's log-probs by +1e-4 nats per token.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, D};

use super::fast_exp::exp_in_place;
use super::{contiguous_f32, fused, matmul, num_threads, par_chunks, storage_f32, sum_f64, SharedMut};

/// Logit values per chunk: bounds the op's memory to 64 MiB of logits at any vocabulary
/// while keeping each chunk's gemms large enough to run at full speed.
const CHUNK_ELEMENTS: usize = 1 << 24;

/// `log_softmax(h w_t)[target]` per row: h (R, C) hidden states, w_t (C, V) the LM head
/// transposed (a strided view is fine), one target id per row. Returns (R,), in f32.
pub fn token_logps(h: &Tensor, w_t: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (rows, c) = h.dims2()?;
    let (c2, v) = w_t.dims2()?;
    if c != c2 || targets.len() != rows {
        bail!("token_logps: h {:?}, w_t {:?} and {} targets do not fit", h.shape(), w_t.shape(), targets.len());
    }
    if let Some(bad) = targets.iter().find(|&&y| y as usize >= v) {
        bail!("token_logps: target {bad} outside the vocabulary of {v}");
    }
    if fused(&[h, w_t]) {
        let keep = h.track_op() || w_t.track_op();
        h.contiguous()?.apply_op2(w_t, TokenLogps { targets: targets.to_vec(), keep, lse: Mutex::new(None) })
    } else {
        token_logps_reference(h, w_t, targets)
    }
}

/// The same from differentiable candle primitives (other devices and dtypes; tests): the
/// whole logits, then log-softmax and gather.
pub fn token_logps_reference(h: &Tensor, w_t: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let logits = h.matmul(w_t)?.to_dtype(candle_core::DType::F32)?; // (R, V)
    let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?)?;
    let log_norm = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let ids = Tensor::from_vec(targets.to_vec(), (targets.len(), 1), logits.device())?;
    shifted.gather(&ids, D::Minus1)?.broadcast_sub(&log_norm)?.squeeze(D::Minus1)
}

struct TokenLogps {
    targets: Vec<u32>,
    /// Keep each row's log-sum-exp for the backward pass (only when one is possible).
    keep: bool,
    lse: Mutex<Option<Vec<f32>>>,
}

/// Where w_t's element (c, v) lives: offset, row stride (per c) and column stride (per v).
fn w_view(layout: &Layout) -> Result<(usize, usize, usize)> {
    match (layout.dims(), layout.stride()) {
        ([_, _], [rs, cs]) => Ok((layout.start_offset(), *rs, *cs)),
        (dims, _) => bail!("token_logps: w_t must be 2-d, got {dims:?}"),
    }
}

/// Rows per chunk for a vocabulary of `v`.
fn chunk_rows(rows: usize, v: usize) -> usize {
    (CHUNK_ELEMENTS / v.max(1)).clamp(1, rows.max(1))
}

/// `logits[r] = h[r] W^T` for the chunk's rows `r0..r1`, into `buf` ((r1 - r0) x V).
///
/// SAFETY: `w` addresses a (C, V) matrix with the given view.
unsafe fn chunk_logits(
    buf: &mut [f32],
    h: &[f32],
    c: usize,
    v: usize,
    (r0, r1): (usize, usize),
    w: &[f32],
    view: (usize, usize, usize),
) {
    let (offset, w_rs, w_cs) = view;
    let h_rows = (h.as_ptr().add(r0 * c), c, 1);
    let w_t = (w.as_ptr().add(offset), w_rs, w_cs);
    matmul((r1 - r0, v, c), buf.as_mut_ptr(), v, false, h_rows, w_t, 1.0, gemm::Parallelism::Rayon(num_threads()));
}

/// (max, ln of the sum of exp(x - max)) of one row, the sum in f64; `scratch` holds the
/// row's exponentials.
fn max_and_log_norm(row: &[f32], scratch: &mut Vec<f32>) -> (f32, f64) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    scratch.clear();
    scratch.extend(row.iter().map(|x| x - max));
    exp_in_place(scratch);
    (max, sum_f64(scratch).ln())
}

impl CustomOp2 for TokenLogps {
    fn name(&self) -> &'static str {
        "token-logps"
    }

    fn cpu_fwd(&self, hs: &CpuStorage, hl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = contiguous_f32(hs, hl, "token-logps")?;
        let w = storage_f32(ws, "token-logps")?;
        let (rows, c) = hl.shape().dims2()?;
        let v = wl.dims()[1];
        let view = w_view(wl)?;
        let chunk = chunk_rows(rows, v);
        let mut buf = vec![0f32; chunk * v];
        let mut out = vec![0f32; rows];
        let mut lse = if self.keep { vec![0f32; rows] } else { Vec::new() };
        let (out_ptr, lse_ptr) = (SharedMut(out.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
        for r0 in (0..rows).step_by(chunk) {
            let r1 = (r0 + chunk).min(rows);
            // SAFETY: w is the op's second argument, read through its own layout.
            unsafe { chunk_logits(&mut buf, h, c, v, (r0, r1), w, view) };
            let logits = &buf;
            par_chunks(r1 - r0, 4, |start, end| {
                let mut scratch = Vec::with_capacity(v);
                for i in start..end {
                    let row = &logits[i * v..(i + 1) * v];
                    let (max, log_norm) = max_and_log_norm(row, &mut scratch);
                    let r = r0 + i;
                    let lp = (row[self.targets[r] as usize] - max) as f64 - log_norm;
                    // SAFETY: element r of out and lse belongs to this task alone.
                    unsafe {
                        *out_ptr.get().add(r) = lp as f32;
                        if self.keep {
                            *lse_ptr.get().add(r) = (max as f64 + log_norm) as f32;
                        }
                    }
                }
            });
        }
        if self.keep {
            *self.lse.lock().expect("no panics while held") = Some(lse);
        }
        Ok((CpuStorage::F32(out), Shape::from_dims(&[rows])))
    }

    fn bwd(&self, h: &Tensor, w_t: &Tensor, _lp: &Tensor, dlp: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, c) = h.dims2()?;
        let v = w_t.dim(1)?;
        // Cloned, not taken: a second backward pass over the same graph (SPO's dynamic solver
        // runs two) needs them again.
        let lse = match self.lse.lock().expect("no panics while held").clone() {
            Some(lse) => lse,
            None => bail!("token-logps: backward without a forward that kept its log-sum-exps"),
        };
        let (w_storage, w_layout) = w_t.storage_and_layout();
        let candle_core::Storage::Cpu(w_cpu) = &*w_storage else { bail!("token-logps: expected a CPU tensor") };
        let w = storage_f32(w_cpu, "token-logps")?;
        let view = w_view(w_layout)?;
        let (offset, w_rs, w_cs) = view;
        let chunk = chunk_rows(rows, v);
        let (dh, dw_t) = super::with_f32([h, dlp], "token-logps", |[h, dlp]| {
            let mut buf = vec![0f32; chunk * v];
            let mut dh = vec![0f32; rows * c];
            let mut dw_t = vec![0f32; c * v]; // (C, V), row-major
            for r0 in (0..rows).step_by(chunk) {
                let r1 = (r0 + chunk).min(rows);
                let n = r1 - r0;
                // SAFETY: w is read through its own layout; every write below is to buffers
                // of the sizes the gemms are given.
                unsafe {
                    chunk_logits(&mut buf, h, c, v, (r0, r1), w, view);
                    let logits = SharedMut(buf.as_mut_ptr());
                    par_chunks(n, 4, |start, end| {
                        for i in start..end {
                            let r = r0 + i;
                            let row = std::slice::from_raw_parts_mut(logits.get().add(i * v), v);
                            let (g, lse) = (dlp[r], lse[r]);
                            row.iter_mut().for_each(|x| *x -= lse);
                            exp_in_place(row);
                            row.iter_mut().for_each(|x| *x *= -g);
                            row[self.targets[r] as usize] += g;
                        }
                    });
                    let threads = gemm::Parallelism::Rayon(num_threads());
                    // dh[r0..r1] = dlogits (n x V) W (V x C), W = w_t transposed.
                    let w_rows = (w.as_ptr().add(offset), w_cs, w_rs);
                    matmul(
                        (n, c, v),
                        dh.as_mut_ptr().add(r0 * c),
                        c,
                        false,
                        (buf.as_ptr(), v, 1),
                        w_rows,
                        1.0,
                        threads,
                    );
                    // dW^T += h^T (C x n) dlogits (n x V).
                    let h_t = (h.as_ptr().add(r0 * c), 1, c);
                    matmul((c, v, n), dw_t.as_mut_ptr(), v, r0 > 0, h_t, (buf.as_ptr(), v, 1), 1.0, threads);
                }
            }
            Ok((dh, dw_t))
        })?;
        drop(w_storage);
        Ok((Some(Tensor::from_vec(dh, (rows, c), h.device())?), Some(Tensor::from_vec(dw_t, (c, v), w_t.device())?)))
    }
}
