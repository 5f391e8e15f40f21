//! A synthetic preference set with realistic, ragged lengths, for throughput benchmarks
//! (`prefopt workload`, `prefopt bench dpo --data`): conversational rows in TRL's format
//! whose token lengths, under a given tokenizer, follow a stated distribution. The text is
//! random English words; only the lengths are meant to be realistic.
//!
//! The default distribution is UltraFeedback-like (our choice, stated in BENCHMARKS.md):
//! prompts log-normal with median 120 tokens (sigma 0.7), capped at 600; chosen and rejected
//! drawn independently, log-normal with median 250 tokens (sigma 0.6), capped at 800; at
//! least 8 prompt and 4 completion tokens. Lengths count the message contents' tokens
//! (the chat template adds its own few per message).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::error::DataError;
use crate::tokenizer::HfTokenizer;

/// A log-normal token length: median `median`, log-space spread `sigma`, clamped to
/// `min..=max`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LengthDistribution {
    pub median: f64,
    pub sigma: f64,
    pub min: usize,
    pub max: usize,
}

impl LengthDistribution {
    /// One length.
    fn draw(&self, rng: &mut ChaCha8Rng) -> usize {
        // Box-Muller: a standard normal from two uniforms in (0, 1].
        let (u1, u2): (f64, f64) = (1.0 - rng.gen::<f64>(), rng.gen());
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        ((self.median.ln() + self.sigma * z).exp().round() as usize).clamp(self.min, self.max)
    }
}

/// The prompt and completion length distributions of a workload.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Workload {
    pub prompt: LengthDistribution,
    pub completion: LengthDistribution,
}

impl Default for Workload {
    /// The UltraFeedback-like default of the module docs.
    fn default() -> Self {
        Self {
            prompt: LengthDistribution { median: 120.0, sigma: 0.7, min: 8, max: 600 },
            completion: LengthDistribution { median: 250.0, sigma: 0.6, min: 4, max: 800 },
        }
    }
}

const WORDS: [&str; 64] = [
    "the",
    "model",
    "answer",
    "question",
    "because",
    "simple",
    "water",
    "light",
    "people",
    "time",
    "should",
    "about",
    "between",
    "example",
    "different",
    "number",
    "system",
    "process",
    "important",
    "first",
    "small",
    "large",
    "during",
    "without",
    "another",
    "result",
    "however",
    "method",
    "value",
    "general",
    "known",
    "often",
    "river",
    "city",
    "history",
    "science",
    "energy",
    "change",
    "follow",
    "reason",
    "around",
    "during",
    "language",
    "market",
    "country",
    "problem",
    "develop",
    "support",
    "control",
    "several",
    "ground",
    "figure",
    "early",
    "common",
    "study",
    "provide",
    "measure",
    "carefully",
    "quickly",
    "clear",
    "natural",
    "whole",
    "season",
    "family",
];

/// Random words whose tokenization has `tokens` tokens, or the fewest words at or above it
/// (a word's last tokens can land past it: one or two with a real BPE vocabulary, more with
/// the fixtures' tiny one).
fn text_of(tok: &HfTokenizer, tokens: usize, rng: &mut ChaCha8Rng) -> Result<String, DataError> {
    // Words to choose from: plenty (no word is below one token); a sentence every ~12 words.
    let words: Vec<String> = (0..tokens + 1)
        .map(|i| {
            let w = WORDS[rng.gen_range(0..WORDS.len())];
            if i % 12 == 11 {
                format!("{w}.")
            } else {
                w.to_string()
            }
        })
        .collect();
    let count = |n: usize| -> Result<usize, DataError> { Ok(tok.encode(&words[..n].join(" "), false)?.len()) };
    // The fewest words reaching `tokens` (token counts grow with words).
    let (mut lo, mut hi) = (1, words.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if count(mid)? >= tokens {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(words[..lo].join(" "))
}

/// `count` conversational preference rows (`{"prompt": [user], "chosen": [assistant],
/// "rejected": [assistant]}`) with lengths drawn from `workload`, all from `seed`.
pub fn ragged_preferences(
    tok: &HfTokenizer,
    workload: &Workload,
    count: usize,
    seed: u64,
) -> Result<Vec<serde_json::Value>, DataError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut rows = Vec::with_capacity(count);
    for _ in 0..count {
        let (p, c, r) =
            (workload.prompt.draw(&mut rng), workload.completion.draw(&mut rng), workload.completion.draw(&mut rng));
        rows.push(json!({
            "prompt": [{"role": "user", "content": text_of(tok, p, &mut rng)?}],
            "chosen": [{"role": "assistant", "content": text_of(tok, c, &mut rng)?}],
            "rejected": [{"role": "assistant", "content": text_of(tok, r, &mut rng)?}],
        }));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_follow_the_distribution_and_the_seed() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/llama-tied");
        let tok = HfTokenizer::from_dir(&dir).unwrap();
        let w = Workload {
            prompt: LengthDistribution { median: 30.0, sigma: 0.5, min: 8, max: 60 },
            completion: LengthDistribution { median: 50.0, sigma: 0.5, min: 4, max: 90 },
        };
        let rows = ragged_preferences(&tok, &w, 40, 3).unwrap();
        assert_eq!(rows, ragged_preferences(&tok, &w, 40, 3).unwrap(), "same seed, same rows");
        assert_ne!(rows, ragged_preferences(&tok, &w, 40, 4).unwrap());
        let len = |v: &serde_json::Value| tok.encode(v[0]["content"].as_str().unwrap(), false).unwrap().len();
        let mut prompts: Vec<usize> = rows.iter().map(|r| len(&r["prompt"])).collect();
        let chosen: Vec<usize> = rows.iter().map(|r| len(&r["chosen"])).collect();
        // The fixture tokenizer splits a word into up to ~8 tokens: the overshoot it allows.
        assert!(prompts.iter().all(|&n| (8..=68).contains(&n)), "{prompts:?}");
        assert!(chosen.iter().all(|&n| (4..=98).contains(&n)), "{chosen:?}");
        prompts.sort();
        let median = prompts[prompts.len() / 2] as f64;
        assert!((22.0..=40.0).contains(&median), "prompt median {median}");
        assert!(prompts[0] < prompts[prompts.len() - 1], "ragged");
    }
}
