//! Fused CPU kernels with hand-written backward passes, one op per file.
//!
//! Why: candle's autograd gives every elementary op its own backward node, and each node
//! allocates a zero gradient, adds into it and materializes broadcasts, transposes and
//! concatenations. For a small Llama that bookkeeping, not the matmuls, dominated a training
//! step (7x slower backward than PyTorch). Each op here does one layer-level piece of work
//! (RMSNorm, rotary embedding, causal attention, SwiGLU, the LM head with log-softmax and
//! gather, per-sequence sums, a frozen linear layer with LoRA terms) in one forward node and computes its input gradients directly
//! in `bwd`. Every long reduction (a softmax row over the vocabulary or the keys, a mean
//! square over the hidden size, a sequence's sum of token log-probs) accumulates in f64.
//!
//! Every op has a plain-candle composition of the same function (`*_reference`), which is
//! what runs on other devices and dtypes, and which the tests compare values and gradients
//! against (`tests/ops.rs`). The fused path runs for f32 CPU tensors.

mod attention;
mod fast_exp;
mod lora_linear;
mod rms_norm;
mod rope;
mod segment_sum;
mod swiglu;
mod token_logps;

pub use attention::{causal_attention, causal_attention_reference, AttentionMask, PackedSpan};
pub use lora_linear::{lora_linear, lora_linear_reference, LowRank};
pub use rms_norm::{rms_norm, rms_norm_reference};
pub use rope::{rope, rope_reference};
pub use segment_sum::{segment_sum, segment_sum_reference};
pub use swiglu::{swiglu, swiglu_reference};
pub use token_logps::{token_logps, token_logps_reference};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Storage, Tensor};

/// Whether the fused CPU kernels can run on these tensors (f32 on the CPU).
fn fused(tensors: &[&Tensor]) -> bool {
    tensors.iter().all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32)
}

/// The f32 elements of a contiguous CPU argument, in logical order.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &'static str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { bail!("{op}: expected f32, got {:?}", storage.dtype()) };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: expected a contiguous tensor"),
    }
}

/// The whole f32 storage of a CPU argument (for strided access through its layout).
fn storage_f32<'a>(storage: &'a CpuStorage, op: &'static str) -> Result<&'a [f32]> {
    match storage {
        CpuStorage::F32(data) => Ok(data),
        other => bail!("{op}: expected f32, got {:?}", other.dtype()),
    }
}

/// Runs `f` on the f32 elements of each tensor of `ts`, in logical order (each made
/// contiguous first; a no-op when it already is): the backward passes read their inputs and
/// the incoming gradient this way, as plain slices.
fn with_f32<const N: usize, R>(
    ts: [&Tensor; N],
    op: &'static str,
    f: impl FnOnce([&[f32]; N]) -> Result<R>,
) -> Result<R> {
    let contiguous: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let guards: Vec<_> = contiguous.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: Vec<&[f32]> = Vec::with_capacity(N);
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else { bail!("{op}: expected a CPU tensor") };
        slices.push(contiguous_f32(cpu, layout, op)?);
    }
    let Ok(slices) = <[&[f32]; N]>::try_from(slices) else { bail!("{op}: {N} tensors expected") };
    f(slices)
}

/// dst (m x n, row stride dst_rs, unit column stride) = [dst +] alpha * lhs (m x k) rhs (k x n),
/// lhs and rhs given by pointer, row stride and column stride, through the `gemm` crate
/// candle's CPU matmul uses; `parallelism` splits the work over threads.
///
/// SAFETY: the pointers must address matrices of those sizes and strides.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (*const f32, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
    alpha: f32,
    parallelism: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        alpha,
        false,
        false,
        false,
        parallelism,
    )
}

/// [`matmul`] on the calling thread alone (callers that parallelize over heads or rows).
///
/// SAFETY: as [`matmul`].
unsafe fn matmul_serial(
    dims: (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    alpha: f32,
) {
    matmul(dims, dst, dst_rs, accumulate, lhs, rhs, alpha, gemm::Parallelism::None)
}

/// `sum(xs)` accumulated in f64 over eight lanes: exact enough for any row of f32 terms
/// (a sequential f32 sum of a 50k-entry softmax row loses every term below half an ulp of
/// the running total, which biased the log-sum-exp by 1e-4 nats per token on a real model;
/// BENCHMARKS.md), and the lanes keep it vectorized.
fn sum_f64(xs: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&x| x as f64).sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i] as f64;
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// `sum(a * b)` accumulated in f64 over eight lanes (see [`sum_f64`]).
fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ac.remainder().iter().zip(bc.remainder()).map(|(&x, &y)| x as f64 * y as f64).sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] as f64 * y[i] as f64;
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Threads for the fused kernels: candle's setting (RAYON_NUM_THREADS or all cores).
fn num_threads() -> usize {
    candle_core::utils::get_num_threads().max(1)
}

/// A raw pointer that tasks on several threads write through, each to its own disjoint rows.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every user writes disjoint index ranges from different tasks (see call sites).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Splits `0..n` into at most `num_threads()` contiguous chunks and runs `f(start, end)` on
/// each in parallel (inline when one chunk suffices). Fixed chunking keeps results
/// deterministic for a given thread count.
fn par_chunks(n: usize, min_per_chunk: usize, f: impl Fn(usize, usize) + Sync) {
    let chunks = num_threads().min(n.div_ceil(min_per_chunk.max(1))).max(1);
    if chunks == 1 {
        f(0, n);
        return;
    }
    let per = n.div_ceil(chunks);
    rayon::scope(|s| {
        for c in 0..chunks {
            let (start, end) = (c * per, ((c + 1) * per).min(n));
            if start < end {
                let f = &f;
                s.spawn(move |_| f(start, end));
            }
        }
    });
}
