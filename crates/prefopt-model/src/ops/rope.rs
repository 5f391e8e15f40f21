//! Rotary position embedding (transformers' "rotate half" layout) as one node, applied in
//! the projections' own layout.
//!
//! The composition narrows each head into halves, negates one, concatenates them back
//! (`rotate_half`) and needs the heads transposed to (B, heads, T, D) first; every one of
//! those is an autograd node with a full-size copy. Here x stays (rows, heads * D) as the
//! linear layer wrote it, and the backward pass is the inverse rotation (by -angle):
//!   y1 = x1 cos - x2 sin,   y2 = x2 cos + x1 sin        (forward, per head, halves 1 and 2)
//!   dx1 = dy1 cos + dy2 sin, dx2 = dy2 cos - dy1 sin     (backward)

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};

use super::{contiguous_f32, fused, par_chunks, with_f32, SharedMut};

/// Rotates x (R, heads * D), rows R = B * T in (batch, time) order, by the angles in cos and
/// sin (P, D), each row duplicated over the two halves (see `Rope::tables`). Row r uses table
/// row r % P: P = T gives every sequence the same positions, P = R one position per row.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused(&[x, cos, sin]) {
        x.contiguous()?.apply_op1(Rope { cos: cos.contiguous()?, sin: sin.contiguous()?, inverse: false })
    } else {
        rope_reference(x, cos, sin)
    }
}

/// The same from differentiable candle primitives (other devices and dtypes; tests).
pub fn rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (r, f) = x.dims2()?;
    let (p, d) = cos.dims2()?;
    let heads = f / d;
    // (R, F) -> (R/P, P, heads, D) -> heads before positions, so the tables broadcast.
    let x = x.reshape((r / p, p, heads, d))?.transpose(1, 2)?;
    let (cos, sin) = (cos.reshape((1, 1, p, d))?, sin.reshape((1, 1, p, d))?);
    let half = d / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let y = (x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?;
    y.transpose(1, 2)?.reshape((r, f))
}

struct Rope {
    cos: Tensor, // (P, D)
    sin: Tensor, // (P, D)
    /// Rotate by -angle (the backward pass).
    inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "rope")?;
        let (rows, f) = layout.shape().dims2()?;
        let (p, d) = self.cos.dims2()?;
        if f % d != 0 || rows % p != 0 || d % 2 != 0 {
            bail!("rope: x {:?} does not fit tables ({p}, {d})", layout.shape());
        }
        let half = d / 2;
        let mut y = vec![0f32; x.len()];
        let out = SharedMut(y.as_mut_ptr());
        with_f32([&self.cos, &self.sin], "rope", |[cos, sin]| {
            let sign = if self.inverse { -1f32 } else { 1f32 };
            par_chunks(rows, 64, |start, end| {
                // SAFETY: rows start..end of y belong to this chunk alone.
                let y = unsafe { std::slice::from_raw_parts_mut(out.get().add(start * f), (end - start) * f) };
                for (r, (xr, yr)) in x[start * f..end * f].chunks_exact(f).zip(y.chunks_exact_mut(f)).enumerate() {
                    let t = (start + r) % p;
                    let (c, s) = (&cos[t * d..t * d + half], &sin[t * d..t * d + half]);
                    for (xh, yh) in xr.chunks_exact(d).zip(yr.chunks_exact_mut(d)) {
                        let (x1, x2) = xh.split_at(half);
                        let (y1, y2) = yh.split_at_mut(half);
                        for i in 0..half {
                            let si = sign * s[i];
                            y1[i] = x1[i] * c[i] - x2[i] * si;
                            y2[i] = x2[i] * c[i] + x1[i] * si;
                        }
                    }
                }
            });
            Ok(())
        })?;
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Rope { cos: self.cos.clone(), sin: self.sin.clone(), inverse: !self.inverse };
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}
