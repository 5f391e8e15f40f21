//! The long reductions at the sizes real checkpoints have, against f64: the log-softmax over a
//! 49k vocabulary, RMSNorm over a 4096 hidden size with an outlier dimension, attention's
//! softmax over 1,024 keys, and a 500-token sequence's summed log-prob. On the fixtures'
//! sizes (vocab 512, hidden 64) an f32 running sum is exact enough; at these it is not: the
//! sequential f32 log-sum-exp biased a 30-layer, 49k-vocabulary model's log-probs by +1e-4
//! nats per token (docs/real_checkpoints.md).

use candle_core::{Device, Tensor};
use prefopt_model::ops::{self, AttentionMask};
use rand::{Rng, SeedableRng};

fn normal(rng: &mut impl Rng) -> f64 {
    let (u1, u2): (f64, f64) = (1.0 - rng.gen::<f64>(), rng.gen());
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn the_vocabulary_log_softmax_is_exact_to_f32_rounding_at_49k_tokens() {
    // Logits like a trained model's: the target and a few others far above a long tail, so
    // most of the 49k exponentials are below half an ulp of the running sum.
    let (rows, v) = (32, 49_152);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let targets: Vec<u32> = (0..rows as u32).map(|r| (r * 1543) % v as u32).collect();
    let mut logits = vec![0f32; rows * v];
    for (r, row) in logits.chunks_mut(v).enumerate() {
        for x in row.iter_mut() {
            *x = (2.0 * normal(&mut rng)) as f32;
        }
        row[targets[r] as usize] += 16.0;
        row[(targets[r] as usize + 1) % v] += 14.0;
    }
    // h = identity rows picking logit columns: h (R, R) I, W^T (R, V) = the logits.
    let eye: Vec<f32> = (0..rows * rows).map(|i| if i / rows == i % rows { 1.0 } else { 0.0 }).collect();
    let lp: Vec<f32> = ops::token_logps(&tensor(&eye, &[rows, rows]), &tensor(&logits, &[rows, v]), &targets)
        .unwrap()
        .to_vec1()
        .unwrap();
    let (mut worst, mut bias) = (0f64, 0f64);
    for (r, row) in logits.chunks(v).enumerate() {
        let m = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
        let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
        let want = row[targets[r] as usize] as f64 - m - z.ln();
        let err = lp[r] as f64 - want;
        worst = worst.max(err.abs());
        bias += err / rows as f64;
    }
    eprintln!("log-softmax at V = {v}: max error {worst:.2e}, mean signed {bias:.2e} nats");
    assert!(worst < 2e-7 && bias.abs() < 5e-8, "max {worst:e}, bias {bias:e}");
}

#[test]
fn rms_norm_is_exact_to_f32_rounding_at_hidden_4096_with_an_outlier() {
    let (rows, c) = (8, 4096);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let mut x: Vec<f32> = (0..rows * c).map(|_| normal(&mut rng) as f32).collect();
    for r in 0..rows {
        x[r * c + 17] = 300.0; // a massive-activation dimension, as real residual streams have
    }
    let w: Vec<f32> = (0..c).map(|_| 1.0 + 0.1 * normal(&mut rng) as f32).collect();
    let y: Vec<f32> = ops::rms_norm(&tensor(&x, &[rows, c]), &tensor(&w, &[c]), 1e-5)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut worst = 0f64;
    for (r, xr) in x.chunks(c).enumerate() {
        let ms = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / c as f64;
        let inv = 1.0 / (ms + 1e-5).sqrt();
        for (i, &xv) in xr.iter().enumerate() {
            let want = w[i] as f64 * xv as f64 * inv;
            worst = worst.max((y[r * c + i] as f64 - want).abs() / want.abs().max(1e-3));
        }
    }
    eprintln!("rms_norm at C = {c}: max relative error {worst:.2e}");
    assert!(worst < 4e-7, "{worst:e}");
}

#[test]
fn attention_is_exact_to_f32_rounding_over_1024_keys() {
    let (t, heads, d) = (1024, 2, 64);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| normal(&mut rng) as f32).collect() };
    let (q, k, v) = (draw(t * heads * d), draw(t * heads * d), draw(t * heads * d));
    let y: Vec<f32> = ops::causal_attention(
        &tensor(&q, &[t, heads * d]),
        &tensor(&k, &[t, heads * d]),
        &tensor(&v, &[t, heads * d]),
        1,
        heads,
        heads,
        &AttentionMask::default(),
    )
    .unwrap()
    .flatten_all()
    .unwrap()
    .to_vec1()
    .unwrap();
    let f = heads * d;
    let scale = 1.0 / (d as f64).sqrt();
    let mut worst = 0f64;
    for h in 0..heads {
        for i in (0..t).step_by(97).chain([t - 1]) {
            let s: Vec<f64> = (0..=i)
                .map(|j| scale * (0..d).map(|e| q[i * f + h * d + e] as f64 * k[j * f + h * d + e] as f64).sum::<f64>())
                .collect();
            let m = s.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            for e in 0..d {
                let want: f64 =
                    s.iter().enumerate().map(|(j, x)| (x - m).exp() / z * v[j * f + h * d + e] as f64).sum();
                worst = worst.max((y[i * f + h * d + e] as f64 - want).abs());
            }
        }
    }
    eprintln!("attention over {t} keys: max absolute error {worst:.2e}");
    assert!(worst < 2e-6, "{worst:e}");
}

#[test]
fn a_long_sequences_summed_log_prob_is_the_correctly_rounded_f64_sum() {
    // An unlikely first token, then 999 likely ones: every later term is far below the
    // running total's ulp, where an f32 running sum rounds at each step.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let x: Vec<f32> = std::iter::once(-300.0).chain((0..999).map(|_| -(rng.gen::<f32>() * 0.01))).collect();
    let owner = vec![0usize; x.len()];
    let got: Vec<f32> = ops::segment_sum(&tensor(&x, &[x.len()]), &owner, 1).unwrap().to_vec1().unwrap();
    let want = x.iter().map(|&v| v as f64).sum::<f64>() as f32;
    assert_eq!(got[0], want);
}
