//! Per-sequence sums of per-token values, `y[s] = sum of x[j] over the tokens j of sequence
//! s`, accumulated in f64: a sequence's summed log-prob over hundreds of tokens is a sum of
//! values whose total grows to hundreds of nats, and an f32 running sum (or a matmul with a
//! 0/1 matrix) rounds it to about 1e-4 nats, as much as transformers' whole f32 error on a
//! 30-layer model. The backward pass is a gather: `dx[j] = dy[segment of j]`.

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::{contiguous_f32, fused};

/// Sums `x` (R,) into `segments` sums: element j goes to `owner[j]` (owners ascending or not;
/// segments without elements get 0). Returns (segments,), in f32.
pub fn segment_sum(x: &Tensor, owner: &[usize], segments: usize) -> Result<Tensor> {
    if x.dims() != [owner.len()] {
        bail!("segment_sum: {} owners for x {:?}", owner.len(), x.shape());
    }
    if let Some(bad) = owner.iter().find(|&&o| o >= segments) {
        bail!("segment_sum: owner {bad} of only {segments} segments");
    }
    if fused(&[x]) {
        x.contiguous()?.apply_op1(SegmentSum { owner: owner.to_vec(), segments })
    } else {
        segment_sum_reference(x, owner, segments)
    }
}

/// The same from differentiable candle primitives (other devices and dtypes; tests): a
/// (segments, R) 0/1 matrix times x, in f32.
pub fn segment_sum_reference(x: &Tensor, owner: &[usize], segments: usize) -> Result<Tensor> {
    let r = owner.len();
    let mut m = vec![0f32; segments * r];
    for (j, &s) in owner.iter().enumerate() {
        m[s * r + j] = 1.0;
    }
    let m = Tensor::from_vec(m, (segments, r), x.device())?;
    m.matmul(&x.to_dtype(DType::F32)?.unsqueeze(1)?)?.squeeze(1)
}

struct SegmentSum {
    owner: Vec<usize>,
    segments: usize,
}

impl CustomOp1 for SegmentSum {
    fn name(&self) -> &'static str {
        "segment-sum"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "segment-sum")?;
        let mut sums = vec![0f64; self.segments];
        for (&v, &s) in x.iter().zip(&self.owner) {
            sums[s] += v as f64;
        }
        Ok((CpuStorage::F32(sums.into_iter().map(|v| v as f32).collect()), Shape::from_dims(&[self.segments])))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dy: Vec<f32> = dy.to_dtype(DType::F32)?.to_vec1()?;
        let dx: Vec<f32> = self.owner.iter().map(|&s| dy[s]).collect();
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}
