//! Held-out evaluation (methods.md section 5): one sample per held-out prompt, judged by the
//! oracle: mean reward, accuracy where the task has one, malformed-answer rate, win rate
//! against the base model's sample for the same prompt (ties half), and the KL estimate
//! `mean(lp_pi(y) - lp_base(y))` over the model's samples.
//!
//! A pairwise judge (`llm:`) scores no single completion: it compares each model sample with
//! the base model's for the same prompt, both orders, and the model's points (1 win, 1/2
//! tie, 0 loss, averaged over the two orders) are its `eval_reward`; `win_rate_vs_base` is
//! the share of prompts it wins on balance (ties half). The base scores 1/2 on both.

use std::path::Path;

use candle_core::Device;
use prefopt_data::{tokenize_prompt, HfTokenizer, TokenizedSequence};
use prefopt_model::{Llama, Mode, Policy, Precision, SamplingParams};
use serde::{Deserialize, Serialize};

use crate::judge::{self, Judge, JudgeCall, Judgement, PromptItem};
use crate::sampling::{sample_records, SampleRecord};
use crate::{seeds, LoopError};

/// One model's held-out numbers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub eval_reward: f64,
    /// Exact-answer rate; `None` when the judge has no notion of correctness.
    pub eval_accuracy: Option<f64>,
    pub malformed_rate: f64,
    /// Against the base model's sample for the same prompt; ties count half (0.5 for the base).
    pub win_rate_vs_base: f64,
    /// `mean(lp_model(y) - lp_base(y))` over the model's samples (0 for the base).
    pub kl_to_base: f64,
    pub num_prompts: usize,
}

/// The base model's held-out samples and scores, the baseline of every comparison; kept on
/// disk so a resumed run compares against the very same samples.
pub struct BaseSamples {
    pub samples: Vec<SampleRecord>,
    pub scores: Vec<f64>,
    pub base_dir: std::path::PathBuf,
    pub metrics: EvalMetrics,
}

impl BaseSamples {
    #[allow(clippy::too_many_arguments)]
    pub fn load_or_make(
        path: &Path,
        base_dir: &Path,
        tok: &HfTokenizer,
        prompts: &[PromptItem],
        sampling: &SamplingParams,
        seed: u64,
        judge: &mut dyn Judge,
        device: &Device,
    ) -> Result<Self, LoopError> {
        let samples: Vec<SampleRecord> = if path.exists() {
            prefopt_fs::read_jsonl(path)?
        } else {
            let s = held_out_samples(&network(base_dir, device)?, tok, prompts, sampling, seed)?;
            prefopt_fs::write_jsonl(path, &s)?;
            s
        };
        // A pairwise judge's baseline is even by definition: nothing to ask.
        let judged = if judge.as_pairwise().is_some() {
            vec![Judgement::score_only(0.5); samples.len()]
        } else {
            judge_all(judge, prompts, &samples)?
        };
        let scores: Vec<f64> = judged.iter().map(|j| j.score).collect();
        let metrics = summarize(&judged, &scores, &scores, 0.0);
        Ok(Self { samples, scores, base_dir: base_dir.to_path_buf(), metrics })
    }
}

/// The network the loop samples and scores with, from a model folder or an adapter stack
/// folder: f32, graph-free.
pub(crate) fn network(dir: &Path, device: &Device) -> Result<Llama, LoopError> {
    Ok(Policy::load(dir, device)?.network(Mode::Infer, Precision::F32)?)
}

/// One sample per held-out prompt, from the evaluation streams of `seed` ([`seeds::eval_samples`]).
fn held_out_samples(
    net: &Llama,
    tok: &HfTokenizer,
    prompts: &[PromptItem],
    sampling: &SamplingParams,
    seed: u64,
) -> Result<Vec<SampleRecord>, LoopError> {
    let refs: Vec<&PromptItem> = prompts.iter().collect();
    sample_records(net, tok, &refs, 1, sampling, seeds::eval_samples(seed), &mut |_, _| {})
}

/// Samples, judges and compares one model folder against the base.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_model(
    dir: &Path,
    tok: &HfTokenizer,
    prompts: &[PromptItem],
    sampling: &SamplingParams,
    seed: u64,
    judge: &mut dyn Judge,
    base: &BaseSamples,
    device: &Device,
) -> Result<EvalMetrics, LoopError> {
    let samples = held_out_samples(&network(dir, device)?, tok, prompts, sampling, seed)?;
    let judged = match judge.as_pairwise() {
        Some(pairwise) => {
            let items: Vec<(&PromptItem, &str, &str)> = prompts
                .iter()
                .zip(&samples)
                .zip(&base.samples)
                .map(|((p, s), b)| (p, s.completions[0].as_str(), b.completions[0].as_str()))
                .collect();
            // Kept next to the model folder until the caller has written the metrics: a rerun
            // asks only for the rest.
            let journal = eval_journal(dir);
            let points =
                pairwise.compare(&items, &mut JudgeCall { journal: Some(&journal), progress: &mut |_, _| {} })?;
            points.into_iter().map(Judgement::score_only).collect()
        }
        None => judge_all(judge, prompts, &samples)?,
    };
    let scores: Vec<f64> = judged.iter().map(|j| j.score).collect();
    let lp_base = sequence_logps(&network(&base.base_dir, device)?, tok, prompts, &samples)?;
    let kl = samples.iter().zip(&lp_base).map(|(s, b)| s.logprobs[0] - b).sum::<f64>() / samples.len().max(1) as f64;
    Ok(summarize(&judged, &scores, &base.scores, kl))
}

/// Where a pairwise judge keeps its replies on the held-out samples of the model in `dir`:
/// `<dir>.eval-verdicts.partial.jsonl`, beside the folder.
pub fn eval_journal(dir: &Path) -> std::path::PathBuf {
    dir.with_extension("eval-verdicts.partial.jsonl")
}

fn judge_all(
    judge: &mut dyn Judge,
    prompts: &[PromptItem],
    samples: &[SampleRecord],
) -> Result<Vec<Judgement>, LoopError> {
    let batch: Vec<(&PromptItem, &[String])> =
        prompts.iter().zip(samples).map(|(p, s)| (p, s.completions.as_slice())).collect();
    let mut out = Vec::with_capacity(samples.len());
    for (mut j, s) in judge.judge_many(&batch)?.into_iter().zip(samples) {
        if j.len() != 1 || !j[0].score.is_finite() {
            return Err(LoopError::Verdicts {
                judge: judge.name(),
                message: format!("gave no finite score for held-out prompt {}", s.prompt_index),
            });
        }
        out.push(j.remove(0));
    }
    Ok(out)
}

fn summarize(judged: &[Judgement], scores: &[f64], base_scores: &[f64], kl: f64) -> EvalMetrics {
    let n = judged.len().max(1) as f64;
    let summary = judge::summarize(judged);
    let wins: f64 = scores
        .iter()
        .zip(base_scores)
        .map(|(a, b)| {
            if a > b {
                1.0
            } else if a == b {
                0.5
            } else {
                0.0
            }
        })
        .sum();
    EvalMetrics {
        eval_reward: summary.mean_score,
        eval_accuracy: summary.accuracy,
        malformed_rate: summary.malformed_rate,
        win_rate_vs_base: wins / n,
        kl_to_base: kl,
        num_prompts: judged.len(),
    }
}

/// Log-probs of each sample's completion tokens under `net`.
fn sequence_logps(
    net: &Llama,
    tok: &HfTokenizer,
    prompts: &[PromptItem],
    samples: &[SampleRecord],
) -> Result<Vec<f64>, LoopError> {
    let mut seqs = Vec::with_capacity(samples.len());
    for (p, s) in prompts.iter().zip(samples) {
        let prompt_ids = tokenize_prompt(tok, &p.text)?;
        let completion_start = prompt_ids.len();
        let input_ids = [prompt_ids, s.tokens[0].clone()].concat();
        seqs.push(TokenizedSequence::new(input_ids, completion_start));
    }
    crate::sampling::score_sequences(net, &seqs)
}
