//! Judging samples and pairing them: best vs worst per prompt, ties skipped, with each
//! response's estimated win probability against the policy's other samples (for SPPO).
//!
//! The win probability of sample i is its empirical win rate against the prompt's other
//! K - 1 samples under the judge's scores (a win 1, a tie 1/2, a loss 0), an unbiased
//! estimate of `P(y_i > pi_t)` from hard comparisons. SPPO's paper averages a preference
//! model's soft probabilities over the K samples instead; a scorer gives no probabilities
//! without assuming a scale (Bradley-Terry's `sigmoid(s_i - s_j)` depends on the unit of the
//! scores), so prefopt counts wins. The pairs carry these as `win_prob_chosen` and
//! `win_prob_rejected`, the columns the soft `sppo` loss reads.

use std::path::{Path, PathBuf};

use prefopt_data::{RecordSource, Text};
use serde::{Deserialize, Serialize};

use crate::judge::{Judge, JudgeCall, PairwiseJudge, PromptItem};
use crate::sampling::SampleRecord;
use crate::LoopError;

/// A line of `iter-<t>/pairs.jsonl`: a TRL preference row plus the judge's numbers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PairRecord {
    pub prompt: serde_json::Value,
    pub chosen: serde_json::Value,
    pub rejected: serde_json::Value,
    pub score_chosen: f64,
    pub score_rejected: f64,
    /// Share of the prompt's other samples each response beats under the judge (ties half).
    pub win_prob_chosen: f64,
    pub win_prob_rejected: f64,
}

/// Hears a judge's progress: (requests answered, requests), for judges that ask a server.
pub type Progress<'a> = &'a mut (dyn FnMut(usize, usize) + Send);

/// The mean judged score of every completion of `samples` (read from `source`).
pub fn mean_score(
    judge: &mut dyn Judge,
    samples: &[SampleRecord],
    source: &Path,
    k: usize,
    progress: Progress,
) -> Result<f64, LoopError> {
    let scores = judged_scores(judge, samples, source, k, progress)?;
    let n = scores.iter().map(Vec::len).sum::<usize>();
    Ok(scores.iter().flatten().sum::<f64>() / n.max(1) as f64)
}

/// Where a judge that asks a server keeps its replies on the samples of `source` while it
/// works: `<source>.verdicts.partial.jsonl`.
pub fn verdict_journal(source: &Path) -> PathBuf {
    source.with_extension("verdicts.partial.jsonl")
}

/// The prompts of `samples` (read from `source`, which errors name).
fn prompt_items(samples: &[SampleRecord], source: &Path) -> Result<Vec<PromptItem>, LoopError> {
    samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let text = Text::from_json(&RecordSource::line(source, i + 1), "prompt", &s.prompt)?;
            Ok(PromptItem { text, meta: s.meta.clone() })
        })
        .collect()
}

/// A pairwise judge's verdict on two sets of samples of the same prompts (`a` read from
/// `source`): `a`'s mean points against `b`, sample j against sample j of each prompt, both
/// orders, minus 1/2 (positive: `a` is judged better). The replies are kept in
/// [`verdict_journal`]`(source)`, which the caller removes once it has written what it made
/// of them.
pub fn pairwise_advantage(
    judge: &mut dyn PairwiseJudge,
    a: &[SampleRecord],
    b: &[SampleRecord],
    source: &Path,
    progress: Progress,
) -> Result<f64, LoopError> {
    let prompts = prompt_items(a, source)?;
    let mut items = Vec::new();
    for ((p, x), y) in prompts.iter().zip(a).zip(b) {
        for (cx, cy) in x.completions.iter().zip(&y.completions) {
            items.push((p, cx.as_str(), cy.as_str()));
        }
    }
    let journal = verdict_journal(source);
    let points = judge.compare(&items, &mut JudgeCall { journal: Some(&journal), progress })?;
    Ok(points.iter().sum::<f64>() / points.len().max(1) as f64 - 0.5)
}

/// Judges every prompt's samples (read from `source`, which errors name) and returns the
/// pairs and the number of prompts skipped because all their samples tied.
pub fn judge_and_pair(
    judge: &mut dyn Judge,
    samples: &[SampleRecord],
    source: &Path,
    k: usize,
    progress: Progress,
) -> Result<(Vec<PairRecord>, usize), LoopError> {
    let mut pairs = Vec::new();
    let mut skipped = 0;
    for (s, scores) in samples.iter().zip(judged_scores(judge, samples, source, k, progress)?) {
        // First best and first worst, so the pairing is deterministic.
        let best = (0..k).fold(0, |b, i| if scores[i] > scores[b] { i } else { b });
        let worst = (0..k).fold(0, |w, i| if scores[i] < scores[w] { i } else { w });
        if scores[best] == scores[worst] {
            skipped += 1;
            continue;
        }
        let win = |i: usize| -> f64 {
            let others = (0..k).filter(|&j| j != i);
            others
                .map(|j| {
                    if scores[i] > scores[j] {
                        1.0
                    } else if scores[i] == scores[j] {
                        0.5
                    } else {
                        0.0
                    }
                })
                .sum::<f64>()
                / (k - 1) as f64
        };
        let as_completion = |text: &str| -> serde_json::Value {
            if s.prompt.is_string() {
                serde_json::Value::String(text.to_string())
            } else {
                serde_json::json!([{"role": "assistant", "content": text}])
            }
        };
        pairs.push(PairRecord {
            prompt: s.prompt.clone(),
            chosen: as_completion(&s.completions[best]),
            rejected: as_completion(&s.completions[worst]),
            score_chosen: scores[best],
            score_rejected: scores[worst],
            win_prob_chosen: win(best),
            win_prob_rejected: win(worst),
        });
    }
    Ok((pairs, skipped))
}

/// Every prompt's K scores, in one call to the judge; a wrong count or a non-finite score
/// is an error that names the prompt. A judge that asks a server keeps its replies in
/// [`verdict_journal`]`(source)` (a rerun asks only for the rest), which the caller removes
/// once it has written what it made of them.
fn judged_scores(
    judge: &mut dyn Judge,
    samples: &[SampleRecord],
    source: &Path,
    k: usize,
    progress: Progress,
) -> Result<Vec<Vec<f64>>, LoopError> {
    let items = prompt_items(samples, source)?;
    // One call for the whole iteration: a command judge runs once, not once per prompt.
    let batch: Vec<(&PromptItem, &[String])> =
        items.iter().zip(samples).map(|(i, s)| (i, s.completions.as_slice())).collect();
    let journal = verdict_journal(source);
    let all = judge.judge_many_with(&batch, &mut JudgeCall { journal: Some(&journal), progress })?;
    let mut out = Vec::with_capacity(samples.len());
    for (s, judged) in samples.iter().zip(all) {
        if judged.len() != s.completions.len() || judged.len() != k {
            return Err(LoopError::Verdicts {
                judge: judge.name(),
                message: format!(
                    "returned {} scores for prompt {} with {} completions",
                    judged.len(),
                    s.prompt_index,
                    s.completions.len()
                ),
            });
        }
        let scores: Vec<f64> = judged.iter().map(|j| j.score).collect();
        if let Some(bad) = scores.iter().position(|x| !x.is_finite()) {
            return Err(LoopError::Verdicts {
                judge: judge.name(),
                message: format!(
                    "gave a non-finite score ({}) to completion {bad} of prompt {}",
                    scores[bad], s.prompt_index
                ),
            });
        }
        out.push(scores);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::judge::{JudgeError, Judgement};

    /// Scores completions by a table: the completion's text parsed as a number.
    struct Table;
    impl Judge for Table {
        fn judge(&mut self, _: &PromptItem, completions: &[String]) -> Result<Vec<Judgement>, JudgeError> {
            Ok(completions.iter().map(|c| Judgement::score_only(c.parse().unwrap_or(f64::NAN))).collect())
        }
        fn name(&self) -> String {
            "table".into()
        }
    }

    fn sample(i: usize, completions: &[&str]) -> SampleRecord {
        SampleRecord {
            prompt_index: i,
            prompt: serde_json::Value::String(format!("p{i}")),
            meta: serde_json::Value::Null,
            completions: completions.iter().map(|c| c.to_string()).collect(),
            tokens: vec![vec![]; completions.len()],
            logprobs: vec![0.0; completions.len()],
        }
    }

    #[test]
    fn best_vs_worst_with_empirical_win_rates_and_ties_skipped() {
        let samples =
            [sample(0, &["1", "3", "3", "0"]), sample(1, &["2", "2", "2", "2"]), sample(2, &["5", "1", "4", "9"])];
        let (pairs, skipped) =
            judge_and_pair(&mut Table, &samples, Path::new("samples.jsonl"), 4, &mut |_, _| {}).unwrap();
        assert_eq!((pairs.len(), skipped), (2, 1));
        // Prompt 0: the first of the tied best ("3" at 1) beats 1 and 0, ties the other 3.
        assert_eq!((pairs[0].chosen.as_str(), pairs[0].rejected.as_str()), (Some("3"), Some("0")));
        assert_eq!((pairs[0].win_prob_chosen, pairs[0].win_prob_rejected), ((1.0 + 1.0 + 0.5) / 3.0, 0.0));
        assert_eq!((pairs[0].score_chosen, pairs[0].score_rejected), (3.0, 0.0));
        assert_eq!((pairs[1].chosen.as_str(), pairs[1].rejected.as_str()), (Some("9"), Some("1")));
        assert_eq!((pairs[1].win_prob_chosen, pairs[1].win_prob_rejected), (1.0, 0.0));
    }

    #[test]
    fn wrong_counts_and_non_finite_scores_name_the_prompt() {
        let err = judge_and_pair(
            &mut Table,
            &[sample(0, &["1", "2"]), sample(1, &["1", "x"])],
            Path::new("s"),
            2,
            &mut |_, _| {},
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("non-finite score (NaN) to completion 1 of prompt 1"), "{msg}");
        let err = judge_and_pair(&mut Table, &[sample(3, &["1", "2", "3"])], Path::new("s"), 2, &mut |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 scores for prompt 3 with 3 completions"), "{err}");
    }
}
