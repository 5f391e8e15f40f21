//! Fused CPU kernels with hand-written backward passes, one op per file.
//!
//! Why: candle's autograd gives every elementary op its own backward node, and each node
//! allocates a zero gradient, adds into it and materializes broadcasts, transposes and
//! concatenations. For a small Llama that bookkeeping, not the matmuls, dominated a training
//! step (7x slower backward than PyTorch). Each op here does one layer-level piece of work
//! (RMSNorm, rotary embedding, causal attention, SwiGLU, log-softmax + gather) in one forward
//! node and computes its input gradients directly in `bwd`.
//!
//! Every op has a plain-candle composition of the same function (`*_reference`), which is
//! what runs on other devices and dtypes, and which the tests compare values and gradients
//! against (`tests/ops.rs`). The fused path runs for f32 CPU tensors.

mod attention;
mod fast_exp;
mod log_softmax_gather;
mod rms_norm;
mod rope;
mod swiglu;

pub use attention::{causal_attention, causal_attention_reference, AttentionMask};
pub use log_softmax_gather::{token_logps, token_logps_reference, NO_TARGET};
pub use rms_norm::{rms_norm, rms_norm_reference};
pub use rope::{rope, rope_reference};
pub use swiglu::{swiglu, swiglu_reference};

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
