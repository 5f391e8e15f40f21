//! Causal (optionally left-padded) grouped-query attention, `softmax(Q K^T / sqrt(D) + mask) V`,
//! as one node.
//!
//! The composition transposes q/k/v to (B, heads, T, D) with copies, materializes GQA's
//! `repeat_kv`, builds an additive -inf mask, and runs softmax as five broadcast ops; its
//! backward pass allocates a gradient for each. Here the heads are read in place from the
//! projections' (rows, heads * D) layout by strided matmuls (the `gemm` crate candle uses),
//! a key/value head serves its query heads without being copied, the mask is a range per
//! query row, and the softmax probabilities are kept from the forward pass for the backward:
//!   P = softmax(s Q K^T + mask),  Y = P V                    (s = 1/sqrt(D))
//!   dP = dY V^T,  dS = P * (dP - rowsum(P * dP)),  dQ = s dS K,  dK = s dS^T Q,  dV = P^T dY
//! (dK and dV summed over the query heads sharing a key/value head).

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};

use super::fast_exp::exp_in_place;
use super::{contiguous_f32, dot_f64, fused, matmul_serial, par_chunks, storage_f32, sum_f64, with_f32, SharedMut};

/// Which keys each query may attend to. Query i of the T new positions sits at slot
/// `past + i` of the S = past + T keys; it attends to slots `0..=past + i` (causal), except
/// that row b's first `pad_lens[b]` slots are left padding that only a pad query itself
/// attends to (a row of all -inf would give NaN).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AttentionMask {
    /// Keys already cached before the new positions.
    pub past: usize,
    /// Left-padding slots per batch row; empty means none.
    pub pad_lens: Vec<usize>,
}

impl AttentionMask {
    /// The keys `lo..=hi` that query `i` of batch row `b` attends to.
    fn range(&self, b: usize, i: usize) -> (usize, usize) {
        let q = self.past + i;
        let pad = self.pad_lens.get(b).copied().unwrap_or(0);
        (pad.min(q), q)
    }

    /// The additive mask (B or 1, 1, T, S) of the reference composition: 0 or -inf.
    fn additive(&self, batch: usize, t: usize, device: &candle_core::Device) -> Result<Tensor> {
        let rows = if self.pad_lens.is_empty() { 1 } else { batch };
        let s = self.past + t;
        let mut mask = vec![f32::NEG_INFINITY; rows * t * s];
        for b in 0..rows {
            for i in 0..t {
                let (lo, hi) = self.range(b, i);
                mask[(b * t + i) * s + lo..=(b * t + i) * s + hi].fill(0.0);
            }
        }
        Tensor::from_vec(mask, (rows, 1, t, s), device)
    }
}

/// Attention of queries q (B*T, H*D) over keys and values k, v ((B*S, KV*D), (B, S, KV*D)
/// or (B, KV, S, D), possibly strided views such as a KV cache's filled part), with
/// `heads` query heads and `kv_heads` key/value heads (query head h reads kv head
/// h / (H / KV)). Returns (B*T, H*D): the heads' outputs side by side, ready for o_proj.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    batch: usize,
    heads: usize,
    kv_heads: usize,
    mask: &AttentionMask,
) -> Result<Tensor> {
    if !fused(&[q, k, v]) {
        return causal_attention_reference(q, k, v, batch, heads, kv_heads, mask);
    }
    let (rows, f) = q.dims2()?;
    let d = f / heads;
    let keep_probs = q.track_op() || k.track_op() || v.track_op();
    let op = Attention {
        batch,
        t: rows / batch,
        heads,
        kv_heads,
        d,
        scale: 1.0 / (d as f32).sqrt(),
        mask: mask.clone(),
        keep_probs,
        probs: Mutex::new(None),
    };
    q.contiguous()?.apply_op3(k, v, op)
}

/// The same from differentiable candle primitives (other devices and dtypes; tests): heads
/// transposed out, keys/values repeated per query head, additive mask, softmax.
pub fn causal_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    batch: usize,
    heads: usize,
    kv_heads: usize,
    mask: &AttentionMask,
) -> Result<Tensor> {
    let (rows, f) = q.dims2()?;
    let (t, d) = (rows / batch, f / heads);
    let split = |x: &Tensor, n: usize| -> Result<Tensor> {
        let s = x.elem_count() / (batch * n * d);
        x.reshape((batch, s, n, d))?.transpose(1, 2)?.contiguous() // (B, n, S, D)
    };
    let repeat = |x: Tensor| -> Result<Tensor> {
        let rep = heads / kv_heads;
        if rep == 1 {
            return Ok(x);
        }
        let (b, kv, s, d) = x.dims4()?;
        x.unsqueeze(2)?.broadcast_as((b, kv, rep, s, d))?.reshape((b, kv * rep, s, d))
    };
    let q = split(q, heads)?; // (B, H, T, D)
    let (k, v) = (repeat(split(k, kv_heads)?)?, repeat(split(v, kv_heads)?)?); // (B, H, S, D)
    let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(&mask.additive(batch, t, q.device())?)?;
    let shifted = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?;
    let e = shifted.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    p.matmul(&v)?.transpose(1, 2)?.reshape((rows, f))
}

struct Attention {
    batch: usize,
    t: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    scale: f32,
    mask: AttentionMask,
    /// Keep the probabilities (B, H, T, S) for the backward pass (only when one is possible).
    keep_probs: bool,
    probs: Mutex<Option<Vec<f32>>>,
}

/// Where key/value element (b, s, g, 0) lives: offset, and the strides of batch row b,
/// position s and kv head g (the head dim is contiguous).
#[derive(Clone, Copy)]
struct View {
    offset: usize,
    b: usize,
    s: usize,
    g: usize,
    seq: usize, // S
}

/// Keys/values as (B*S, KV*D), (B, S, KV*D) (projection layouts) or (B, KV, S, D) (a KV
/// cache's, where each head's positions are contiguous for decoding).
fn kv_view(layout: &Layout, batch: usize, kv_heads: usize, d: usize) -> Result<View> {
    let (dims, stride, offset) = (layout.dims(), layout.stride(), layout.start_offset());
    let view = match *dims {
        [rows, w] if w == kv_heads * d && stride[1] == 1 => {
            View { offset, b: rows / batch * stride[0], s: stride[0], g: d, seq: rows / batch }
        }
        [b, s, w] if b == batch && w == kv_heads * d && stride[2] == 1 => {
            View { offset, b: stride[0], s: stride[1], g: d, seq: s }
        }
        [b, g, s, w] if b == batch && g == kv_heads && w == d && stride[3] == 1 => {
            View { offset, b: stride[0], s: stride[2], g: stride[1], seq: s }
        }
        _ => bail!("attention: keys/values {dims:?} (strides {stride:?}) do not fit {batch} x {kv_heads} x {d}"),
    };
    Ok(view)
}

/// Up to this many query rows, the forward pass uses dot products instead of gemm.
const SMALL_T: usize = 4;

/// Query rows per block of the causal gemms: rows i0..i1 see keys 0..past+i1 only, so the
/// masked upper triangle is skipped block by block (smaller blocks skip more, but each
/// gemm call has a fixed cost).
const ROW_BLOCK: usize = 32;

/// The row blocks (i0, i1, keys) of T query rows after `past` cached keys.
fn row_blocks(t: usize, past: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..t).step_by(ROW_BLOCK).map(move |i0| {
        let i1 = (i0 + ROW_BLOCK).min(t);
        (i0, i1, past + i1)
    })
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums, so the compiler vectorizes the loop.
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl Attention {
    /// P = softmax(scale Q_bh K_g^T + mask) into `p` (T x S, row-major).
    ///
    /// SAFETY: q, k point at this op's arguments with the given views.
    unsafe fn probs_into(&self, p: &mut [f32], b: usize, h: usize, q: &[f32], k: &[f32], kv: View) {
        let (t, d, f) = (self.t, self.d, self.heads * self.d);
        let g = h / (self.heads / self.kv_heads);
        let s = kv.seq;
        let q_bh = q.as_ptr().add(b * t * f + h * d);
        let k_g = k.as_ptr().add(kv.offset + b * kv.b + g * kv.g);
        if t <= SMALL_T {
            // Decoding: a few query rows, where gemm's packing costs more than dot products.
            for i in 0..t {
                let qi = std::slice::from_raw_parts(q_bh.add(i * f), d);
                for (j, x) in p[i * s..(i + 1) * s].iter_mut().enumerate() {
                    *x = self.scale * dot(qi, std::slice::from_raw_parts(k_g.add(j * kv.s), d));
                }
            }
        } else {
            // K^T as a (D x S) matrix: row stride 1, column stride kv.s; per row block, only
            // the keys it may see (the rest of each row is zeroed below).
            for (i0, i1, n) in row_blocks(t, self.mask.past) {
                let (rows, q_rows) = (i1 - i0, q_bh.add(i0 * f));
                matmul_serial(
                    (rows, n, d),
                    p.as_mut_ptr().add(i0 * s),
                    s,
                    false,
                    (q_rows, f, 1),
                    (k_g, 1, kv.s),
                    self.scale,
                );
            }
        }
        for i in 0..t {
            let (lo, hi) = self.mask.range(b, i);
            let row = &mut p[i * s..(i + 1) * s];
            let max = row[lo..=hi].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            row[lo..=hi].iter_mut().for_each(|x| *x -= max);
            exp_in_place(&mut row[lo..=hi]);
            let sum = sum_f64(&row[lo..=hi]) as f32;
            row[..lo].fill(0.0);
            row[hi + 1..].fill(0.0);
            row[lo..=hi].iter_mut().for_each(|x| *x /= sum);
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b_n, t, h_n, kv_n, d) = (self.batch, self.t, self.heads, self.kv_heads, self.d);
        let q = contiguous_f32(qs, ql, "attention")?;
        let (k, v) = (storage_f32(ks, "attention")?, storage_f32(vs, "attention")?);
        let (kv, vv) = (kv_view(kl, b_n, kv_n, d)?, kv_view(vl, b_n, kv_n, d)?);
        if h_n % kv_n != 0 || q.len() != b_n * t * h_n * d || kv.seq != self.mask.past + t || vv.seq != kv.seq {
            bail!("attention: q {:?}, k {:?}, v {:?} do not fit the heads and mask", ql.dims(), kl.dims(), vl.dims());
        }
        let (s, f, rep) = (kv.seq, h_n * d, h_n / kv_n);
        let mut y = vec![0f32; q.len()];
        let mut probs = if self.keep_probs { vec![0f32; b_n * h_n * t * s] } else { Vec::new() };
        let (y_ptr, p_ptr) = (SharedMut(y.as_mut_ptr()), SharedMut(probs.as_mut_ptr()));
        // One task per (batch row, kv head); it writes its query heads' columns of y and
        // their probability blocks only.
        par_chunks(b_n * kv_n, 1, |start, end| {
            let mut scratch = if self.keep_probs { Vec::new() } else { vec![0f32; t * s] };
            for task in start..end {
                let (b, g) = (task / kv_n, task % kv_n);
                for h in g * rep..(g + 1) * rep {
                    // SAFETY: block (b, h) of probs and columns h of y's batch-b rows are this
                    // task's; q, k, v are read as described by their layouts.
                    unsafe {
                        let p = if self.keep_probs {
                            std::slice::from_raw_parts_mut(p_ptr.get().add((b * h_n + h) * t * s), t * s)
                        } else {
                            &mut scratch[..]
                        };
                        self.probs_into(p, b, h, q, k, kv);
                        let v_g = v.as_ptr().add(vv.offset + b * vv.b + g * vv.g);
                        let y_bh = y_ptr.get().add(b * t * f + h * d);
                        if t <= SMALL_T {
                            for i in 0..t {
                                let yi = std::slice::from_raw_parts_mut(y_bh.add(i * f), d);
                                for (j, &pj) in p[i * s..(i + 1) * s].iter().enumerate() {
                                    let vj = std::slice::from_raw_parts(v_g.add(j * vv.s), d);
                                    yi.iter_mut().zip(vj).for_each(|(y, v)| *y += pj * v);
                                }
                            }
                        } else {
                            for (i0, i1, n) in row_blocks(t, self.mask.past) {
                                let p_rows = (p.as_ptr().add(i0 * s), s, 1);
                                matmul_serial((i1 - i0, d, n), y_bh.add(i0 * f), f, false, p_rows, (v_g, vv.s, 1), 1.0);
                            }
                        }
                    }
                }
            }
        });
        if self.keep_probs {
            *self.probs.lock().expect("no panics while held") = Some(probs);
        }
        Ok((CpuStorage::F32(y), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b_n, t, h_n, kv_n, d) = (self.batch, self.t, self.heads, self.kv_heads, self.d);
        let (f, rep) = (h_n * d, h_n / kv_n);
        let saved = self.probs.lock().expect("no panics while held").take();
        // Keys and values (and their gradients) contiguous in their forward shape.
        let (k_c, v_c) = (k.contiguous()?, v.contiguous()?);
        let (kv, vv) = (kv_view(k_c.layout(), b_n, kv_n, d)?, kv_view(v_c.layout(), b_n, kv_n, d)?);
        let (kv, vv) = (View { offset: 0, ..kv }, View { offset: 0, ..vv });
        let s = kv.seq;
        let (dq, dk, dv) = with_f32([q, &k_c, &v_c, dy], "attention", |[q, k, v, dy]| {
            let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
            let ptrs = (SharedMut(dq.as_mut_ptr()), SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()));
            let saved = saved.as_deref();
            par_chunks(b_n * kv_n, 1, |start, end| {
                let (dq_p, dk_p, dv_p) = ptrs;
                let mut p_buf = if saved.is_some() { Vec::new() } else { vec![0f32; t * s] };
                let mut ds = vec![0f32; t * s];
                for task in start..end {
                    let (b, g) = (task / kv_n, task % kv_n);
                    // SAFETY: this task owns query heads g*rep.. of batch row b (their
                    // columns of dq) and kv head g of batch row b (its columns of dk, dv).
                    unsafe {
                        let (kg, vg) = (b * kv.b + g * kv.g, b * vv.b + g * vv.g);
                        for h in g * rep..(g + 1) * rep {
                            let p: &[f32] = match saved {
                                Some(all) => &all[(b * h_n + h) * t * s..(b * h_n + h + 1) * t * s],
                                None => {
                                    self.probs_into(&mut p_buf, b, h, q, k, kv);
                                    &p_buf
                                }
                            };
                            let qh = b * t * f + h * d;
                            for (i0, i1, n) in row_blocks(t, self.mask.past) {
                                let rows = i1 - i0;
                                let (p_blk, ds_blk) = (p.as_ptr().add(i0 * s), ds.as_mut_ptr().add(i0 * s));
                                let dy_blk = (dy.as_ptr().add(qh + i0 * f), f, 1);
                                // dP = dY V^T (rows x n: the keys these rows see).
                                let v_t = (v.as_ptr().add(vg), 1, vv.s);
                                matmul_serial((rows, n, d), ds_blk, s, false, dy_blk, v_t, 1.0);
                                // dS = P * (dP - rowsum(P * dP)).
                                for r in 0..rows {
                                    let pr = std::slice::from_raw_parts(p_blk.add(r * s), n);
                                    let dr = std::slice::from_raw_parts_mut(ds_blk.add(r * s), n);
                                    let dot = dot_f64(pr, dr) as f32;
                                    dr.iter_mut().zip(pr).for_each(|(x, pv)| *x = pv * (*x - dot));
                                }
                                // dV += P^T dY, dQ = s dS K, dK += s dS^T Q.
                                let p_t = (p_blk, 1, s);
                                matmul_serial((n, d, rows), dv_p.get().add(vg), vv.s, true, p_t, dy_blk, 1.0);
                                let k_g = (k.as_ptr().add(kg), kv.s, 1);
                                let dq_blk = dq_p.get().add(qh + i0 * f);
                                matmul_serial((rows, d, n), dq_blk, f, false, (ds_blk, s, 1), k_g, self.scale);
                                let q_blk = (q.as_ptr().add(qh + i0 * f), f, 1);
                                let ds_t = (ds_blk as *const f32, 1, s);
                                matmul_serial((n, d, rows), dk_p.get().add(kg), kv.s, true, ds_t, q_blk, self.scale);
                            }
                        }
                    }
                }
            });
            Ok((dq, dk, dv))
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}
