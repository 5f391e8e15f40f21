//! Datasets from the built-in tasks (`prefopt tasks`): prompt files for `prefopt generate` /
//! `prefopt apo`, and SFT data for training a base model from scratch.
//!
//! SFT data can imitate a sloppy annotator: a share of *off-format* completions (the right
//! value without the required `Answer: ` marker: `85`, `The answer is 85`, ...), which the
//! oracle grades as malformed, and a share of *wrong* ones (the task's perturbed answer in the
//! right form). A model trained on them answers wrongly or out of distribution part of the
//! time, which is what preference training should fix (the demo's base model is made this way).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::judge::JudgeError;
use crate::seeds::SFT_ANSWER_STREAM;
use crate::tasks::Task;

/// `{"prompt": ...}` lines: the task's first `n` prompts of `seed`.
pub fn prompt_records(task: &dyn Task, n: usize, seed: u64) -> Vec<Value> {
    task.prompts(n, seed).iter().map(|p| json!({ "prompt": p.text.to_json() })).collect()
}

/// `{"prompt", "completion"}` lines: with probability `off_format_rate` the right value in one
/// of [`OFF_FORMATS`], with probability `wrong_rate` the task's perturbed (wrong, well-formed)
/// answer, otherwise the reference answer. The draws come from a stream of `seed` separate
/// from the prompts'.
pub fn sft_records(
    task: &dyn Task,
    n: usize,
    seed: u64,
    off_format_rate: f64,
    wrong_rate: f64,
) -> Result<Vec<Value>, JudgeError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(SFT_ANSWER_STREAM);
    task.prompts(n, seed)
        .iter()
        .map(|p| {
            let answer = task.reference_answer(p)?;
            let u: f64 = rng.gen();
            let completion = if u < off_format_rate {
                let value = answer.strip_prefix("Answer: ").unwrap_or(&answer);
                OFF_FORMATS[rng.gen_range(0..OFF_FORMATS.len())].replace("{}", value)
            } else if u < off_format_rate + wrong_rate {
                task.perturbed_answer(p, &mut rng)?
            } else {
                answer
            };
            Ok(json!({ "prompt": p.text.to_json(), "completion": completion }))
        })
        .collect()
}

/// Ways to give the value without the required marker; every one grades as malformed.
pub const OFF_FORMATS: [&str; 4] = ["{}", "The answer is {}", "Answer is {}", "= {}"];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::judge::PromptItem;
    use crate::tasks::task_by_name;

    #[test]
    fn off_format_and_wrong_shares_as_asked() {
        let task = task_by_name("arithmetic").unwrap();
        let rows = sft_records(task.as_ref(), 3000, 3, 0.25, 0.3).unwrap();
        assert_eq!(rows, sft_records(task.as_ref(), 3000, 3, 0.25, 0.3).unwrap(), "deterministic");
        let (mut off, mut wrong) = (0, 0);
        for row in &rows {
            let item = PromptItem::plain(row["prompt"].as_str().unwrap());
            let j = task.grade(&item, row["completion"].as_str().unwrap()).unwrap();
            if j.malformed {
                off += 1;
                assert_eq!(j.correct, Some(false));
            } else if j.score < 1.0 {
                wrong += 1;
            }
        }
        let share = |k: usize| k as f64 / rows.len() as f64;
        assert!((share(off) - 0.25).abs() < 0.03, "off-format share {}", share(off));
        assert!((share(wrong) - 0.3).abs() < 0.03, "wrong share {}", share(wrong));
        assert!(sft_records(task.as_ref(), 200, 3, 0.0, 0.0)
            .unwrap()
            .iter()
            .all(|r| r["completion"].as_str().unwrap().starts_with("Answer: ")));
        assert_eq!(prompt_records(task.as_ref(), 5, 3)[0]["prompt"], rows[0]["prompt"]);
    }
}
