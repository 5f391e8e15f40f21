//! Built-in tasks: prompts generated from a seed, and a programmatic oracle with graded
//! rewards that tells malformed (out-of-distribution) answers apart.

use rand::{Rng, SeedableRng};

use crate::judge::{Judgement, PromptItem};
use prefopt_data::Text;

/// A task: prompt generator plus oracle.
pub trait Task {
    fn name(&self) -> &'static str;
    /// `n` prompts, a pure function of `seed`.
    fn prompts(&self, n: usize, seed: u64) -> Vec<PromptItem>;
    /// The oracle's verdict on one completion.
    fn grade(&self, prompt: &PromptItem, completion: &str) -> Result<Judgement, String>;
    /// The canonical correct completion (for building SFT data).
    fn reference_answer(&self, prompt: &PromptItem) -> Result<String, String>;
}

/// The built-in tasks by name.
pub const TASKS: [&str; 1] = ["arithmetic"];

pub fn task_by_name(name: &str) -> Result<Box<dyn Task>, String> {
    match name {
        "arithmetic" => Ok(Box::new(Arithmetic)),
        other => Err(format!("unknown task `{other}`; built-in tasks: {}", TASKS.join(", "))),
    }
}

/// `What is 37 + 48?` -> `Answer: 85`. Operands 0..50, `+` or `-` (never negative).
///
/// Reward: 1.0 for the exact answer in the required form `Answer: <integer>`; a well-formed
/// wrong answer earns partial credit `0.5 * max(0, 1 - |error| / 10)`; anything not in that
/// form is malformed and scores -0.5, below every well-formed answer.
pub struct Arithmetic;

impl Arithmetic {
    fn answer(prompt: &PromptItem) -> Result<i64, String> {
        prompt.meta.get("answer").and_then(|a| a.as_i64()).ok_or_else(|| "arithmetic: prompt has no `answer` in its task data".to_string())
    }
}

impl Task for Arithmetic {
    fn name(&self) -> &'static str {
        "arithmetic"
    }

    fn prompts(&self, n: usize, seed: u64) -> Vec<PromptItem> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let (mut a, mut b) = (rng.gen_range(0..50i64), rng.gen_range(0..50i64));
                let plus = rng.gen_bool(0.5);
                if !plus && b > a {
                    std::mem::swap(&mut a, &mut b);
                }
                let (op, answer) = if plus { ("+", a + b) } else { ("-", a - b) };
                PromptItem {
                    text: Text::Plain(format!("What is {a} {op} {b}?")),
                    meta: serde_json::json!({"task": "arithmetic", "a": a, "b": b, "op": op, "answer": answer}),
                }
            })
            .collect()
    }

    fn grade(&self, prompt: &PromptItem, completion: &str) -> Result<Judgement, String> {
        let answer = Self::answer(prompt)?;
        let parsed = completion.trim().strip_prefix("Answer:").map(str::trim).and_then(|n| n.parse::<i64>().ok());
        Ok(match parsed {
            Some(x) if x == answer => Judgement { score: 1.0, correct: Some(true), malformed: false },
            Some(x) => {
                let err = (x - answer).abs() as f64;
                Judgement { score: 0.5 * (1.0 - err / 10.0).max(0.0), correct: Some(false), malformed: false }
            }
            None => Judgement { score: -0.5, correct: Some(false), malformed: true },
        })
    }

    fn reference_answer(&self, prompt: &PromptItem) -> Result<String, String> {
        Ok(format!(" Answer: {}", Self::answer(prompt)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_a_function_of_the_seed() {
        let t = Arithmetic;
        let texts = |seed| t.prompts(20, seed).into_iter().map(|p| format!("{:?}", p.text)).collect::<Vec<_>>();
        assert_eq!(texts(3), texts(3));
        assert_ne!(texts(3), texts(4));
    }

    #[test]
    fn grading_separates_exact_partial_and_malformed() {
        let t = Arithmetic;
        let p = &t.prompts(1, 0)[0];
        let answer = p.meta["answer"].as_i64().unwrap();
        let exact = t.grade(p, &t.reference_answer(p).unwrap()).unwrap();
        assert_eq!(exact, Judgement { score: 1.0, correct: Some(true), malformed: false });
        let near = t.grade(p, &format!("Answer: {}", answer + 2)).unwrap();
        assert!((near.score - 0.4).abs() < 1e-12 && !near.malformed && near.correct == Some(false));
        let far = t.grade(p, &format!("Answer: {}", answer + 40)).unwrap();
        assert_eq!(far.score, 0.0);
        for bad in ["", "85", "answer: 3", "Answer: three", "Answer: 3 and more"] {
            let j = t.grade(p, bad).unwrap();
            assert!(j.malformed && j.score < far.score, "{bad:?} -> {j:?}");
        }
    }

    #[test]
    fn unknown_task_lists_the_built_in_ones() {
        let err = task_by_name("poetry").err().unwrap();
        assert!(err.contains("arithmetic"));
    }
}
