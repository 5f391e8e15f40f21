//! Causal (optionally left-padded) grouped-query attention, `softmax(Q K^T / sqrt(D) + mask) V`,
//! as one node.
//!
//! The composition transposes q/k/v to (B, heads, T, D) with copies, materializes GQA's
//! `repeat_kv`, builds an additive -inf mask, and runs softmax as five broadcast ops; its
//! backward pass allocates a gradient for each. Here the heads are read in place from the
//! projections' (rows, heads * D) layout by strided matmuls (the `gemm` crate candle uses),
//! a key/value head serves its query heads without being copied, the mask is a range per
//! query row, and the softmax probabilities are kept from the forward pass for the backward
//! (only the key ranges each block of query rows may see: about half of a causal T x S):
//!   P = softmax(s Q K^T + mask),  Y = P V                    (s = 1/sqrt(D))
//!   dP = dY V^T,  dS = P * (dP - rowsum(P * dP)),  dQ = s dS K,  dK = s dS^T Q,  dV = P^T dY
//! (dK and dV summed over the query heads sharing a key/value head).

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};

use super::fast_exp::exp_in_place;
use super::{contiguous_f32, dot_f64, fused, matmul_serial, par_chunks, storage_f32, sum_f64, with_f32, SharedMut};

/// Which keys each query may attend to. Unpacked (`spans` empty): query i of the T new
/// positions sits at slot `past + i` of the S = past + T keys; it attends to slots
/// `0..=past + i` (causal), except that row b's first `pad_lens[b]` slots are left padding
/// that only a pad query itself attends to (a row of all -inf would give NaN). Packed
/// (`spans` given; one batch row, no past, no padding): the row holds several independent
/// sequences, and a query attends only within its own span (see [`PackedSpan`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AttentionMask {
    /// Keys already cached before the new positions.
    pub past: usize,
    /// Left-padding slots per batch row; empty means none.
    pub pad_lens: Vec<usize>,
    /// The sequences of a packed row, in order, covering it; empty means not packed.
    pub spans: Vec<PackedSpan>,
}

/// One sequence of a packed row, or two completions of one prompt sharing its tokens:
/// `[prompt + first completion][second completion]`, where tokens `fork..len` attend to the
/// prompt `0..prefix` and causally to themselves, but not to the first completion
/// `prefix..fork`. Their positions continue the prompt's: token j >= fork sits at position
/// `prefix + j - fork`, as if it followed the prompt directly. A single sequence has
/// `fork == len` (and `prefix` is then unused).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedSpan {
    /// The span's first slot in the packed row.
    pub start: usize,
    /// Its tokens.
    pub len: usize,
    /// The shared prompt's tokens (the prefix the second completion attends to).
    pub prefix: usize,
    /// Where the second completion starts (`len` when there is none).
    pub fork: usize,
}

impl PackedSpan {
    /// A single sequence of `len` tokens at `start`.
    pub fn single(start: usize, len: usize) -> Self {
        Self { start, len, prefix: len, fork: len }
    }

    /// The position (for the rotary embedding) of the span's token j.
    pub fn position(&self, j: usize) -> usize {
        if j < self.fork {
            j
        } else {
            self.prefix + j - self.fork
        }
    }
}

impl AttentionMask {
    /// The mask of a packed row of `spans`.
    pub fn packed(spans: Vec<PackedSpan>) -> Self {
        Self { past: 0, pad_lens: Vec::new(), spans }
    }

    /// The independent attention problems of a batch of `batch` rows of `t` queries: one per
    /// batch row, or one per span of a packed row.
    fn problems(&self, batch: usize, t: usize, heads: usize) -> Result<Vec<Problem>> {
        if self.spans.is_empty() {
            let mut probs = 0;
            return Ok((0..batch)
                .map(|b| {
                    let p = Problem {
                        b,
                        start: 0,
                        q0: b * t,
                        t,
                        past: self.past,
                        pad: self.pad_lens.get(b).copied().unwrap_or(0),
                        prefix: t,
                        fork: t,
                        probs,
                    };
                    probs += heads * p.probs_per_head();
                    p
                })
                .collect());
        }
        let (mut next, mut probs, mut out) = (0, 0, Vec::with_capacity(self.spans.len()));
        for sp in &self.spans {
            if batch != 1
                || self.past != 0
                || sp.start != next
                || sp.len == 0
                || sp.fork > sp.len
                || sp.prefix > sp.fork
            {
                bail!("attention: packed spans {:?} do not tile a row of {t} (batch {batch})", self.spans);
            }
            let p = Problem {
                b: 0,
                start: sp.start,
                q0: sp.start,
                t: sp.len,
                past: 0,
                pad: 0,
                prefix: sp.prefix,
                fork: sp.fork,
                probs,
            };
            out.push(p);
            next += sp.len;
            probs += heads * p.probs_per_head();
        }
        if next != t {
            bail!("attention: packed spans cover {next} of {t} slots");
        }
        Ok(out)
    }

    /// The additive mask (B or 1, 1, T, S) of the reference composition: 0 or -inf.
    fn additive(&self, batch: usize, t: usize, device: &candle_core::Device) -> Result<Tensor> {
        let rows = if self.pad_lens.is_empty() { 1 } else { batch };
        let s = self.past + t;
        let mut mask = vec![f32::NEG_INFINITY; rows * t * s];
        for p in self.problems(rows, t, 1)? {
            for i in 0..p.t {
                let row = (p.q0 + i) * s + p.start;
                for (lo, hi) in p.keys(i) {
                    mask[row + lo..row + hi].fill(0.0);
                }
            }
        }
        Tensor::from_vec(mask, (rows, 1, t, s), device)
    }
}

/// One independent attention problem: `t` queries (rows `q0..q0 + t` of q) over the keys of
/// batch row `b` from slot `start` on (`past + t` of them).
#[derive(Clone, Copy, Debug)]
struct Problem {
    b: usize,
    start: usize,
    q0: usize,
    t: usize,
    past: usize,
    /// Left-padding slots.
    pad: usize,
    /// A shared prompt's length and where the second completion starts (`fork == t`: none).
    prefix: usize,
    fork: usize,
    /// Offset of its heads' probabilities (each [`Problem::probs_per_head`] long) in the
    /// kept buffer.
    probs: usize,
}

impl Problem {
    /// The key ranges (half-open, the second possibly empty) query i attends to.
    fn keys(&self, i: usize) -> [(usize, usize); 2] {
        if i >= self.fork {
            [(0, self.prefix), (self.fork, i + 1)]
        } else {
            let q = self.past + i;
            [(self.pad.min(q), q + 1), (0, 0)]
        }
    }

    /// The row blocks of the queries, none straddling the fork, with the key ranges their
    /// gemms compute: rows i0..i1 see keys below `past + i1` only (or the prompt and the
    /// second completion's keys below i1), so the masked upper triangle is skipped block by
    /// block (smaller blocks skip more, but each gemm call has a fixed cost), and one head's
    /// probabilities are the blocks' `rows x width` matrices one after the other.
    fn row_blocks(&self) -> impl Iterator<Item = RowBlock> + '_ {
        let first = (0..self.fork).step_by(ROW_BLOCK).map(|i0| (i0, (i0 + ROW_BLOCK).min(self.fork)));
        let second = (self.fork..self.t).step_by(ROW_BLOCK).map(|i0| (i0, (i0 + ROW_BLOCK).min(self.t)));
        let mut offset = 0;
        first.chain(second).map(move |(i0, i1)| {
            let keys =
                if i0 >= self.fork { [(0, self.prefix), (self.fork, i1)] } else { [(0, self.past + i1), (0, 0)] };
            let block = RowBlock { i0, i1, keys, offset, width: keys.iter().map(|(lo, hi)| hi - lo).sum() };
            offset += (i1 - i0) * block.width;
            block
        })
    }

    /// One head's probabilities: the row blocks' stored keys.
    fn probs_per_head(&self) -> usize {
        self.row_blocks().map(|b| (b.i1 - b.i0) * b.width).sum()
    }
}

/// Query rows `i0..i1` of a problem and the keys their gemms compute: `keys[0]`, then
/// `keys[1]` (possibly empty). Their probabilities (and the backward pass's dS) are a
/// `rows x width` row-major matrix at `offset` of the head's buffer, whose columns are
/// those keys in order; the masked ones among them are stored as zeros.
#[derive(Clone, Copy, Debug)]
struct RowBlock {
    i0: usize,
    i1: usize,
    keys: [(usize, usize); 2],
    offset: usize,
    width: usize,
}

impl RowBlock {
    /// The non-empty key ranges `(lo, hi)`, each with the column where key `lo` sits.
    fn segments(&self) -> impl Iterator<Item = (usize, usize, usize)> {
        let (k, skip) = (self.keys, self.keys[0].1 - self.keys[0].0);
        [(k[0].0, k[0].1, 0), (k[1].0, k[1].1, skip)].into_iter().filter(|(lo, hi, _)| lo < hi)
    }

    /// The key ranges query `i` (a row of this block) attends to, each with its column.
    fn row_segments(&self, pr: &Problem, i: usize) -> impl Iterator<Item = (usize, usize, usize)> {
        let (keys, skip) = (pr.keys(i), self.keys[0].1 - self.keys[0].0);
        let col = |m: usize| if m == 0 { keys[0].0 - self.keys[0].0 } else { skip + keys[1].0 - self.keys[1].0 };
        let segs = [(keys[0].0, keys[0].1, col(0)), (keys[1].0, keys[1].1, col(1))];
        segs.into_iter().filter(|(lo, hi, _)| lo < hi)
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
    let t = rows / batch;
    let problems = mask.problems(batch, t, heads)?;
    let probs_len = problems.iter().map(|p| heads * p.probs_per_head()).sum();
    let op = Attention {
        batch,
        t,
        heads,
        kv_heads,
        d,
        scale: 1.0 / (d as f32).sqrt(),
        past: mask.past,
        problems,
        probs_len,
        keep_probs: q.track_op() || k.track_op() || v.track_op(),
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
    past: usize,
    /// The independent problems (batch rows, or a packed row's spans).
    problems: Vec<Problem>,
    /// Their probabilities' total size, heads * [`Problem::probs_per_head`] summed.
    probs_len: usize,
    /// Keep the probabilities for the backward pass (only when one is possible).
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

impl View {
    /// Where problem p's first key of kv head g lives.
    fn base(&self, p: &Problem, g: usize) -> usize {
        self.offset + p.b * self.b + p.start * self.s + g * self.g
    }
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

/// Query rows per block of the causal gemms (see `Problem::row_blocks`).
const ROW_BLOCK: usize = 32;

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
    /// P = softmax(scale Q_h K_g^T + mask) of problem `pr` into `p` (one head's row blocks,
    /// see [`RowBlock`]).
    ///
    /// SAFETY: q, k point at this op's arguments with the given views.
    unsafe fn probs_into(&self, p: &mut [f32], pr: &Problem, h: usize, q: &[f32], k: &[f32], kv: View) {
        let (d, f) = (self.d, self.heads * self.d);
        let g = h / (self.heads / self.kv_heads);
        let q_h = q.as_ptr().add(pr.q0 * f + h * d);
        let k_g = k.as_ptr().add(kv.base(pr, g));
        for blk in pr.row_blocks() {
            let p_blk = p.as_mut_ptr().add(blk.offset);
            if pr.t <= SMALL_T {
                // Decoding: a few query rows, where gemm's packing costs more than dot products.
                for i in blk.i0..blk.i1 {
                    let qi = std::slice::from_raw_parts(q_h.add(i * f), d);
                    let row = p_blk.add((i - blk.i0) * blk.width);
                    for (lo, hi, col) in blk.row_segments(pr, i) {
                        for j in lo..hi {
                            let kj = std::slice::from_raw_parts(k_g.add(j * kv.s), d);
                            *row.add(col + j - lo) = self.scale * dot(qi, kj);
                        }
                    }
                }
            } else {
                // K^T as a (D x S) matrix: row stride 1, column stride kv.s; only the keys the
                // block may see (the masked ones among them are zeroed below).
                for (lo, hi, col) in blk.segments() {
                    matmul_serial(
                        (blk.i1 - blk.i0, hi - lo, d),
                        p_blk.add(col),
                        blk.width,
                        false,
                        (q_h.add(blk.i0 * f), f, 1),
                        (k_g.add(lo * kv.s), 1, kv.s),
                        self.scale,
                    );
                }
            }
            for i in blk.i0..blk.i1 {
                let row = std::slice::from_raw_parts_mut(p_blk.add((i - blk.i0) * blk.width), blk.width);
                let cols = || blk.row_segments(pr, i).map(|(lo, hi, col)| (col, col + hi - lo));
                let max = cols().flat_map(|(a, b)| row[a..b].iter().copied()).fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f64;
                for (a, b) in cols() {
                    row[a..b].iter_mut().for_each(|x| *x -= max);
                    exp_in_place(&mut row[a..b]);
                    sum += sum_f64(&row[a..b]);
                }
                let sum = sum as f32;
                // Zero the masked keys: before, between and after the ranges.
                let mut next = 0;
                for (a, b) in cols() {
                    row[next..a].fill(0.0);
                    row[a..b].iter_mut().for_each(|x| *x /= sum);
                    next = b;
                }
                row[next..].fill(0.0);
            }
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
        if h_n % kv_n != 0 || q.len() != b_n * t * h_n * d || kv.seq != self.past + t || vv.seq != kv.seq {
            bail!("attention: q {:?}, k {:?}, v {:?} do not fit the heads and mask", ql.dims(), kl.dims(), vl.dims());
        }
        let (f, rep) = (h_n * d, h_n / kv_n);
        let mut y = vec![0f32; q.len()];
        let mut probs = if self.keep_probs { vec![0f32; self.probs_len] } else { Vec::new() };
        let (y_ptr, p_ptr) = (SharedMut(y.as_mut_ptr()), SharedMut(probs.as_mut_ptr()));
        let scratch_len = self.problems.iter().map(Problem::probs_per_head).max().unwrap_or(0);
        // One task per (problem, kv head); it writes its query heads' columns of y and their
        // probability blocks only.
        par_chunks(self.problems.len() * kv_n, 1, |start, end| {
            let mut scratch = if self.keep_probs { Vec::new() } else { vec![0f32; scratch_len] };
            for task in start..end {
                let (pr, g) = (&self.problems[task / kv_n], task % kv_n);
                let n = pr.probs_per_head();
                for h in g * rep..(g + 1) * rep {
                    // SAFETY: block (problem, h) of probs and columns h of the problem's rows
                    // of y are this task's; q, k, v are read as described by their layouts.
                    unsafe {
                        let p = if self.keep_probs {
                            std::slice::from_raw_parts_mut(p_ptr.get().add(pr.probs + h * n), n)
                        } else {
                            &mut scratch[..n]
                        };
                        self.probs_into(p, pr, h, q, k, kv);
                        let v_g = v.as_ptr().add(vv.base(pr, g));
                        let y_h = y_ptr.get().add(pr.q0 * f + h * d);
                        for blk in pr.row_blocks() {
                            let p_blk = p.as_ptr().add(blk.offset);
                            if pr.t <= SMALL_T {
                                for i in blk.i0..blk.i1 {
                                    let yi = std::slice::from_raw_parts_mut(y_h.add(i * f), d);
                                    let row = p_blk.add((i - blk.i0) * blk.width);
                                    for (lo, hi, col) in blk.row_segments(pr, i) {
                                        for j in lo..hi {
                                            let (pj, vj) = (
                                                *row.add(col + j - lo),
                                                std::slice::from_raw_parts(v_g.add(j * vv.s), d),
                                            );
                                            yi.iter_mut().zip(vj).for_each(|(y, v)| *y += pj * v);
                                        }
                                    }
                                }
                            } else {
                                for (lo, hi, col) in blk.segments() {
                                    let p_rows = (p_blk.add(col), blk.width, 1);
                                    let v_rows = (v_g.add(lo * vv.s), vv.s, 1);
                                    let y_rows = y_h.add(blk.i0 * f);
                                    matmul_serial((blk.i1 - blk.i0, d, hi - lo), y_rows, f, true, p_rows, v_rows, 1.0);
                                }
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
        let (b_n, h_n, kv_n, d) = (self.batch, self.heads, self.kv_heads, self.d);
        let (f, rep) = (h_n * d, h_n / kv_n);
        let saved = self.probs.lock().expect("no panics while held").take();
        // Keys and values (and their gradients) contiguous in their forward shape.
        let (k_c, v_c) = (k.contiguous()?, v.contiguous()?);
        let (kv, vv) = (kv_view(k_c.layout(), b_n, kv_n, d)?, kv_view(v_c.layout(), b_n, kv_n, d)?);
        let (kv, vv) = (View { offset: 0, ..kv }, View { offset: 0, ..vv });
        let scratch_len = self.problems.iter().map(Problem::probs_per_head).max().unwrap_or(0);
        let (dq, dk, dv) = with_f32([q, &k_c, &v_c, dy], "attention", |[q, k, v, dy]| {
            let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
            let ptrs = (SharedMut(dq.as_mut_ptr()), SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()));
            let saved = saved.as_deref();
            par_chunks(self.problems.len() * kv_n, 1, |start, end| {
                let (dq_p, dk_p, dv_p) = ptrs;
                let mut p_buf = if saved.is_some() { Vec::new() } else { vec![0f32; scratch_len] };
                let mut ds = vec![0f32; scratch_len];
                for task in start..end {
                    let (pr, g) = (&self.problems[task / kv_n], task % kv_n);
                    let n = pr.probs_per_head();
                    // SAFETY: this task owns query heads g*rep.. of the problem's rows (their
                    // columns of dq) and kv head g of its keys (their columns of dk, dv).
                    unsafe {
                        let (kg, vg) = (kv.base(pr, g), vv.base(pr, g));
                        for h in g * rep..(g + 1) * rep {
                            let p: &[f32] = match saved {
                                Some(all) => &all[pr.probs + h * n..pr.probs + (h + 1) * n],
                                None => {
                                    self.probs_into(&mut p_buf[..n], pr, h, q, k, kv);
                                    &p_buf[..n]
                                }
                            };
                            let qh = pr.q0 * f + h * d;
                            for blk in pr.row_blocks() {
                                let (rows, w) = (blk.i1 - blk.i0, blk.width);
                                let (p_blk, ds_blk) = (p.as_ptr().add(blk.offset), ds.as_mut_ptr().add(blk.offset));
                                let dy_blk = (dy.as_ptr().add(qh + blk.i0 * f), f, 1);
                                // dP = dY V^T (rows x the keys these rows see).
                                for (lo, hi, col) in blk.segments() {
                                    let v_t = (v.as_ptr().add(vg + lo * vv.s), 1, vv.s);
                                    matmul_serial((rows, hi - lo, d), ds_blk.add(col), w, false, dy_blk, v_t, 1.0);
                                }
                                // dS = P * (dP - rowsum(P * dP)), over the block's stored keys
                                // (the masked ones have P = 0).
                                for r in 0..rows {
                                    let pr_row = std::slice::from_raw_parts(p_blk.add(r * w), w);
                                    let dr_row = std::slice::from_raw_parts_mut(ds_blk.add(r * w), w);
                                    let mut dot = 0f64;
                                    for (lo, hi, col) in blk.segments() {
                                        dot += dot_f64(&pr_row[col..col + hi - lo], &dr_row[col..col + hi - lo]);
                                    }
                                    let dot = dot as f32;
                                    dr_row.iter_mut().zip(pr_row).for_each(|(x, pv)| *x = pv * (*x - dot));
                                }
                                // dV += P^T dY, dQ = s dS K, dK += s dS^T Q.
                                let dq_blk = dq_p.get().add(qh + blk.i0 * f);
                                let q_blk = (q.as_ptr().add(qh + blk.i0 * f), f, 1);
                                for (m, (lo, hi, col)) in blk.segments().enumerate() {
                                    let p_t = (p_blk.add(col), 1, w);
                                    let dv_dst = dv_p.get().add(vg + lo * vv.s);
                                    matmul_serial((hi - lo, d, rows), dv_dst, vv.s, true, p_t, dy_blk, 1.0);
                                    let k_g = (k.as_ptr().add(kg + lo * kv.s), kv.s, 1);
                                    let ds_rows = (ds_blk.add(col) as *const f32, w, 1);
                                    matmul_serial((rows, d, hi - lo), dq_blk, f, m > 0, ds_rows, k_g, self.scale);
                                    let ds_t = (ds_blk.add(col) as *const f32, 1, w);
                                    let dk_dst = dk_p.get().add(kg + lo * kv.s);
                                    matmul_serial((hi - lo, d, rows), dk_dst, kv.s, true, ds_t, q_blk, self.scale);
                                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_probabilities_are_the_row_blocks_visible_keys() {
        // One causal sequence of 100 queries: blocks of 32, 32, 32 and 4 rows seeing 32, 64,
        // 96 and 100 keys, not 100 x 100.
        let single = AttentionMask::packed(vec![PackedSpan::single(0, 100)]).problems(1, 100, 1).unwrap();
        assert_eq!(single[0].probs_per_head(), 32 * 32 + 32 * 64 + 32 * 96 + 4 * 100);
        // A shared prompt of 40, a chosen completion of 30 (rows 0..70, blocks 32/32/6) and a
        // rejected one of 20 (rows 70..90, one block seeing the prompt and its 20 keys): the
        // rejected rows keep no columns for the chosen keys.
        let pair = AttentionMask::packed(vec![PackedSpan { start: 0, len: 90, prefix: 40, fork: 70 }]);
        let p = pair.problems(1, 90, 2).unwrap();
        assert_eq!(p[0].probs_per_head(), 32 * 32 + 32 * 64 + 6 * 70 + 20 * (40 + 20));
        // The next problem's heads start after this one's.
        let two = AttentionMask::packed(vec![PackedSpan::single(0, 10), PackedSpan::single(10, 5)]);
        let p = two.problems(1, 15, 3).unwrap();
        assert_eq!((p[0].probs, p[1].probs), (0, 3 * 10 * 10));
        // Every query's visible keys lie in its block's stored columns.
        let pr = pair.problems(1, 90, 1).unwrap()[0];
        for blk in pr.row_blocks() {
            for i in blk.i0..blk.i1 {
                for (lo, hi, col) in blk.row_segments(&pr, i) {
                    assert!(col + hi - lo <= blk.width, "row {i}: keys {lo}..{hi} at column {col} of {}", blk.width);
                }
            }
        }
    }
}
