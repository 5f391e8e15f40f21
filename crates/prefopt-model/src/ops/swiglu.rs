//! SwiGLU's gate, `silu(g) * u`, as one node (the composition is two, with a temporary):
//!   s = sigmoid(g),  y = g s u,  dg = dy u s (1 + g (1 - s)),  du = dy g s.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::{contiguous_f32, fused, par_chunks, with_f32, SharedMut};

/// `silu(gate) * up`, elementwise; both the same shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused(&[gate, up]) && gate.shape() == up.shape() {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
    } else {
        swiglu_reference(gate, up)
    }
}

/// The same from differentiable candle primitives (other devices and dtypes; tests).
pub fn swiglu_reference(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

struct SwiGlu;

/// Parallel elementwise map over equal-length slices, into a new vector.
fn map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    let ptr = SharedMut(out.as_mut_ptr());
    par_chunks(a.len(), 1 << 14, |start, end| {
        // SAFETY: elements start..end of out belong to this chunk alone.
        let out = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(start), end - start) };
        for ((o, x), y) in out.iter_mut().zip(&a[start..end]).zip(&b[start..end]) {
            *o = f(*x, *y);
        }
    });
    out
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, us: &CpuStorage, ul: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (contiguous_f32(gs, gl, "swiglu")?, contiguous_f32(us, ul, "swiglu")?);
        // candle's silu: g / (1 + exp(-g)).
        Ok((CpuStorage::F32(map2(g, u, |g, u| g / (1.0 + (-g).exp()) * u)), gl.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_f32(g, "swiglu", |g| {
            with_f32(u, "swiglu", |u| {
                with_f32(dy, "swiglu", |dy| {
                    let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
                    let (dg_ptr, du_ptr) = (SharedMut(dg.as_mut_ptr()), SharedMut(du.as_mut_ptr()));
                    par_chunks(g.len(), 1 << 14, |start, end| {
                        // SAFETY: elements start..end of dg and du belong to this chunk alone.
                        let dg = unsafe { std::slice::from_raw_parts_mut(dg_ptr.get().add(start), end - start) };
                        let du = unsafe { std::slice::from_raw_parts_mut(du_ptr.get().add(start), end - start) };
                        for i in 0..end - start {
                            let (gv, uv, dyv) = (g[start + i], u[start + i], dy[start + i]);
                            let s = 1.0 / (1.0 + (-gv).exp());
                            dg[i] = dyv * uv * s * (1.0 + gv * (1.0 - s));
                            du[i] = dyv * gv * s;
                        }
                    });
                    Ok((dg, du))
                })
            })
        })?;
        Ok((Some(Tensor::from_vec(dg, g.shape(), g.device())?), Some(Tensor::from_vec(du, u.shape(), u.device())?)))
    }
}
