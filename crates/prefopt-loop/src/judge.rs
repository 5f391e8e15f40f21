//! Judges behind one trait: the oracle that scores a policy's samples.
//!
//! Three kinds, chosen by the loop's `judge` key (see [`judge_from_spec`]):
//! - a built-in task's name (`arithmetic`, `compare`, `reverse`): a programmatic oracle with
//!   graded rewards, exact-answer accuracy and malformed-answer detection ([`crate::tasks`]);
//! - `rm:<model folder>`: a Hugging Face `*ForSequenceClassification` reward model
//!   ([`crate::reward_model`]);
//! - `cmd:<shell command>`: any external program speaking JSON Lines ([`crate::command`]);
//! - `llm:<base url>`: a chat model behind an OpenAI-compatible server, comparing two
//!   completions at a time ([`crate::llm_judge`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use prefopt_data::Text;

use crate::command::CommandJudge;
pub use crate::llm_judge::{JudgeEndpoint, LlmOptions, PairwiseJudge, VerdictStats};
use crate::reward_model::RewardModel;
use crate::tasks::{task_by_name, Task, TASK_NAMES};

/// A prompt and what its oracle needs to grade it.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptItem {
    pub text: Text,
    /// Task data (a built-in task's operands and answer), or null for prompts read from a
    /// file. Built-in tasks re-read their data from the prompt text when it is null.
    pub meta: serde_json::Value,
}

impl PromptItem {
    /// A prompt without task data.
    pub fn plain(text: impl Into<String>) -> Self {
        Self { text: Text::Plain(text.into()), meta: serde_json::Value::Null }
    }
}

/// One completion's verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct Judgement {
    /// Higher is better. Built-in tasks give 0..=1; reward models and commands any finite number.
    pub score: f64,
    /// Whether the answer is exactly right, where the judge knows what right is.
    pub correct: Option<bool>,
    /// Not an answer in the task's required form (out of distribution).
    pub malformed: bool,
}

impl Judgement {
    /// A bare score from a judge that knows neither correctness nor form.
    pub fn score_only(score: f64) -> Self {
        Self { score, correct: None, malformed: false }
    }
}

/// Why a judge could not score. Every message names the judge (task, folder or command) and,
/// where there is one, the prompt.
#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    /// The `judge` string is not one of the accepted forms.
    #[error("judge `{spec}`: {message}")]
    Spec { spec: String, message: String },
    #[error("unknown task `{name}`; built-in tasks: {}", TASK_NAMES.join(", "))]
    UnknownTask { name: String },
    /// A built-in task cannot read a prompt's data (wrong or missing task data).
    #[error("task `{task}`: {message}")]
    Task { task: &'static str, message: String },
    #[error("reward model {}: {message}", dir.display())]
    RewardModel { dir: PathBuf, message: String },
    /// The judge command could not be started or talked to.
    #[error("judge command `{command}`: {message}")]
    CommandIo { command: String, message: String },
    #[error(
        "judge command `{command}` timed out after {:.1} s ({replied} of {prompts} prompts answered{detail}); it was \
         killed{} (a slow judge: raise `judge_timeout_s` and rerun to continue)",
        timeout.as_secs_f64(),
        stderr_note(stderr)
    )]
    CommandTimeout {
        command: String,
        timeout: Duration,
        replied: usize,
        prompts: usize,
        detail: String,
        stderr: String,
    },
    #[error(
        "judge command `{command}` failed ({status}) after answering {replied} of {prompts} prompts{}",
        stderr_note(stderr)
    )]
    CommandFailed { command: String, status: String, replied: usize, prompts: usize, stderr: String },
    /// The command ran, but a reply line is missing or wrong.
    #[error("judge command `{command}`: prompt {prompt} (reply line {}): {problem}{}", prompt + 1, stderr_note(stderr))]
    CommandReply { command: String, prompt: usize, problem: String, stderr: String },
    #[error("judge `{judge}` returned {got} judgements for prompt {prompt} with {expected} completions")]
    Count { judge: String, prompt: usize, expected: usize, got: usize },
    /// An `llm:` judge's replies cannot be used (too many that are not a verdict).
    #[error("judge `{judge}`: {message}")]
    Replies { judge: String, message: String },
    /// An `llm:` judge's server failed.
    #[error("judge server {0}")]
    Remote(crate::remote::RemoteError),
    #[error(transparent)]
    Fs(#[from] prefopt_fs::FsError),
    #[error(transparent)]
    Model(#[from] Box<prefopt_model::ModelError>),
    #[error(transparent)]
    Data(#[from] Box<prefopt_data::DataError>),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

// Not `#[from]`: an error chain would print the server's error twice.
impl From<crate::remote::RemoteError> for JudgeError {
    fn from(e: crate::remote::RemoteError) -> Self {
        JudgeError::Remote(e)
    }
}

impl From<prefopt_model::ModelError> for JudgeError {
    fn from(e: prefopt_model::ModelError) -> Self {
        JudgeError::Model(Box::new(e))
    }
}

impl From<prefopt_data::DataError> for JudgeError {
    fn from(e: prefopt_data::DataError) -> Self {
        JudgeError::Data(Box::new(e))
    }
}

/// At most this many of the command's last stderr lines go into an error message.
const STDERR_LINES: usize = 20;

/// `; its stderr ended with: ...` (the last lines), or `; its stderr was empty`.
fn stderr_note(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return "; its stderr was empty".into();
    }
    let tail = &lines[lines.len().saturating_sub(STDERR_LINES)..];
    let what = if tail.len() < lines.len() { format!("last {} lines", tail.len()) } else { "all".into() };
    format!("; its stderr ({what}):\n    {}", tail.join("\n    "))
}

/// Scores the completions of prompts.
pub trait Judge: Send {
    /// Scores the completions of one prompt; returns exactly `completions.len()` judgements,
    /// in order, or an error.
    fn judge(&mut self, prompt: &PromptItem, completions: &[String]) -> Result<Vec<Judgement>, JudgeError>;

    /// Scores many prompts' completions at once; one `Vec` per prompt, in order. Prefer this
    /// over calling [`Judge::judge`] per prompt: the command judge runs its program once per
    /// call, not once per prompt.
    fn judge_many(&mut self, batch: &[(&PromptItem, &[String])]) -> Result<Vec<Vec<Judgement>>, JudgeError> {
        let mut out = Vec::with_capacity(batch.len());
        for (i, (prompt, completions)) in batch.iter().enumerate() {
            let judged = self.judge(prompt, completions)?;
            check_count(&self.name(), i, completions.len(), judged.len())?;
            out.push(judged);
        }
        Ok(out)
    }

    /// [`Judge::judge_many`] with a journal and progress, for judges that ask a server (the
    /// `llm:` judge keeps its replies in `call.journal` as they arrive); the others ignore both.
    fn judge_many_with(
        &mut self,
        batch: &[(&PromptItem, &[String])],
        _call: &mut JudgeCall,
    ) -> Result<Vec<Vec<Judgement>>, JudgeError> {
        self.judge_many(batch)
    }

    /// A judge that compares two completions rather than scoring one: held-out evaluation
    /// then compares the model's sample with the base model's directly.
    fn as_pairwise(&mut self) -> Option<&mut dyn PairwiseJudge> {
        None
    }

    /// The verdict counts since the last call, for judges that give verdicts (`llm:`).
    fn take_verdict_stats(&mut self) -> Option<VerdictStats> {
        None
    }

    /// How the judge is named in messages and metrics (`arithmetic`, `rm:<dir>`, `cmd:<command>`).
    fn name(&self) -> String;
}

/// Where a judge that asks a server keeps what it was told while a call runs, and who
/// hears its progress.
pub struct JudgeCall<'a> {
    /// The journal of replies: a rerun of an interrupted call asks only for the rest.
    pub journal: Option<&'a Path>,
    /// Hears (requests answered, requests).
    pub progress: &'a mut (dyn FnMut(usize, usize) + Send),
}

impl JudgeCall<'_> {
    /// No journal, no progress.
    pub fn quiet() -> JudgeCall<'static> {
        // A leaked zero-sized closure: nothing is allocated.
        JudgeCall { journal: None, progress: Box::leak(Box::new(|_, _| {})) }
    }
}

/// `Err(JudgeError::Count)` unless a judge returned one judgement per completion.
pub(crate) fn check_count(judge: &str, prompt: usize, expected: usize, got: usize) -> Result<(), JudgeError> {
    if expected == got {
        Ok(())
    } else {
        Err(JudgeError::Count { judge: judge.to_string(), prompt, expected, got })
    }
}

/// Knobs of judges that have any.
#[derive(Clone, Debug)]
pub struct JudgeOptions {
    /// Longest a `cmd:` judge may take for one call (all prompts of the call), default 300 s.
    pub command_timeout: Duration,
    /// The `llm:` judge's model, template and connection settings.
    pub llm: LlmOptions,
}

impl Default for JudgeOptions {
    fn default() -> Self {
        Self { command_timeout: CommandJudge::DEFAULT_TIMEOUT, llm: LlmOptions::default() }
    }
}

/// The judge a config string names: a built-in task name (optionally as `task:<name>`),
/// `rm:<model folder>`, `cmd:<shell command>` or `llm:<base url>`, with default options.
pub fn judge_from_spec(spec: &str, device: &candle_core::Device) -> Result<Box<dyn Judge>, JudgeError> {
    judge_from_spec_with(spec, device, &JudgeOptions::default())
}

/// [`judge_from_spec`] with explicit options.
pub fn judge_from_spec_with(
    spec: &str,
    device: &candle_core::Device,
    options: &JudgeOptions,
) -> Result<Box<dyn Judge>, JudgeError> {
    let bad = |message: String| JudgeError::Spec { spec: spec.to_string(), message };
    if let Some(dir) = spec.strip_prefix("rm:") {
        if dir.trim().is_empty() {
            return Err(bad("`rm:` needs a model folder, e.g. `rm:models/my-reward-model`".into()));
        }
        return Ok(Box::new(RewardModel::load(std::path::Path::new(dir), device)?));
    }
    if let Some(command) = spec.strip_prefix("cmd:") {
        if command.trim().is_empty() {
            return Err(bad("`cmd:` needs a shell command, e.g. `cmd:python3 judge.py`".into()));
        }
        return Ok(Box::new(CommandJudge::new(command).with_timeout(options.command_timeout)));
    }
    if let Some(url) = spec.strip_prefix("llm:") {
        return Ok(Box::new(crate::llm_judge::LlmJudge::from_options(url, &options.llm).map_err(|e| match e {
            JudgeError::Spec { message, .. } => bad(message),
            other => other,
        })?));
    }
    let name = spec.strip_prefix("task:").unwrap_or(spec);
    match task_by_name(name) {
        Ok(task) => Ok(Box::new(TaskJudge::new(task))),
        Err(_) => Err(bad(format!(
            "expected a built-in task ({}), `rm:<model folder>`, `cmd:<shell command>` or `llm:<base url>`",
            TASK_NAMES.join(", ")
        ))),
    }
}

/// A built-in task's oracle as a judge.
pub struct TaskJudge {
    task: Box<dyn Task>,
}

impl TaskJudge {
    pub fn new(task: Box<dyn Task>) -> Self {
        Self { task }
    }
}

impl Judge for TaskJudge {
    fn judge(&mut self, prompt: &PromptItem, completions: &[String]) -> Result<Vec<Judgement>, JudgeError> {
        completions.iter().map(|c| self.task.grade(prompt, c)).collect()
    }

    fn name(&self) -> String {
        self.task.name().to_string()
    }
}

/// What evaluation reports of a set of judgements (methods.md section 5).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JudgeSummary {
    pub count: usize,
    pub mean_score: f64,
    /// Share exactly right among the judgements that know; `None` when none does.
    pub accuracy: Option<f64>,
    pub malformed_rate: f64,
}

/// Mean score, accuracy and malformed rate (all 0 for an empty slice, accuracy `None`).
pub fn summarize(judgements: &[Judgement]) -> JudgeSummary {
    let n = judgements.len();
    let per = |k: usize| if n == 0 { 0.0 } else { k as f64 / n as f64 };
    let graded: Vec<bool> = judgements.iter().filter_map(|j| j.correct).collect();
    JudgeSummary {
        count: n,
        mean_score: if n == 0 { 0.0 } else { judgements.iter().map(|j| j.score).sum::<f64>() / n as f64 },
        accuracy: (!graded.is_empty()).then(|| graded.iter().filter(|&&c| c).count() as f64 / graded.len() as f64),
        malformed_rate: per(judgements.iter().filter(|j| j.malformed).count()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn spec_picks_the_judge_kind() {
        let dev = Device::Cpu;
        assert_eq!(judge_from_spec("arithmetic", &dev).unwrap().name(), "arithmetic");
        assert_eq!(judge_from_spec("task:reverse", &dev).unwrap().name(), "reverse");
        assert_eq!(judge_from_spec("cmd:cat", &dev).unwrap().name(), "cmd:cat");
        let rm = format!("rm:{}/../../fixtures/models/qwen2-rm", env!("CARGO_MANIFEST_DIR"));
        assert!(judge_from_spec(&rm, &dev).unwrap().name().starts_with("rm:"));
    }

    #[test]
    fn bad_specs_say_what_is_accepted() {
        let dev = Device::Cpu;
        let msg = |spec: &str| judge_from_spec(spec, &dev).err().map(|e| e.to_string()).unwrap();
        let unknown = msg("poetry");
        assert!(unknown.contains("poetry") && unknown.contains("arithmetic, compare, reverse"), "{unknown}");
        assert!(unknown.contains("rm:<model folder>") && unknown.contains("cmd:<shell command>"), "{unknown}");
        assert!(unknown.contains("llm:<base url>"), "{unknown}");
        assert!(msg("llm:http://localhost:8000/v1").contains("needs `judge_model`"));
        assert!(msg("llm:localhost:8000").contains("is not an http:// or https:// URL"));
        assert!(msg("cmd:  ").contains("needs a shell command"));
        assert!(msg("rm:").contains("needs a model folder"));
        assert!(msg("rm:/no/such/folder").contains("/no/such/folder"));
    }

    #[test]
    fn task_judge_grades_every_completion_in_order() {
        let mut judge = judge_from_spec("arithmetic", &Device::Cpu).unwrap();
        let item = PromptItem::plain("What is 2 + 3?\n");
        let got = judge.judge(&item, &["Answer: 5".into(), "Answer: 6".into(), "five".into()]).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], Judgement { score: 1.0, correct: Some(true), malformed: false });
        assert!(got[1].score < 1.0 && got[1].correct == Some(false) && !got[1].malformed);
        assert!(got[2].malformed && got[2].score == 0.0);
        let many = judge.judge_many(&[(&item, &["Answer: 5".to_string()][..]), (&item, &[][..])]).unwrap();
        assert_eq!(many.iter().map(Vec::len).collect::<Vec<_>>(), [1, 0]);
    }

    #[test]
    fn summary_counts_accuracy_only_where_known() {
        let js = [
            Judgement { score: 1.0, correct: Some(true), malformed: false },
            Judgement { score: 0.0, correct: Some(false), malformed: true },
            Judgement::score_only(0.5),
        ];
        let s = summarize(&js);
        assert_eq!(s.count, 3);
        assert!((s.mean_score - 0.5).abs() < 1e-12);
        assert_eq!(s.accuracy, Some(0.5));
        assert!((s.malformed_rate - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(summarize(&[Judgement::score_only(2.0)]).accuracy, None);
        assert_eq!(summarize(&[]).count, 0);
    }

    #[test]
    fn stderr_note_keeps_the_last_lines() {
        let long: String = (0..30).map(|i| format!("line {i}\n")).collect();
        let note = stderr_note(&long);
        assert!(note.contains("last 20 lines") && note.contains("line 29") && !note.contains("line 9\n"));
        assert_eq!(stderr_note(" \n"), "; its stderr was empty");
    }
}
