//! SwiGLU's gate, `silu(g) * u`, as one node (the composition is two, with a temporary):
//!   s = sigmoid(g),  y = g s u,  dg = dy u s (1 + g (1 - s)),  du = dy g s.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::fast_exp::exp_in_place;
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

/// Elements per batch of `exp` calls (a buffer that stays in L1).
const LANES: usize = 256;

/// Runs `f(range, denominators)` over `0..n` in parallel chunks, in pieces of at most LANES
/// elements, where `denominators[i] = 1 + exp(-g[i])` for the piece (sigmoid = 1 / that).
fn for_each_piece(g: &[f32], f: impl Fn(usize, &[f32]) + Sync) {
    par_chunks(g.len(), 1 << 14, |start, end| {
        let mut den = [0f32; LANES];
        for lo in (start..end).step_by(LANES) {
            let hi = (lo + LANES).min(end);
            let den = &mut den[..hi - lo];
            den.iter_mut().zip(&g[lo..hi]).for_each(|(e, g)| *e = -g);
            exp_in_place(den);
            den.iter_mut().for_each(|e| *e += 1.0);
            f(lo, den);
        }
    });
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, us: &CpuStorage, ul: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (contiguous_f32(gs, gl, "swiglu")?, contiguous_f32(us, ul, "swiglu")?);
        let mut y = vec![0f32; g.len()];
        let ptr = SharedMut(y.as_mut_ptr());
        for_each_piece(g, |lo, den| {
            // SAFETY: elements lo..lo+den.len() of y belong to this piece alone.
            let y = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(lo), den.len()) };
            // candle's silu: g / (1 + exp(-g)).
            for (i, (y, den)) in y.iter_mut().zip(den).enumerate() {
                *y = g[lo + i] / den * u[lo + i];
            }
        });
        Ok((CpuStorage::F32(y), gl.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_f32([g, u, dy], "swiglu", |[g, u, dy]| {
            let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
            let (dg_ptr, du_ptr) = (SharedMut(dg.as_mut_ptr()), SharedMut(du.as_mut_ptr()));
            for_each_piece(g, |lo, den| {
                // SAFETY: elements lo..lo+den.len() of dg and du belong to this piece alone.
                let dg = unsafe { std::slice::from_raw_parts_mut(dg_ptr.get().add(lo), den.len()) };
                let du = unsafe { std::slice::from_raw_parts_mut(du_ptr.get().add(lo), den.len()) };
                for (i, den) in den.iter().enumerate() {
                    let (gv, uv, dyv) = (g[lo + i], u[lo + i], dy[lo + i]);
                    let s = 1.0 / den;
                    dg[i] = dyv * uv * s * (1.0 + gv * (1.0 - s));
                    du[i] = dyv * gv * s;
                }
            });
            Ok((dg, du))
        })?;
        Ok((Some(Tensor::from_vec(dg, g.shape(), g.device())?), Some(Tensor::from_vec(du, u.shape(), u.device())?)))
    }
}
