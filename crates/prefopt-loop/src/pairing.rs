//! Judging samples and pairing them: best vs worst per prompt, ties skipped, with each
//! response's estimated win probability against the policy's other samples (for SPPO).

use serde::{Deserialize, Serialize};

use crate::judge::{Judge, PromptItem};
use crate::sampling::{json_to_text, SampleRecord};
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

/// Judges every prompt's samples and returns the pairs and the number of prompts skipped
/// because all their samples tied.
pub fn judge_and_pair(
    judge: &mut dyn Judge,
    samples: &[SampleRecord],
    k: usize,
) -> Result<(Vec<PairRecord>, usize), LoopError> {
    let items = samples
        .iter()
        .map(|s| Ok(PromptItem { text: json_to_text(&s.prompt)?, meta: s.meta.clone() }))
        .collect::<Result<Vec<_>, LoopError>>()?;
    // One call for the whole iteration: a command judge runs once, not once per prompt.
    let batch: Vec<(&PromptItem, &[String])> =
        items.iter().zip(samples).map(|(i, s)| (i, s.completions.as_slice())).collect();
    let all = judge.judge_many(&batch)?;
    let mut pairs = Vec::new();
    let mut skipped = 0;
    for (s, judged) in samples.iter().zip(all) {
        if judged.len() != s.completions.len() || judged.len() != k {
            return Err(LoopError::Judge(format!(
                "judge `{}` returned {} scores for prompt {} with {} completions",
                judge.name(),
                judged.len(),
                s.prompt_index,
                s.completions.len()
            )));
        }
        let scores: Vec<f64> = judged.iter().map(|j| j.score).collect();
        if let Some(bad) = scores.iter().position(|x| !x.is_finite()) {
            return Err(LoopError::Judge(format!(
                "judge `{}` gave a non-finite score ({}) to completion {bad} of prompt {}",
                judge.name(),
                scores[bad],
                s.prompt_index
            )));
        }
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
