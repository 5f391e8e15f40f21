//! Judges behind one trait: built-in task oracles and an external command (`cmd:`).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use prefopt_data::Text;

use crate::tasks::task_by_name;

/// A prompt and what its oracle needs to grade it (a task's operands and answer, or null).
#[derive(Clone, Debug)]
pub struct PromptItem {
    pub text: Text,
    pub meta: serde_json::Value,
}

/// One completion's verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct Judgement {
    pub score: f64,
    /// Exactly right, where the judge knows what right is.
    pub correct: Option<bool>,
    /// Not an answer in the expected form (out of distribution).
    pub malformed: bool,
}

/// Why a judge could not score.
#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    #[error("judge `{spec}`: {message}")]
    Spec { spec: String, message: String },
    #[error("judge command `{command}`: {message}")]
    Command { command: String, message: String },
}

/// Scores completions of one prompt.
pub trait Judge {
    /// Exactly one judgement per completion, in order, or an error.
    fn judge(&mut self, prompt: &PromptItem, completions: &[String]) -> Result<Vec<Judgement>, JudgeError>;
    fn name(&self) -> String;
}

/// `<task name>`, or `cmd:<shell command>`.
pub fn judge_from_spec(spec: &str, _device: &candle_core::Device) -> Result<Box<dyn Judge>, JudgeError> {
    if let Some(command) = spec.strip_prefix("cmd:") {
        return Ok(Box::new(CommandJudge { command: command.to_string(), timeout: Duration::from_secs(300) }));
    }
    if spec.starts_with("rm:") {
        return Err(JudgeError::Spec {
            spec: spec.into(),
            message: "reward-model judges are not available yet; use a built-in task or cmd:<command>".into(),
        });
    }
    let task = task_by_name(spec).map_err(|e| JudgeError::Spec { spec: spec.into(), message: e.to_string() })?;
    Ok(Box::new(TaskJudge { task }))
}

/// A built-in task's oracle.
struct TaskJudge {
    task: Box<dyn crate::tasks::Task>,
}

impl Judge for TaskJudge {
    fn judge(&mut self, prompt: &PromptItem, completions: &[String]) -> Result<Vec<Judgement>, JudgeError> {
        completions.iter().map(|c| self.task.grade(prompt, c).map_err(|message| JudgeError::Spec { spec: self.task.name().into(), message })).collect()
    }

    fn name(&self) -> String {
        self.task.name().to_string()
    }
}

/// `cmd:<shell command>`: prefopt writes one JSONL line `{"prompt", "completions"}` to the
/// command's stdin and reads one line `{"scores": [..]}` from its stdout, per call.
pub struct CommandJudge {
    pub command: String,
    pub timeout: Duration,
}

impl CommandJudge {
    fn fail(&self, message: String) -> JudgeError {
        JudgeError::Command { command: self.command.clone(), message }
    }
}

impl Judge for CommandJudge {
    fn judge(&mut self, prompt: &PromptItem, completions: &[String]) -> Result<Vec<Judgement>, JudgeError> {
        let line = serde_json::json!({"prompt": crate::sampling::text_to_json(&prompt.text), "completions": completions});
        let mut child = Command::new("sh")
            .args(["-c", &self.command])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| self.fail(format!("could not start: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A command that does not read its input closes the pipe early; its reply decides.
            match writeln!(stdin, "{line}") {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(self.fail(format!("writing its stdin: {e}"))),
                _ => {}
            }
        }
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| self.fail(e.to_string()))? {
                break status;
            }
            if started.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                return Err(self.fail(format!("timed out after {} s", self.timeout.as_secs())));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut stdout = String::new();
        let mut stderr = String::new();
        if let Some(mut s) = child.stdout.take() {
            let _ = s.read_to_string(&mut stdout);
        }
        if let Some(mut s) = child.stderr.take() {
            let _ = s.read_to_string(&mut stderr);
        }
        if !status.success() {
            let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
            return Err(self.fail(format!("exited with {status}; stderr: {}", tail.into_iter().rev().collect::<Vec<_>>().join(" | "))));
        }
        let reply = stdout.lines().find(|l| !l.trim().is_empty()).ok_or_else(|| self.fail("printed no reply line".into()))?;
        let value: serde_json::Value = serde_json::from_str(reply).map_err(|e| self.fail(format!("reply is not JSON ({e}): {reply}")))?;
        let scores = value
            .get("scores")
            .and_then(|s| s.as_array())
            .ok_or_else(|| self.fail(format!("reply has no `scores` list: {reply}")))?;
        if scores.len() != completions.len() {
            return Err(self.fail(format!("returned {} scores for {} completions", scores.len(), completions.len())));
        }
        scores
            .iter()
            .enumerate()
            .map(|(i, s)| match s.as_f64() {
                Some(x) if x.is_finite() => Ok(Judgement { score: x, correct: None, malformed: false }),
                _ => Err(self.fail(format!("score {i} is not a finite number: {s}"))),
            })
            .collect()
    }

    fn name(&self) -> String {
        format!("cmd:{}", self.command)
    }
}
