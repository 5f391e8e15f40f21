//! Each fused op (`prefopt_model::ops`) against its plain-candle composition: the same
//! values, and the same gradients for every input, through candle's own autograd.

//! (The fused kernels run on the CPU: this module always tests there.)

use candle_core::{Device, Tensor, Var};
use prefopt_model::ops::{self, AttentionMask, PackedSpan};
use rand::{Rng, SeedableRng};

const TOL: f32 = 2e-5;

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let scale = b.iter().fold(1f32, |m, x| m.max(x.abs()));
    a.iter().zip(&b).map(|(x, y)| (x - y).abs() / scale).fold(0.0, f32::max)
}

/// Runs `f` (fused) and `g` (reference) on fresh variables holding `inputs`, weights each
/// output element by a fixed random factor, and compares outputs and every input gradient.
fn check(name: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor, g: impl Fn(&[Tensor]) -> Tensor) {
    let run = |op: &dyn Fn(&[Tensor]) -> Tensor| {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = op(&ts);
        let weights = random(y.dims(), 99);
        let grads = (&y * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let dx: Vec<Tensor> = vars.iter().map(|v| grads.get(v).expect("every input gets a gradient").clone()).collect();
        (y, dx)
    };
    let (y, dx) = run(&f);
    let (y_ref, dx_ref) = run(&g);
    let diff = max_rel_diff(&y, &y_ref);
    assert!(diff < TOL, "{name}: output differs by {diff}");
    for (i, (a, b)) in dx.iter().zip(&dx_ref).enumerate() {
        let diff = max_rel_diff(a, b);
        assert!(diff < TOL, "{name}: gradient of input {i} differs by {diff}");
    }
}

#[test]
fn rms_norm_matches_the_composition_values_and_gradients() {
    let inputs = [random(&[37, 24], 1), random(&[24], 2)];
    check(
        "rms_norm",
        &inputs,
        |t| ops::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
        |t| ops::rms_norm_reference(&t[0], &t[1], 1e-5).unwrap(),
    );
}

/// cos/sin tables (P, D) with the halves duplicated, as `Rope::tables` builds them.
fn tables(p: usize, d: usize) -> (Tensor, Tensor) {
    let angles: Vec<f32> = (0..p).flat_map(|i| (0..d).map(move |j| (i * (j % (d / 2) + 1)) as f32 * 0.37)).collect();
    let a = Tensor::from_vec(angles, (p, d), &Device::Cpu).unwrap();
    (a.cos().unwrap(), a.sin().unwrap())
}

#[test]
fn rope_matches_the_composition_for_shared_and_per_row_positions() {
    let (b, t, heads, d) = (3, 5, 4, 8);
    for p in [t, b * t] {
        let (cos, sin) = tables(p, d);
        check(
            &format!("rope P={p}"),
            &[random(&[b * t, heads * d], 3)],
            |x| ops::rope(&x[0], &cos, &sin).unwrap(),
            |x| ops::rope_reference(&x[0], &cos, &sin).unwrap(),
        );
    }
}

#[test]
fn swiglu_matches_the_composition_values_and_gradients() {
    let inputs = [random(&[9, 33], 4), random(&[9, 33], 5)];
    check("swiglu", &inputs, |t| ops::swiglu(&t[0], &t[1]).unwrap(), |t| ops::swiglu_reference(&t[0], &t[1]).unwrap());
}

#[test]
fn token_logps_match_the_composition_for_contiguous_and_transposed_heads() {
    let (rows, c, v) = (13, 16, 40);
    let targets: Vec<u32> = (0..rows as u32).map(|i| (i * 7) % v as u32).collect();
    // The LM head as a contiguous (C, V) matrix, and as the transposed view of a (V, C)
    // embedding (a tied model's), both with gradients.
    check(
        "token_logps",
        &[random(&[rows, c], 6), random(&[c, v], 7)],
        |x| ops::token_logps(&x[0], &x[1], &targets).unwrap(),
        |x| ops::token_logps_reference(&x[0], &x[1], &targets).unwrap(),
    );
    check(
        "token_logps (tied)",
        &[random(&[rows, c], 6), random(&[v, c], 8)],
        |x| ops::token_logps(&x[0], &x[1].t().unwrap(), &targets).unwrap(),
        |x| ops::token_logps_reference(&x[0], &x[1].t().unwrap(), &targets).unwrap(),
    );
}

#[test]
fn token_logps_over_several_chunks_equal_one_chunk() {
    // 2^24 logits per chunk: a vocabulary of 2^18 puts 64 rows in a chunk, so 150 rows take
    // three chunks; the result must not depend on where the chunks split.
    let (rows, c, v) = (150, 4, 1 << 18);
    let targets: Vec<u32> = (0..rows as u32).map(|i| (i * 7919) % v as u32).collect();
    let h = random(&[rows, c], 9);
    let w = random(&[c, v], 10);
    let fused: Vec<f32> = ops::token_logps(&h, &w, &targets).unwrap().to_vec1().unwrap();
    let one: Vec<f32> = (0..rows)
        .map(|r| {
            ops::token_logps(&h.narrow(0, r, 1).unwrap(), &w, &targets[r..r + 1]).unwrap().to_vec1::<f32>().unwrap()[0]
        })
        .collect();
    assert_eq!(fused, one);
}

#[test]
fn segment_sums_match_the_composition_values_and_gradients() {
    let owner = [0, 0, 2, 2, 2, 1, 0, 3, 3];
    check(
        "segment_sum",
        &[random(&[owner.len()], 11)],
        |x| ops::segment_sum(&x[0], &owner, 5).unwrap(),
        |x| ops::segment_sum_reference(&x[0], &owner, 5).unwrap(),
    );
}

/// Attention of q over k, v for every mask shape the model uses.
fn check_attention(name: &str, batch: usize, t: usize, heads: usize, kv_heads: usize, mask: AttentionMask) {
    let d = 8;
    let s = mask.past + t;
    let inputs = [
        random(&[batch * t, heads * d], 7),
        random(&[batch * s, kv_heads * d], 8),
        random(&[batch * s, kv_heads * d], 9),
    ];
    check(
        name,
        &inputs,
        |x| ops::causal_attention(&x[0], &x[1], &x[2], batch, heads, kv_heads, &mask).unwrap(),
        |x| ops::causal_attention_reference(&x[0], &x[1], &x[2], batch, heads, kv_heads, &mask).unwrap(),
    );
}

#[test]
fn attention_matches_the_composition_causal_gqa_cached_and_padded() {
    check_attention("mha", 2, 6, 4, 4, AttentionMask::default());
    check_attention("gqa", 2, 6, 4, 2, AttentionMask::default());
    check_attention("mqa", 3, 5, 4, 1, AttentionMask::default());
    check_attention("past", 2, 3, 4, 2, AttentionMask { past: 4, ..Default::default() });
    check_attention("one new token", 2, 1, 4, 2, AttentionMask { past: 6, ..Default::default() });
    check_attention("padded", 3, 6, 4, 2, AttentionMask { pad_lens: vec![0, 2, 5], ..Default::default() });
    check_attention("padded past", 2, 2, 2, 1, AttentionMask { past: 3, pad_lens: vec![4, 1], ..Default::default() });
    // Longer than one causal row block (32 rows): full, partial last block, after a past.
    check_attention("row blocks", 2, 70, 4, 2, AttentionMask::default());
    check_attention(
        "row blocks past padded",
        2,
        40,
        2,
        1,
        AttentionMask { past: 5, pad_lens: vec![0, 9], ..Default::default() },
    );
}

/// Spans tiling a packed row: (len, shared prompt) per span, `None` for a single sequence;
/// a pair's completions are split evenly after its prompt.
fn spans(shape: &[(usize, Option<usize>)]) -> Vec<PackedSpan> {
    let mut start = 0;
    shape
        .iter()
        .map(|&(len, prefix)| {
            let span = match prefix {
                None => PackedSpan::single(start, len),
                Some(p) => PackedSpan { start, len, prefix: p, fork: p + (len - p) / 2 },
            };
            start += len;
            span
        })
        .collect()
}

#[test]
fn packed_attention_matches_the_composition() {
    let packed = |shape: &[(usize, Option<usize>)]| AttentionMask::packed(spans(shape));
    let row = |shape: &[(usize, Option<usize>)]| shape.iter().map(|s| s.0).sum::<usize>();
    for (name, shape) in [
        ("singles", vec![(5, None), (1, None), (7, None)]),
        ("shared prompts", vec![(9, Some(3)), (4, None), (7, Some(1))]),
        ("empty prompt", vec![(6, Some(0))]),
        // Longer than a row block on both sides of the fork, and a one-token second part.
        ("row blocks", vec![(150, Some(40)), (83, Some(81)), (40, None)]),
    ] {
        check_attention(name, 1, row(&shape), 4, 2, packed(&shape));
    }
}

#[test]
fn packed_spans_attend_like_their_sequences_run_alone() {
    // A pair [prompt, chosen, rejected] packed with a plain sequence equals three separate
    // causal runs: [prompt, chosen], [prompt, rejected] and the plain one.
    let (heads, kv_heads, d) = (4, 2, 8);
    let (p, c, r, n) = (5, 4, 38, 6);
    let total = p + c + r + n;
    let mask = AttentionMask::packed(vec![
        PackedSpan { start: 0, len: p + c + r, prefix: p, fork: p + c },
        PackedSpan::single(p + c + r, n),
    ]);
    let q = random(&[total, heads * d], 1);
    let k = random(&[total, kv_heads * d], 2);
    let v = random(&[total, kv_heads * d], 3);
    let y = ops::causal_attention(&q, &k, &v, 1, heads, kv_heads, &mask).unwrap();
    let alone = |rows: &[(usize, usize)]| {
        let pick = |x: &Tensor| {
            Tensor::cat(&rows.iter().map(|&(a, b)| x.narrow(0, a, b - a).unwrap()).collect::<Vec<_>>(), 0).unwrap()
        };
        ops::causal_attention(&pick(&q), &pick(&k), &pick(&v), 1, heads, kv_heads, &AttentionMask::default()).unwrap()
    };
    let chosen = alone(&[(0, p + c)]);
    let rejected = alone(&[(0, p), (p + c, p + c + r)]);
    let plain = alone(&[(p + c + r, total)]);
    let close = |a: &Tensor, b: &Tensor, what: &str| {
        let diff = max_rel_diff(a, b);
        assert!(diff < 1e-6, "{what}: differs by {diff}");
    };
    close(&y.narrow(0, 0, p + c).unwrap(), &chosen, "prompt and chosen");
    close(&y.narrow(0, p + c, r).unwrap(), &rejected.narrow(0, p, r).unwrap(), "rejected");
    close(&y.narrow(0, p + c + r, n).unwrap(), &plain, "plain sequence");
    // Spans that do not tile the row are refused.
    let bad = AttentionMask::packed(vec![PackedSpan::single(0, 3)]);
    assert!(ops::causal_attention(&q, &k, &v, 1, heads, kv_heads, &bad).is_err());
}

#[test]
fn attention_reads_a_strided_cache_view_like_a_contiguous_one() {
    // Keys/values as a KV cache holds them: (B, KV, capacity, D) buffers, of which the first
    // S positions are the view attention reads.
    let (batch, t, heads, kv_heads, d, s, capacity) = (2, 2, 4, 2, 8, 5, 9);
    let mask = AttentionMask { past: s - t, ..Default::default() };
    let q = random(&[batch * t, heads * d], 10);
    let k_buf = random(&[batch, kv_heads, capacity, d], 11);
    let v_buf = random(&[batch, kv_heads, capacity, d], 12);
    let (k, v) = (k_buf.narrow(2, 0, s).unwrap(), v_buf.narrow(2, 0, s).unwrap());
    for t_new in [t, 1] {
        let mask = AttentionMask { past: s - t_new, ..mask.clone() };
        let q = q.narrow(0, 0, batch * t_new).unwrap();
        let fused = ops::causal_attention(&q, &k, &v, batch, heads, kv_heads, &mask).unwrap();
        // The same keys in the projections' (B*S, KV*D) layout.
        let rows =
            |x: &Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap().reshape((batch * s, kv_heads * d)).unwrap();
        let reference =
            ops::causal_attention_reference(&q, &rows(&k), &rows(&v), batch, heads, kv_heads, &mask).unwrap();
        let diff = max_rel_diff(&fused, &reference);
        assert!(diff < TOL, "strided cache view, {t_new} new positions: differs by {diff}");
    }
}

#[test]
fn lora_linear_matches_the_composition_with_frozen_and_trainable_terms_and_dropout() {
    let (rows, inp, out) = (23, 16, 12);
    // The base weight and two frozen terms as constants (transposed views, as the model
    // passes them); the trainable term's A^T and B^T are inputs, also as transposed views.
    let weight_t = random(&[out, inp], 11).t().unwrap();
    let frozen = |seed: u64, r: usize, scale: f64| ops::LowRank {
        a_t: random(&[r, inp], seed).t().unwrap(),
        b_t: random(&[out, r], seed + 1).t().unwrap(),
        scale,
        mask: None,
    };
    let frozen = [frozen(12, 3, 0.7), frozen(14, 2, -0.2)];
    let mask = Tensor::from_vec(
        (0..rows * inp).map(|i| if (i * 7919) % 5 == 0 { 0.0 } else { 1.25 }).collect::<Vec<f32>>(),
        (rows, inp),
        &Device::Cpu,
    )
    .unwrap();
    for with_mask in [false, true] {
        let terms = |t: &[Tensor]| {
            let mut all = frozen.to_vec();
            all.push(ops::LowRank {
                a_t: t[1].t().unwrap(),
                b_t: t[2].t().unwrap(),
                scale: 2.0,
                mask: with_mask.then(|| mask.clone()),
            });
            all
        };
        check(
            &format!("lora_linear mask={with_mask}"),
            &[random(&[rows, inp], 16), random(&[4, inp], 17), random(&[out, 4], 18)],
            |t| ops::lora_linear(&t[0], &weight_t, &terms(t)).unwrap(),
            |t| ops::lora_linear_reference(&t[0], &weight_t, &terms(t)).unwrap(),
        );
    }
    // Frozen terms only: the input's gradient alone.
    check(
        "lora_linear frozen",
        &[random(&[rows, inp], 19)],
        |t| ops::lora_linear(&t[0], &weight_t, &frozen).unwrap(),
        |t| ops::lora_linear_reference(&t[0], &weight_t, &frozen).unwrap(),
    );
}
