//! Built-in tasks: short prompts generated from a seed and a programmatic oracle with graded
//! rewards that tells malformed (out-of-distribution) answers apart. Small enough for a tiny
//! model trained from scratch: prompts under 40 characters, answers under 14.
//!
//! | task | prompt | reference answer |
//! |---|---|---|
//! | `arithmetic` | `What is 37 + 48?\n` (`+`, `-` on 0..=99; `x` on 0..=12) | `Answer: 85` (`Answer: -11`) |
//! | `compare` | `Which is larger, 17 or 42?\n` (distinct, 0..=99) | `Answer: 42` |
//! | `reverse` | `Reverse the letters: abcd\n` (3..=5 of a..z) | `Answer: dcba` |
//!
//! Every answer has one required form, `Answer: <value>`, and every completion is read the
//! same way:
//! - **malformed** (out of distribution): no `Answer:` followed (after optional spaces) by a
//!   value (an integer `-?[0-9]+`, or a run of ASCII letters for `reverse`). Score 0.
//! - **strict**: the completion, trimmed of surrounding whitespace, is exactly
//!   `Answer: <value>` with the value in canonical form (integers without `+` or leading
//!   zeros). Format credit 1.
//! - **loose**: a value is found (the first one) but something else is off: text before or
//!   after it, no space or two spaces after the colon, leading zeros. Format credit 1/2.
//!
//! `score = 0.1 * format + 0.9 * credit` where `credit` is 1 for the exact answer and partial
//! otherwise: `0.5 * max(0, 1 - |error| / 10)` for the integer tasks, `0.5 * max(0, 1 -
//! levenshtein / len(answer))` for `reverse`. So the reference answer scores 1.0, any
//! well-formed answer at least 0.05, a malformed one 0. `correct` is whether the value read is
//! exactly the answer (whatever the format).

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::judge::{JudgeError, Judgement, PromptItem};
use prefopt_data::Text;

/// The names [`task_by_name`] accepts.
pub const TASK_NAMES: [&str; 3] = ["arithmetic", "compare", "reverse"];

/// Weight of the answer's form in the score; the rest is the answer's correctness.
pub const FORMAT_WEIGHT: f64 = 0.1;

/// A prompt generator plus its oracle.
pub trait Task: Send + Sync {
    fn name(&self) -> &'static str;

    /// `n` prompts, a pure function of `seed`; `prompts(n, s)` is a prefix of `prompts(m, s)`
    /// for `n < m`. Each item's `meta` holds the task data (operands and answer).
    fn prompts(&self, n: usize, seed: u64) -> Vec<PromptItem>;

    /// The oracle's verdict on one completion. The task data comes from the item's `meta`, or
    /// from the prompt text when `meta` is null (prompts read back from a file).
    fn grade(&self, item: &PromptItem, completion: &str) -> Result<Judgement, JudgeError>;

    /// The canonical correct completion (`Answer: 85`), which grades 1.0; for SFT data.
    fn reference_answer(&self, item: &PromptItem) -> Result<String, JudgeError>;

    /// A wrong answer in the strict required form (grades below 1.0, not malformed), drawn
    /// from `rng`; for rejected responses of preference data.
    fn perturbed_answer(&self, item: &PromptItem, rng: &mut dyn RngCore) -> Result<String, JudgeError>;
}

/// A built-in task by name; the error lists the valid names.
pub fn task_by_name(name: &str) -> Result<Box<dyn Task>, JudgeError> {
    match name {
        "arithmetic" => Ok(Box::new(Arithmetic)),
        "compare" => Ok(Box::new(Compare)),
        "reverse" => Ok(Box::new(Reverse)),
        other => Err(JudgeError::UnknownTask { name: other.to_string() }),
    }
}

/// The rng of a task's prompt stream: the seed, and the task in the ChaCha stream number so
/// two tasks with one seed draw independently.
fn prompt_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// How a completion's answer reads against the required form `Answer: <value>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    Strict,
    Loose,
}

const MARKER: &str = "Answer:";

/// The first value after an `Answer:` marker (after optional spaces and tabs), and whether
/// the whole completion is exactly `Answer: <value>`. `value_len` gives the length in bytes
/// of the value at the start of a string (0 for none); `canonical` checks its spelling.
fn read_answer(
    completion: &str,
    value_len: impl Fn(&str) -> usize,
    canonical: impl Fn(&str) -> bool,
) -> Option<(&str, Form)> {
    for (at, _) in completion.match_indices(MARKER) {
        let rest = &completion[at + MARKER.len()..];
        let value_start = rest.trim_start_matches([' ', '\t']);
        let n = value_len(value_start);
        if n == 0 {
            continue;
        }
        let value = &value_start[..n];
        let strict = canonical(value) && completion.trim() == format!("{MARKER} {value}");
        return Some((value, if strict { Form::Strict } else { Form::Loose }));
    }
    None
}

/// Length of a leading `-?[0-9]+`, or 0.
fn integer_len(s: &str) -> usize {
    let sign = usize::from(s.starts_with('-'));
    let digits = s[sign..].bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        0
    } else {
        sign + digits
    }
}

/// `-?[0-9]+` as `format!("{}")` writes an `i64`: no leading zeros, no `-0`.
fn canonical_integer(s: &str) -> bool {
    s.parse::<i64>().is_ok_and(|v| v.to_string() == s)
}

fn letters_len(s: &str) -> usize {
    s.bytes().take_while(u8::is_ascii_alphabetic).count()
}

/// The score of a well-formed answer with this form and correctness credit.
fn score(form: Form, credit: f64) -> f64 {
    let format = if form == Form::Strict { 1.0 } else { 0.5 };
    FORMAT_WEIGHT * format + (1.0 - FORMAT_WEIGHT) * credit
}

const MALFORMED: Judgement = Judgement { score: 0.0, correct: Some(false), malformed: true };

/// Grades an integer answer: exact, or partial credit falling linearly to 0 at |error| 10.
fn grade_integer(completion: &str, answer: i64) -> Judgement {
    let Some((value, form)) = read_answer(completion, integer_len, canonical_integer) else {
        return MALFORMED;
    };
    // A value too long for i64 is simply far off.
    let error = value.parse::<i64>().map_or(f64::INFINITY, |v| (v as f64 - answer as f64).abs());
    let credit = if error == 0.0 { 1.0 } else { 0.5 * (1.0 - error / 10.0).max(0.0) };
    Judgement { score: score(form, credit), correct: Some(error == 0.0), malformed: false }
}

/// The task data: `meta` when it is set, else what the task reads from the prompt text.
fn task_data<T>(
    task: &'static str,
    item: &PromptItem,
    from_meta: impl Fn(&serde_json::Value) -> Option<T>,
    from_text: impl Fn(&str) -> Option<T>,
) -> Result<T, JudgeError> {
    let err = |message: String| JudgeError::Task { task, message };
    if !item.meta.is_null() {
        if let Some(other) = item.meta.get("task").and_then(|t| t.as_str()).filter(|t| *t != task) {
            return Err(err(format!("the prompt belongs to task `{other}`")));
        }
        return from_meta(&item.meta).ok_or_else(|| err(format!("cannot read the task data {}", item.meta)));
    }
    let text = match &item.text {
        Text::Plain(s) => s.as_str(),
        // A conversation's question is its last user message.
        Text::Conversation(messages) => {
            messages.iter().rev().find(|m| m.role == "user").map_or("", |m| m.content.as_str())
        }
    };
    from_text(text.trim()).ok_or_else(|| err(format!("not a `{task}` prompt and no task data: {text:?}")))
}

fn int(meta: &serde_json::Value, key: &str) -> Option<i64> {
    meta.get(key)?.as_i64()
}

/// `What is 37 + 48?` -> `Answer: 85`: `+` and `-` on 0..=99 (results may be negative),
/// `x` on 0..=12, each operator a third of the time.
pub struct Arithmetic;

#[derive(Clone, Copy, Debug, PartialEq)]
struct Sum {
    a: i64,
    op: char,
    b: i64,
}

impl Sum {
    fn answer(&self) -> i64 {
        match self.op {
            '+' => self.a + self.b,
            '-' => self.a - self.b,
            _ => self.a * self.b,
        }
    }

    fn prompt(&self) -> String {
        format!("What is {} {} {}?\n", self.a, self.op, self.b)
    }

    fn from_text(text: &str) -> Option<Self> {
        let body = text.strip_prefix("What is ")?.strip_suffix('?')?;
        let mut parts = body.split(' ');
        let (a, op, b) = (parts.next()?.parse().ok()?, parts.next()?, parts.next()?.parse().ok()?);
        let op = match op {
            "+" => '+',
            "-" => '-',
            "x" => 'x',
            _ => return None,
        };
        parts.next().is_none().then_some(Sum { a, op, b })
    }

    fn from_meta(meta: &serde_json::Value) -> Option<Self> {
        let op = match meta.get("op")?.as_str()? {
            "+" => '+',
            "-" => '-',
            "x" => 'x',
            _ => return None,
        };
        Some(Sum { a: int(meta, "a")?, op, b: int(meta, "b")? })
    }
}

impl Arithmetic {
    fn sum(&self, item: &PromptItem) -> Result<Sum, JudgeError> {
        task_data("arithmetic", item, Sum::from_meta, Sum::from_text)
    }
}

impl Task for Arithmetic {
    fn name(&self) -> &'static str {
        "arithmetic"
    }

    fn prompts(&self, n: usize, seed: u64) -> Vec<PromptItem> {
        let mut rng = prompt_rng(seed, 1);
        (0..n)
            .map(|_| {
                let op = ['+', '-', 'x'][rng.gen_range(0..3)];
                let max = if op == 'x' { 12 } else { 99 };
                let s = Sum { a: rng.gen_range(0..=max), op, b: rng.gen_range(0..=max) };
                PromptItem {
                    text: Text::Plain(s.prompt()),
                    meta: json!({"task": "arithmetic", "a": s.a, "op": op.to_string(), "b": s.b, "answer": s.answer()}),
                }
            })
            .collect()
    }

    fn grade(&self, item: &PromptItem, completion: &str) -> Result<Judgement, JudgeError> {
        Ok(grade_integer(completion, self.sum(item)?.answer()))
    }

    fn reference_answer(&self, item: &PromptItem) -> Result<String, JudgeError> {
        Ok(format!("{MARKER} {}", self.sum(item)?.answer()))
    }

    fn perturbed_answer(&self, item: &PromptItem, rng: &mut dyn RngCore) -> Result<String, JudgeError> {
        let answer = self.sum(item)?.answer();
        Ok(format!("{MARKER} {}", answer + integer_offset(rng)))
    }
}

/// A nonzero error as a model makes them: mostly off by a little, sometimes by ten.
fn integer_offset(rng: &mut dyn RngCore) -> i64 {
    let size = [1, 1, 2, 3, 5, 10][rng.gen_range(0..6)];
    if rng.gen_bool(0.5) {
        size
    } else {
        -size
    }
}

/// `Which is larger, 17 or 42?` -> `Answer: 42`: two distinct numbers in 0..=99. Graded like
/// arithmetic against the larger one, so naming the smaller earns partial credit when the two
/// are close.
pub struct Compare;

impl Compare {
    fn pair(&self, item: &PromptItem) -> Result<(i64, i64), JudgeError> {
        let from_meta = |m: &serde_json::Value| Some((int(m, "a")?, int(m, "b")?));
        let from_text = |t: &str| {
            let body = t.strip_prefix("Which is larger, ")?.strip_suffix('?')?;
            let (a, b) = body.split_once(" or ")?;
            Some((a.parse().ok()?, b.parse().ok()?))
        };
        task_data("compare", item, from_meta, from_text)
    }
}

impl Task for Compare {
    fn name(&self) -> &'static str {
        "compare"
    }

    fn prompts(&self, n: usize, seed: u64) -> Vec<PromptItem> {
        let mut rng = prompt_rng(seed, 2);
        (0..n)
            .map(|_| {
                let a: i64 = rng.gen_range(0..=99);
                let b = (a + rng.gen_range(1..=99)) % 100; // distinct from a
                PromptItem {
                    text: Text::Plain(format!("Which is larger, {a} or {b}?\n")),
                    meta: json!({"task": "compare", "a": a, "b": b, "answer": a.max(b)}),
                }
            })
            .collect()
    }

    fn grade(&self, item: &PromptItem, completion: &str) -> Result<Judgement, JudgeError> {
        let (a, b) = self.pair(item)?;
        Ok(grade_integer(completion, a.max(b)))
    }

    fn reference_answer(&self, item: &PromptItem) -> Result<String, JudgeError> {
        let (a, b) = self.pair(item)?;
        Ok(format!("{MARKER} {}", a.max(b)))
    }

    fn perturbed_answer(&self, item: &PromptItem, rng: &mut dyn RngCore) -> Result<String, JudgeError> {
        let (a, b) = self.pair(item)?;
        // The classic mistake, the smaller number, half of the time.
        let wrong = if a != b && rng.gen_bool(0.5) { a.min(b) } else { a.max(b) + integer_offset(rng) };
        Ok(format!("{MARKER} {wrong}"))
    }
}

/// `Reverse the letters: abcd` -> `Answer: dcba`: 3 to 5 letters a..z. Partial credit by edit
/// distance to the reversed string.
pub struct Reverse;

impl Reverse {
    fn letters(&self, item: &PromptItem) -> Result<String, JudgeError> {
        let from_meta = |m: &serde_json::Value| m.get("letters")?.as_str().map(String::from);
        let from_text = |t: &str| {
            let letters = t.strip_prefix("Reverse the letters: ")?;
            (!letters.is_empty() && letters.bytes().all(|c| c.is_ascii_alphabetic())).then(|| letters.to_string())
        };
        task_data("reverse", item, from_meta, from_text)
    }
}

/// Edit distance (insertions, deletions, substitutions) between two strings, by characters.
fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1).min(row[j] + 1).min(diag + usize::from(ca != cb));
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

impl Task for Reverse {
    fn name(&self) -> &'static str {
        "reverse"
    }

    fn prompts(&self, n: usize, seed: u64) -> Vec<PromptItem> {
        let mut rng = prompt_rng(seed, 3);
        (0..n)
            .map(|_| {
                let len = rng.gen_range(3..=5);
                let letters: String = (0..len).map(|_| char::from(b'a' + rng.gen_range(0..26u8))).collect();
                let answer: String = letters.chars().rev().collect();
                PromptItem {
                    text: Text::Plain(format!("Reverse the letters: {letters}\n")),
                    meta: json!({"task": "reverse", "letters": letters, "answer": answer}),
                }
            })
            .collect()
    }

    fn grade(&self, item: &PromptItem, completion: &str) -> Result<Judgement, JudgeError> {
        let answer: String = self.letters(item)?.chars().rev().collect();
        let Some((value, form)) = read_answer(completion, letters_len, |_| true) else {
            return Ok(MALFORMED);
        };
        let exact = value == answer;
        let credit = if exact {
            1.0
        } else {
            let distance = levenshtein(value, &answer) as f64;
            0.5 * (1.0 - distance / answer.chars().count().max(1) as f64).max(0.0)
        };
        Ok(Judgement { score: score(form, credit), correct: Some(exact), malformed: false })
    }

    fn reference_answer(&self, item: &PromptItem) -> Result<String, JudgeError> {
        Ok(format!("{MARKER} {}", self.letters(item)?.chars().rev().collect::<String>()))
    }

    fn perturbed_answer(&self, item: &PromptItem, rng: &mut dyn RngCore) -> Result<String, JudgeError> {
        let letters = self.letters(item)?;
        let answer: Vec<char> = letters.chars().rev().collect();
        let n = answer.len();
        // Typical mistakes, tried in a random order; substituting a letter always differs.
        for _ in 0..8 {
            let mut wrong = answer.clone();
            match rng.gen_range(0..4) {
                0 => wrong = letters.chars().collect(), // not reversed at all
                1 if n >= 2 => {
                    let i = rng.gen_range(0..n - 1);
                    wrong.swap(i, i + 1);
                }
                2 if n >= 2 => {
                    wrong.remove(rng.gen_range(0..n));
                }
                _ => {
                    let i = rng.gen_range(0..n);
                    let shift = rng.gen_range(1..26u8);
                    let c = wrong[i].to_ascii_lowercase() as u8;
                    wrong[i] = char::from(b'a' + (c.wrapping_sub(b'a') % 26 + shift) % 26);
                }
            }
            if wrong != answer {
                return Ok(format!("{MARKER} {}", wrong.into_iter().collect::<String>()));
            }
        }
        // Eight palindrome-preserving draws in a row: substitute the first letter.
        let mut wrong = answer;
        wrong[0] = if wrong[0] == 'a' { 'b' } else { 'a' };
        Ok(format!("{MARKER} {}", wrong.into_iter().collect::<String>()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tasks() -> Vec<Box<dyn Task>> {
        TASK_NAMES.iter().map(|n| task_by_name(n).unwrap()).collect()
    }

    fn item(text: &str) -> PromptItem {
        PromptItem::plain(text)
    }

    fn grade(task: &str, prompt: &str, completion: &str) -> Judgement {
        task_by_name(task).unwrap().grade(&item(prompt), completion).unwrap()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn prompts_are_a_deterministic_function_of_the_seed() {
        for task in tasks() {
            let a = task.prompts(50, 7);
            assert_eq!(a, task.prompts(50, 7), "{}", task.name());
            assert_ne!(a, task.prompts(50, 8), "{}", task.name());
            assert_eq!(&task.prompts(80, 7)[..50], &a[..], "{}: not a prefix", task.name());
            assert!(task.prompts(0, 7).is_empty());
        }
    }

    #[test]
    fn prompts_and_answers_are_short_and_well_formed() {
        for task in tasks() {
            for p in task.prompts(500, 1) {
                let Text::Plain(text) = &p.text else { panic!("plain prompts") };
                assert!(text.len() < 40 && text.ends_with('\n'), "{text:?}");
                let answer = task.reference_answer(&p).unwrap();
                assert!(answer.len() <= 13, "{answer:?}");
                assert_eq!(p.meta["task"], task.name());
                assert_eq!(format!("{MARKER} {}", p.meta["answer"].to_string().trim_matches('"')), answer);
            }
        }
    }

    #[test]
    fn arithmetic_covers_every_operator_and_negative_results() {
        let prompts = Arithmetic.prompts(300, 3);
        for op in ["+", "-", "x"] {
            assert!(prompts.iter().any(|p| p.meta["op"] == op), "no {op}");
        }
        assert!(prompts.iter().any(|p| p.meta["answer"].as_i64().unwrap() < 0));
        assert!(prompts.iter().filter(|p| p.meta["op"] == "x").all(|p| p.meta["a"].as_i64().unwrap() <= 12));
    }

    #[test]
    fn reference_answers_score_one_and_perturbed_ones_less_but_well_formed() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for task in tasks() {
            for p in task.prompts(300, 11) {
                let reference = task.reference_answer(&p).unwrap();
                assert_eq!(
                    task.grade(&p, &reference).unwrap(),
                    Judgement { score: 1.0, correct: Some(true), malformed: false },
                    "{}: {reference:?}",
                    task.name()
                );
                let wrong = task.perturbed_answer(&p, &mut rng).unwrap();
                let j = task.grade(&p, &wrong).unwrap();
                assert!(wrong != reference && j.score < 1.0 && j.score >= 0.1, "{}: {wrong:?} {j:?}", task.name());
                assert_eq!((j.correct, j.malformed), (Some(false), false), "{wrong:?}");
                // Prompts read back from a file (no task data) grade the same.
                let bare = PromptItem { text: p.text.clone(), meta: serde_json::Value::Null };
                assert_eq!(task.grade(&bare, &wrong).unwrap(), j);
            }
        }
    }

    #[test]
    fn integer_partial_credit_falls_with_the_error() {
        let p = "What is 37 + 48?\n";
        assert_eq!(grade("arithmetic", p, "Answer: 85").score, 1.0);
        assert!(close(grade("arithmetic", p, "Answer: 86").score, 0.1 + 0.9 * 0.45));
        assert!(close(grade("arithmetic", p, "Answer: 80").score, 0.1 + 0.9 * 0.25));
        assert!(close(grade("arithmetic", p, "Answer: 95").score, 0.1));
        assert!(close(grade("arithmetic", p, "Answer: -400").score, 0.1));
        // Too long for i64: far off, still well-formed.
        let huge = grade("arithmetic", p, "Answer: 99999999999999999999999");
        assert!(close(huge.score, 0.05) && !huge.malformed && huge.correct == Some(false), "{huge:?}");
    }

    #[test]
    fn format_edge_cases() {
        let p = "What is 37 + 48?\n";
        let strict = |c: &str| grade("arithmetic", p, c);
        // Surrounding whitespace is fine (decoding may add it).
        for ok in ["Answer: 85", "  Answer: 85\n", "\nAnswer: 85 \t"] {
            assert_eq!(strict(ok).score, 1.0, "{ok:?}");
        }
        // Right value, wrong form: correct, small format penalty, not malformed.
        for loose in
            ["Answer: 85 because 37+48=85", "Answer:85", "Answer:  85", "So. Answer: 85", "Answer: 085", "Answer: 85."]
        {
            let j = strict(loose);
            assert!(close(j.score, 0.95) && j.correct == Some(true) && !j.malformed, "{loose:?} {j:?}");
        }
        // No value after the marker: malformed.
        for bad in [
            "",
            "85",
            "answer: 85",
            "ANSWER: 85",
            "Answer: eighty-five",
            "Answer: -",
            "The answer is 85",
            "Answer 85",
            "Answer: + 85",
        ] {
            assert_eq!(strict(bad), MALFORMED, "{bad:?}");
        }
        // The first readable value counts.
        assert_eq!(strict("Answer: x Answer: 85").correct, Some(true));
        assert_eq!(strict("Answer: 84 Answer: 85").correct, Some(false));
    }

    #[test]
    fn negative_numbers() {
        let p = "What is 12 - 30?\n";
        assert_eq!(grade("arithmetic", p, "Answer: -18").score, 1.0);
        assert!(close(grade("arithmetic", p, "Answer: 18").score, 0.1));
        assert!(close(grade("arithmetic", p, "Answer: -17").score, 0.1 + 0.9 * 0.45));
        assert!(close(grade("arithmetic", p, "Answer: -018").score, 0.95));
        assert!(close(grade("arithmetic", p, "Answer: - 18").score, 0.0));
        assert_eq!(grade("arithmetic", "What is 3 - 3?\n", "Answer: -0").correct, Some(true));
        assert!(close(grade("arithmetic", "What is 3 - 3?\n", "Answer: -0").score, 0.95));
        assert_eq!(grade("arithmetic", "What is 7 x 8?\n", "Answer: 56").score, 1.0);
    }

    #[test]
    fn compare_grades_against_the_larger() {
        let p = "Which is larger, 17 or 42?\n";
        assert_eq!(grade("compare", p, "Answer: 42").score, 1.0);
        assert!(close(grade("compare", p, "Answer: 17").score, 0.1));
        assert!(close(grade("compare", "Which is larger, 41 or 42?\n", "Answer: 41").score, 0.1 + 0.9 * 0.45));
        assert!(grade("compare", p, "42").malformed);
    }

    #[test]
    fn reverse_credit_by_edit_distance() {
        let p = "Reverse the letters: abcd\n";
        assert_eq!(grade("reverse", p, "Answer: dcba").score, 1.0);
        assert!(close(grade("reverse", p, "Answer: dcbx").score, 0.1 + 0.9 * 0.5 * 0.75));
        assert!(close(grade("reverse", p, "Answer: cdba").score, 0.1 + 0.9 * 0.5 * 0.5));
        assert!(close(grade("reverse", p, "Answer: dcb").score, 0.1 + 0.9 * 0.5 * 0.75));
        assert!(close(grade("reverse", p, "Answer: wxyzwxyz").score, 0.1));
        assert!(close(grade("reverse", p, "Answer: dcba!").score, 0.95));
        assert!(close(grade("reverse", p, "Answer: DCBA").score, 0.1));
        for bad in ["dcba", "Answer: 1234", "Answer:", "answer: dcba"] {
            assert_eq!(grade("reverse", p, bad), MALFORMED, "{bad:?}");
        }
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("", "abc"), 3);
    }

    #[test]
    fn task_data_comes_from_meta_or_the_prompt_text() {
        let conversation = PromptItem {
            text: Text::Conversation(vec![prefopt_data::Message::new("user", "What is 2 x 6?")]),
            meta: serde_json::Value::Null,
        };
        assert_eq!(Arithmetic.grade(&conversation, "Answer: 12").unwrap().score, 1.0);
        // meta wins over the text.
        let p = PromptItem { text: Text::Plain("anything".into()), meta: json!({"a": 1, "op": "+", "b": 2}) };
        assert_eq!(Arithmetic.reference_answer(&p).unwrap(), "Answer: 3");
        let msg = |r: Result<Judgement, JudgeError>| r.unwrap_err().to_string();
        let foreign = Compare.prompts(1, 0).remove(0);
        assert!(msg(Arithmetic.grade(&foreign, "Answer: 1")).contains("belongs to task `compare`"));
        let e = msg(Reverse.grade(&item("What is 2 + 2?"), "Answer: x"));
        assert!(e.contains("task `reverse`") && e.contains("What is 2 + 2?"), "{e}");
        let e = msg(Arithmetic.grade(&PromptItem { text: Text::Plain("x".into()), meta: json!({"a": 1}) }, ""));
        assert!(e.contains("cannot read the task data"), "{e}");
    }

    #[test]
    fn unknown_task_lists_the_built_in_ones() {
        let err = task_by_name("poetry").err().unwrap().to_string();
        assert_eq!(err, "unknown task `poetry`; built-in tasks: arithmetic, compare, reverse");
    }
}
