//! Sampling completions from a model: one left-padded batch of prompts, one KV cache,
//! temperature / top-k / top-p as in transformers, every random choice from a per-sequence
//! generator so a sequence's tokens do not depend on what else is in the batch.
//!
//! Shapes: B sequences in the batch, T prompt length after padding, V vocab.

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{ModelError, Result};
use crate::llama::{KvCache, Llama};

/// How to pick each next token. The filters apply in transformers' order: temperature,
/// then top-k, then top-p.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits before sampling; 0 means greedy (argmax, first index on ties).
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability sums
    /// to at least `top_p` (always at least one token); 1 keeps everything.
    pub top_p: f64,
    /// Keep only the `top_k` most likely tokens (and any tied with the k-th); 0 keeps all.
    pub top_k: usize,
    /// At most this many new tokens per sequence (the stop token included).
    pub max_new_tokens: usize,
    /// Generation of a sequence ends right after it samples one of these (EOS, end of turn).
    pub stop_ids: Vec<u32>,
    /// The id prompts are left-padded with (never attended to, so it changes no result; the
    /// tokenizer's `padding_id`).
    pub pad_id: u32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 1.0, top_p: 1.0, top_k: 0, max_new_tokens: 256, stop_ids: Vec::new(), pad_id: 0 }
    }
}

impl SamplingParams {
    /// Checks the values; the message names the offending field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be a finite number >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.max_new_tokens == 0 {
            return Err("max_new_tokens must be at least 1".into());
        }
        Ok(())
    }
}

/// One sampled completion.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    /// The completion's tokens, ending with the stop token when one was sampled.
    pub tokens: Vec<u32>,
    /// Sum over `tokens` of log p(token | prefix) under the model's own distribution:
    /// temperature 1, no top-k/top-p filtering, whatever the sampling settings were. This is
    /// the sequence log-probability that KL estimates and SPPO-style objectives need (it
    /// equals summing `log_softmax` of a full forward pass over the tokens), not the
    /// log-probability under the filtered sampling distribution.
    pub logprob: f64,
    /// Whether the sequence ended on a stop id (false: it ran out of `max_new_tokens` or of
    /// the model's context, `max_position_embeddings`).
    pub stopped: bool,
}

/// The random generator of one sampled sequence: ChaCha8 seeded with `seed`, on its own
/// `stream`. The CLI uses stream `prompt_index * num_samples + sample`, so a sample's
/// tokens depend only on (seed, its prompt, its sample number), not on batching.
pub fn sample_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Samples `k = rngs.len() / prompts.len()` completions of each prompt, all in one batch.
///
/// Sequence `i * k + j` (the output's order) is sample `j` of prompt `i` and draws its
/// randomness only from `rngs[i * k + j]`, one uniform number per sampled token (none when
/// greedy). The prompts are left-padded with `params.pad_id` (never attended to) and prefilled
/// once; their caches are copied to their `k` samples. A sequence leaves the batch when it
/// samples a stop id, reaches `max_new_tokens`, or fills the model's context.
pub fn generate<R: Rng>(
    model: &Llama,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    rngs: &mut [R],
) -> Result<Vec<Generated>> {
    let pad_id = params.pad_id;
    params.validate().map_err(msg)?;
    let n = prompts.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let k = rngs.len() / n;
    if k == 0 || k * n != rngs.len() {
        return Err(msg(format!("{} random generators for {n} prompts: need k per prompt", rngs.len())));
    }
    let max_pos = model.config().max_position_embeddings;
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(msg(format!("prompt {i} has no tokens")));
        }
        if p.len() >= max_pos {
            return Err(msg(format!(
                "prompt {i} has {} tokens, leaving no room to generate within the model's \
                 max_position_embeddings ({max_pos})",
                p.len()
            )));
        }
    }

    // Prefill the distinct prompts, left-padded to the longest.
    let device = model.device();
    let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let prompt_pads: Vec<usize> = prompts.iter().map(|p| t - p.len()).collect();
    let mut ids = Vec::with_capacity(n * t);
    for (p, &pad) in prompts.iter().zip(&prompt_pads) {
        ids.extend(std::iter::repeat_n(pad_id, pad));
        ids.extend_from_slice(p);
    }
    let ids = Tensor::from_vec(ids, (n, t), device)?;
    let mut cache = KvCache::default();
    let h = model.hidden_states(&ids, &prompt_pads, Some(&mut cache))?.narrow(1, t - 1, 1)?;
    let prompt_logits: Vec<Vec<f32>> = model.logits(&h)?.squeeze(1)?.to_vec2()?; // (n, V)

    // One batch row per sequence from here on; `active` maps batch rows to sequences.
    let mut out: Vec<Generated> =
        (0..n * k).map(|_| Generated { tokens: Vec::new(), logprob: 0.0, stopped: false }).collect();
    let mut active: Vec<usize> = (0..n * k).collect();
    if k > 1 {
        let rows: Vec<u32> = active.iter().map(|&s| (s / k) as u32).collect();
        cache.select_rows(&rows)?;
    }
    let mut logits: Vec<Vec<f32>> = active.iter().map(|&s| prompt_logits[s / k].clone()).collect();
    loop {
        let mut keep = Vec::with_capacity(active.len()); // batch rows that go on
        for (row, &s) in active.iter().enumerate() {
            let row_logits = &logits[row];
            let token = sample(row_logits, params, &mut rngs[s]).map_err(|e| msg(format!("sequence {s}: {e}")))?;
            let g = &mut out[s];
            g.logprob += log_softmax_at(row_logits, token as usize);
            g.tokens.push(token);
            g.stopped = params.stop_ids.contains(&token);
            let full = g.tokens.len() == params.max_new_tokens || prompts[s / k].len() + g.tokens.len() == max_pos;
            if !g.stopped && !full {
                keep.push(row);
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() < active.len() {
            cache.select_rows(&keep.iter().map(|&r| r as u32).collect::<Vec<_>>())?;
            active = keep.iter().map(|&r| active[r]).collect();
        }
        let last: Vec<u32> = active.iter().map(|&s| *out[s].tokens.last().unwrap_or(&pad_id)).collect();
        let pads: Vec<usize> = active.iter().map(|&s| prompt_pads[s / k]).collect();
        let input = Tensor::from_vec(last, (active.len(), 1), device)?;
        let h = model.hidden_states(&input, &pads, Some(&mut cache))?;
        logits = model.logits(&h)?.squeeze(1)?.to_vec2()?;
    }
    Ok(out)
}

fn msg(message: impl Into<String>) -> ModelError {
    candle_core::Error::Msg(format!("generate: {}", message.into())).into()
}

/// `log_softmax(logits)[token]` in f64.
pub fn log_softmax_at(logits: &[f32], token: usize) -> f64 {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let z: f64 = logits.iter().map(|&l| (l as f64 - m).exp()).sum();
    logits[token] as f64 - m - z.ln()
}

/// Picks the next token from one row of logits (V,), drawing one uniform number from `rng`
/// unless greedy (temperature 0: the first maximum).
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut impl Rng) -> std::result::Result<u32, String> {
    if logits.iter().any(|l| l.is_nan()) {
        return Err("the model produced NaN logits".into());
    }
    if params.temperature == 0.0 {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        return Ok(best as u32);
    }
    let dist = sampling_distribution(logits, params);
    let mut u = rng.gen::<f64>();
    for &(token, p) in &dist {
        if u < p {
            return Ok(token);
        }
        u -= p;
    }
    // Rounding left u just above the last probability: take the last token with any mass.
    Ok(dist.iter().rev().find(|d| d.1 > 0.0).map_or(dist[0].0, |d| d.0))
}

/// The distribution sampling draws from (temperature > 0): the tokens that survive top-k
/// and top-p with their renormalized probabilities, in f64, in the order a draw walks them
/// (most likely first when a filter applied, else by token id).
pub fn sampling_distribution(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f64)> {
    let scaled: Vec<f64> = logits.iter().map(|&l| l as f64 / params.temperature).collect();
    let v = scaled.len();
    let by_score = |a: &u32, b: &u32| scaled[*b as usize].total_cmp(&scaled[*a as usize]).then(a.cmp(b));

    let top_k = if params.top_k == 0 { v } else { params.top_k.min(v) };
    let mut candidates: Vec<u32> = (0..v as u32).collect();
    if top_k < v {
        candidates.select_nth_unstable_by(top_k - 1, by_score);
        // transformers keeps every token tied with the k-th.
        let kth = scaled[candidates[top_k - 1] as usize];
        candidates.retain(|&i| scaled[i as usize] >= kth);
    }
    let m = candidates.iter().map(|&i| scaled[i as usize]).fold(f64::NEG_INFINITY, f64::max);
    let mut dist: Vec<(u32, f64)> = candidates.iter().map(|&i| (i, (scaled[i as usize] - m).exp())).collect();
    let total: f64 = dist.iter().map(|d| d.1).sum();
    dist.iter_mut().for_each(|d| d.1 /= total);
    if params.top_p < 1.0 {
        // Sort only as many of the most likely tokens as the nucleus needs: the top 64,
        // then 4x more until they hold top_p of the mass (a full sort of a 150k vocabulary
        // per token would dominate a decode step).
        let desc = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let mut m = dist.len().min(64);
        loop {
            if m < dist.len() {
                dist.select_nth_unstable_by(m - 1, desc);
            }
            dist[..m].sort_unstable_by(desc);
            if m == dist.len() || dist[..m].iter().map(|d| d.1).sum::<f64>() >= params.top_p {
                break;
            }
            m = (4 * m).min(dist.len());
        }
        dist.truncate(m);
        // Keep a token while the mass strictly above it is below top_p (transformers' rule).
        let mut above = 0.0;
        let keep = dist
            .iter()
            .take_while(|d| {
                let kept = above < params.top_p;
                above += d.1;
                kept
            })
            .count()
            .max(1);
        dist.truncate(keep);
        let total: f64 = dist.iter().map(|d| d.1).sum();
        dist.iter_mut().for_each(|d| d.1 /= total);
    } else if top_k < v {
        dist.sort_unstable_by_key(|d| d.0);
    }
    dist
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_k: usize, top_p: f64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, ..Default::default() }
    }

    fn frequencies(logits: &[f32], p: &SamplingParams, draws: usize) -> Vec<f64> {
        let mut rng = sample_rng(7, 0);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[sample(logits, p, &mut rng).unwrap() as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    #[test]
    fn greedy_takes_the_first_maximum_and_draws_nothing() {
        let mut rng = sample_rng(0, 0);
        let before = rng.clone();
        assert_eq!(sample(&[0.0, 3.0, 1.0, 3.0], &params(0.0, 0, 1.0), &mut rng).unwrap(), 1);
        assert_eq!(rng, before);
    }

    #[test]
    fn unfiltered_sampling_follows_the_softmax() {
        let logits = [0.0f32, (2.0f32).ln(), (3.0f32).ln(), f32::NEG_INFINITY];
        let f = frequencies(&logits, &params(1.0, 0, 1.0), 60_000);
        for (got, want) in f.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0, 0.0]) {
            assert!((got - want).abs() < 0.01, "{f:?}");
        }
        // Temperature 2 flattens: probabilities proportional to sqrt(1, 2, 3).
        let f = frequencies(&logits, &params(2.0, 0, 1.0), 60_000);
        let s = 1.0 + 2f64.sqrt() + 3f64.sqrt();
        for (got, want) in f.iter().zip([1.0 / s, 2f64.sqrt() / s, 3f64.sqrt() / s]) {
            assert!((got - want).abs() < 0.01, "{f:?}");
        }
    }

    #[test]
    fn top_k_keeps_the_k_best_and_ties_with_the_kth() {
        let logits = [1.0f32, 4.0, 3.0, 2.0, 3.0];
        let f = frequencies(&logits, &params(1.0, 1, 1.0), 1000);
        assert_eq!(f[1], 1.0);
        let f = frequencies(&logits, &params(1.0, 2, 1.0), 20_000);
        assert!(f[0] == 0.0 && f[3] == 0.0 && f[2] > 0.0 && f[4] > 0.0, "{f:?}");
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // Probabilities 0.5, 0.3, 0.2.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        assert_eq!(frequencies(&logits, &params(1.0, 0, 0.45), 1000), vec![1.0, 0.0, 0.0]);
        let f = frequencies(&logits, &params(1.0, 0, 0.75), 40_000);
        assert!(f[2] == 0.0 && (f[0] - 0.625).abs() < 0.01, "{f:?}");
        let f = frequencies(&logits, &params(1.0, 0, 0.85), 40_000);
        assert!(f[2] > 0.15, "{f:?}");
        // A tiny top_p still keeps one token.
        assert_eq!(frequencies(&logits, &params(1.0, 0, 1e-9), 100)[0], 1.0);
        // top-k first, then top-p over the renormalized survivors: 0.5/0.8 = 0.625 >= 0.6.
        assert_eq!(frequencies(&logits, &params(1.0, 2, 0.6), 1000), vec![1.0, 0.0, 0.0]);
    }

    #[test]
    fn the_partial_nucleus_sort_equals_a_full_sort() {
        let mut rng = sample_rng(1, 0);
        for (v, spread) in [(5000, 8.0), (5000, 0.5), (300, 3.0)] {
            let logits: Vec<f32> = (0..v).map(|_| (rng.gen::<f64>() * spread) as f32).collect();
            for top_p in [0.05, 0.5, 0.9, 0.999] {
                let got = sampling_distribution(&logits, &params(1.0, 0, top_p));
                // Reference: every token sorted, the same keep rule.
                let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
                let mut all: Vec<(u32, f64)> =
                    (0..v as u32).map(|i| (i, (logits[i as usize] as f64 - m).exp())).collect();
                let total: f64 = all.iter().map(|d| d.1).sum();
                all.iter_mut().for_each(|d| d.1 /= total);
                all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                let mut above = vec![0.0];
                for d in &all {
                    above.push(above[above.len() - 1] + d.1);
                }
                let keep = (0..v).take_while(|&i| above[i] < top_p).count();
                let want: Vec<u32> = all[..keep].iter().map(|d| d.0).collect();
                assert_eq!(got.iter().map(|d| d.0).collect::<Vec<_>>(), want, "v {v} spread {spread} top_p {top_p}");
                assert!((got.iter().map(|d| d.1).sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn nan_logits_and_bad_params_are_errors() {
        assert!(sample(&[0.0, f32::NAN], &params(1.0, 0, 1.0), &mut sample_rng(0, 0)).is_err());
        assert!(params(-1.0, 0, 1.0).validate().unwrap_err().contains("temperature"));
        assert!(params(1.0, 0, 0.0).validate().unwrap_err().contains("top_p"));
        assert!(params(1.0, 0, 1.5).validate().unwrap_err().contains("top_p"));
        let p = SamplingParams { max_new_tokens: 0, ..Default::default() };
        assert!(p.validate().unwrap_err().contains("max_new_tokens"));
    }
}
