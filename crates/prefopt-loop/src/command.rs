//! `cmd:<shell command>`: any program as a judge (an LLM-as-judge script, PairRM in Python).
//!
//! Protocol, one process run per call (all prompts of an iteration at once):
//! - prefopt runs `sh -c '<command>'` and writes one JSON line per prompt to its stdin, then
//!   closes it: `{"prompt": <string or [{role, content}, ..]>, "completions": ["..", ..]}`,
//!   plus `"meta": {..}` when the prompt carries task data;
//! - the command prints one JSON line per prompt to stdout, in order:
//!   `{"scores": [<number>, ..]}`, one finite number per completion, higher is better.
//!   Optional, for evaluation: `"correct": [true/false/null, ..]` and `"malformed": [bool, ..]`.
//!   Blank lines are ignored; diagnostics belong on stderr;
//! - it exits with status 0.
//!
//! Anything else is an error that names the command, the prompt and the problem, with the
//! last lines of the command's stderr: a timeout (the command and everything it started
//! are killed), a non-zero exit, a missing or extra line, a line that is not JSON, a wrong
//! number of scores, a score that is not a finite number.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::judge::{Judge, JudgeError, Judgement, PromptItem};

/// A judge that runs an external command (see the module doc for the protocol).
pub struct CommandJudge {
    command: String,
    timeout: Duration,
}

/// Keep at most this much of the command's stderr (its end).
const STDERR_KEEP: usize = 64 * 1024;

impl CommandJudge {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

    /// A judge running `command` with `sh -c`.
    pub fn new(command: impl Into<String>) -> Self {
        Self { command: command.into(), timeout: Self::DEFAULT_TIMEOUT }
    }

    /// The longest one call (one run of the command, all its prompts) may take.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn command(&self) -> &str {
        &self.command
    }

    fn io_error(&self, message: String) -> JudgeError {
        JudgeError::CommandIo { command: self.command.clone(), message }
    }

    /// Runs the command once over all of `batch` and reads its verdicts.
    pub fn run(&self, batch: &[(&PromptItem, &[String])]) -> Result<Vec<Vec<Judgement>>, JudgeError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut input = Vec::new();
        for (prompt, completions) in batch {
            let mut line = serde_json::json!({"prompt": prompt.text.to_json(), "completions": completions});
            if !prompt.meta.is_null() {
                line["meta"] = prompt.meta.clone();
            }
            serde_json::to_writer(&mut input, &line).map_err(|e| self.io_error(format!("encoding a prompt: {e}")))?;
            input.push(b'\n');
        }
        let (status, stdout, stderr) = self.execute(input, batch.len())?;
        let stdout = String::from_utf8_lossy(&stdout);
        let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
        if !status.success() {
            return Err(JudgeError::CommandFailed {
                command: self.command.clone(),
                status: describe_status(&status),
                replied: lines.len().min(batch.len()),
                prompts: batch.len(),
                stderr,
            });
        }
        let reply_error = |prompt: usize, problem: String| JudgeError::CommandReply {
            command: self.command.clone(),
            prompt,
            problem,
            stderr: stderr.clone(),
        };
        if lines.len() > batch.len() {
            return Err(reply_error(
                batch.len(),
                format!(
                    "{} reply lines for {} prompts; the extra line is {}; print one line per prompt to stdout \
                     and anything else to stderr",
                    lines.len(),
                    batch.len(),
                    snippet(lines[batch.len()])
                ),
            ));
        }
        let mut out = Vec::with_capacity(batch.len());
        for (i, (_, completions)) in batch.iter().enumerate() {
            let Some(line) = lines.get(i) else {
                return Err(reply_error(
                    i,
                    format!("no reply line: the command printed {} lines for {} prompts", lines.len(), batch.len()),
                ));
            };
            out.push(parse_reply(line, completions.len()).map_err(|problem| reply_error(i, problem))?);
        }
        Ok(out)
    }

    /// Runs the command with `input` on stdin; returns its status, stdout and stderr's tail,
    /// or a timeout error (after killing it and its process group).
    fn execute(
        &self,
        input: Vec<u8>,
        prompts: usize,
    ) -> Result<(std::process::ExitStatus, Vec<u8>, String), JudgeError> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(&self.command).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // Its own process group, so that a timeout kills what the shell started too.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(|e| self.io_error(format!("cannot start `sh -c`: {e}")))?;
        let started = Instant::now();

        let mut stdin = child.stdin.take().ok_or_else(|| self.io_error("no stdin pipe".into()))?;
        let writer = std::thread::spawn(move || -> std::io::Result<()> {
            // A command that exits without reading its input is not an error by itself.
            match stdin.write_all(&input) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                other => other,
            }
        });
        let stdout_rx = read_in_background(child.stdout.take(), usize::MAX);
        let stderr_rx = read_in_background(child.stderr.take(), STDERR_KEEP);

        let deadline = started + self.timeout;
        let timed_out = |child: &mut Child| {
            kill_group(child);
            // The pipes close once the group is dead; take what it said so far.
            let stderr = stderr_rx.recv_timeout(Duration::from_secs(2)).map(|b| tail(&b)).unwrap_or_default();
            let stdout = stdout_rx.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
            let replied = String::from_utf8_lossy(&stdout).lines().filter(|l| !l.trim().is_empty()).count();
            JudgeError::CommandTimeout {
                command: self.command.clone(),
                timeout: self.timeout,
                replied: replied.min(prompts),
                prompts,
                detail: String::new(),
                stderr,
            }
        };
        // Wait for the exit, then for stdout to close (a background process may hold it).
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => {
                    kill_group(&mut child);
                    return Err(self.io_error(format!("waiting for it: {e}")));
                }
            }
            if Instant::now() >= deadline {
                return Err(timed_out(&mut child));
            }
            std::thread::sleep(poll_interval(started));
        };
        let stdout = match stdout_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(bytes) => bytes,
            Err(_) => {
                let mut err = timed_out(&mut child);
                if let JudgeError::CommandTimeout { detail, .. } = &mut err {
                    *detail = ", then it exited but its stdout stayed open: a background process it started?".into();
                }
                return Err(err);
            }
        };
        let stderr = stderr_rx.recv_timeout(Duration::from_secs(2)).map(|b| tail(&b)).unwrap_or_default();
        match writer.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) if status.success() => return Err(self.io_error(format!("writing its stdin: {e}"))),
            _ => {}
        }
        Ok((status, stdout, stderr))
    }
}

impl Judge for CommandJudge {
    fn judge(&mut self, prompt: &PromptItem, completions: &[String]) -> Result<Vec<Judgement>, JudgeError> {
        Ok(self.run(&[(prompt, completions)])?.remove(0))
    }

    fn judge_many(&mut self, batch: &[(&PromptItem, &[String])]) -> Result<Vec<Vec<Judgement>>, JudgeError> {
        self.run(batch)
    }

    fn name(&self) -> String {
        format!("cmd:{}", self.command)
    }
}

/// Reads a pipe to its end on a thread; the receiver gets the bytes (at most the last `keep`).
fn read_in_background<R: Read + Send + 'static>(pipe: Option<R>, keep: usize) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(mut pipe) = pipe {
            let mut buf = [0u8; 8192];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        out.extend_from_slice(&buf[..n]);
                        if out.len() > 2 * keep.min(usize::MAX / 2) {
                            out.drain(..out.len() - keep);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        if out.len() > keep {
            out.drain(..out.len() - keep);
        }
        let _ = tx.send(out);
    });
    rx
}

/// Short sleeps at first (quick commands return fast), then at most 50 ms.
fn poll_interval(started: Instant) -> Duration {
    let ms = (started.elapsed().as_millis() / 20).clamp(1, 50) as u64;
    Duration::from_millis(ms)
}

/// Kills the command's process group (the shell and everything it started), then reaps it.
fn kill_group(child: &mut Child) {
    #[cfg(unix)]
    {
        // The group id is the shell's pid (`process_group(0)`); `kill` is the shell builtin
        // (dash's takes neither `--` nor `-s KILL` before a negative pid, but `-9 -PGID`).
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!("kill -9 -{} 2>/dev/null", child.id()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `exit status 3`, `killed by signal 9`.
fn describe_status(status: &std::process::ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit status {code}");
    }
    #[cfg(unix)]
    if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(status) {
        return format!("killed by signal {signal}");
    }
    status.to_string()
}

fn tail(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A reply line shortened for messages.
fn snippet(line: &str) -> String {
    const MAX: usize = 120;
    if line.chars().count() <= MAX {
        format!("{line:?}")
    } else {
        format!("{:?}...", line.chars().take(MAX).collect::<String>())
    }
}

/// One reply line -> one judgement per completion, or what is wrong with it.
fn parse_reply(line: &str, completions: usize) -> Result<Vec<Judgement>, String> {
    let value: Value = serde_json::from_str(line.trim()).map_err(|e| {
        let hint = if ["NaN", "Infinity"].iter().any(|w| line.contains(w)) {
            " (NaN and Infinity are not JSON numbers: every score must be finite)"
        } else if e.to_string().contains("out of range") {
            " (a score is too large for a 64-bit float: every score must be finite)"
        } else {
            ""
        };
        format!("not a JSON line ({e}){hint}: {}", snippet(line))
    })?;
    let Some(obj) = value.as_object() else {
        return Err(format!("expected an object {{\"scores\": [..]}}, found {}", snippet(line)));
    };
    let scores = match obj.get("scores") {
        Some(Value::Array(s)) => s,
        Some(other) => return Err(format!("`scores` must be a list of numbers, found {other}")),
        None => return Err(format!("no `scores` key in {}", snippet(line))),
    };
    if scores.len() != completions {
        return Err(format!("returned {} scores for {completions} completions", scores.len()));
    }
    let list_of = |key: &str| -> Result<Option<&Vec<Value>>, String> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) if a.len() == completions => Ok(Some(a)),
            Some(Value::Array(a)) => Err(format!("`{key}` has {} entries for {completions} completions", a.len())),
            Some(other) => Err(format!("`{key}` must be a list, found {other}")),
        }
    };
    let correct = list_of("correct")?;
    let malformed = list_of("malformed")?;
    let mut out = Vec::with_capacity(completions);
    for (j, s) in scores.iter().enumerate() {
        let score = match s.as_f64() {
            Some(x) if x.is_finite() => x,
            _ if s.is_number() => return Err(format!("score {j} ({s}) is not a finite number")),
            _ => return Err(format!("score {j} is {s}, not a finite number")),
        };
        let correct = match correct.map(|c| &c[j]) {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => return Err(format!("`correct` entry {j} is {other}, not true/false/null")),
        };
        let malformed = match malformed.map(|m| &m[j]) {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(format!("`malformed` entry {j} is {other}, not true/false")),
        };
        out.push(Judgement { score, correct, malformed });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompts(n: usize) -> Vec<PromptItem> {
        (0..n).map(|i| PromptItem::plain(format!("prompt {i}"))).collect()
    }

    fn two() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    /// Runs `command` over `n` prompts with two completions each.
    fn run(command: &str, n: usize, timeout: Duration) -> Result<Vec<Vec<Judgement>>, JudgeError> {
        let items = prompts(n);
        let completions = two();
        let batch: Vec<(&PromptItem, &[String])> = items.iter().map(|p| (p, &completions[..])).collect();
        CommandJudge::new(command).with_timeout(timeout).run(&batch)
    }

    fn ok(command: &str, n: usize) -> Vec<Vec<Judgement>> {
        run(command, n, Duration::from_secs(20)).unwrap()
    }

    fn err(command: &str, n: usize) -> String {
        run(command, n, Duration::from_secs(20)).unwrap_err().to_string()
    }

    const ECHO_SCORES: &str = r#"while read l; do echo '{"scores": [1, 0.5]}'; done"#;

    #[test]
    fn one_process_answers_every_prompt_in_order() {
        let got = ok(ECHO_SCORES, 3);
        assert_eq!(got.len(), 3);
        assert_eq!(got[2], vec![Judgement::score_only(1.0), Judgement::score_only(0.5)]);
        // Line k answers prompt k; blank lines are ignored.
        let counting = r#"i=0; while read l; do i=$((i+1)); echo; echo "{\"scores\": [$i, -$i]}"; done"#;
        let got = ok(counting, 4);
        assert_eq!(got.iter().map(|j| j[0].score).collect::<Vec<_>>(), [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(got[3][1].score, -4.0);
    }

    #[test]
    fn writes_one_json_line_per_prompt() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("in.jsonl");
        let command = format!(r#"tee {} | while read l; do echo '{{"scores": [0, 0]}}'; done"#, log.display());
        let items = [
            PromptItem::plain("What is 1 + 1?\n"),
            PromptItem {
                text: prefopt_data::Text::Conversation(vec![prefopt_data::Message::new("user", "hi \"there\"\nok")]),
                meta: serde_json::json!({"task": "x", "answer": 2}),
            },
        ];
        let completions = vec!["Answer: 2".to_string(), "line\nbreak é".to_string()];
        let batch: Vec<(&PromptItem, &[String])> = items.iter().map(|p| (p, &completions[..])).collect();
        CommandJudge::new(command).run(&batch).unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], serde_json::json!({"prompt": "What is 1 + 1?\n", "completions": completions}));
        assert_eq!(lines[1]["prompt"], serde_json::json!([{"role": "user", "content": "hi \"there\"\nok"}]));
        assert_eq!(lines[1]["meta"]["answer"], 2);
    }

    #[test]
    fn optional_correct_and_malformed_lists() {
        let got = ok(r#"read l; echo '{"scores": [1, 0], "correct": [true, null], "malformed": [false, true]}'"#, 1);
        assert_eq!(got[0][0], Judgement { score: 1.0, correct: Some(true), malformed: false });
        assert_eq!(got[0][1], Judgement { score: 0.0, correct: None, malformed: true });
        let e = err(r#"read l; echo '{"scores": [1, 0], "malformed": [false]}'"#, 1);
        assert!(e.contains("`malformed` has 1 entries for 2 completions"), "{e}");
    }

    #[test]
    fn a_crash_reports_the_status_and_stderr() {
        let e = err(r#"read l; echo '{"scores": [1, 2]}'; echo "Traceback: boom" >&2; exit 3"#, 2);
        assert!(e.contains("judge command `read l;"), "{e}");
        assert!(e.contains("failed (exit status 3) after answering 1 of 2 prompts"), "{e}");
        assert!(e.contains("Traceback: boom"), "{e}");
        let e = err("no-such-judge-program-xyz", 1);
        assert!(e.contains("exit status 127") && e.contains("not found"), "{e}");
        let e = err("kill -9 $$", 1);
        assert!(e.contains("killed by signal 9") && e.contains("stderr was empty"), "{e}");
    }

    #[test]
    fn a_slow_command_is_killed_at_the_timeout() {
        let t = Instant::now();
        let e = run("echo started >&2; sleep 30", 2, Duration::from_millis(300)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
        let msg = e.to_string();
        assert!(matches!(e, JudgeError::CommandTimeout { prompts: 2, .. }), "{msg}");
        assert!(msg.contains("timed out after 0.3 s") && msg.contains("started"), "{msg}");
        // A background process holding stdout open after the shell exits is killed too.
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let t = Instant::now();
        let command = format!(
            r#"sleep 30 & echo $! > {}; while read l; do echo '{{"scores": [1, 2]}}'; done"#,
            pid_file.display()
        );
        let msg = run(&command, 1, Duration::from_millis(500)).unwrap_err().to_string();
        assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
        assert!(msg.contains("(1 of 1 prompts answered, then it exited but its stdout stayed open"), "{msg}");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let gone = || {
            std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
                .map_or(true, |stat| stat.split(' ').nth(2) == Some("Z"))
        };
        let t = Instant::now();
        while !gone() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(gone(), "the background sleep {pid} survived");
    }

    #[test]
    fn wrong_line_and_score_counts_name_the_prompt() {
        let e = err(r#"read l; echo '{"scores": [1, 2]}'"#, 3);
        assert!(e.contains("prompt 1 (reply line 2): no reply line: the command printed 1 lines for 3 prompts"), "{e}");
        let e = err(r#"while read l; do echo '{"scores": [1, 2]}'; done; echo '{"scores": [3, 4]}'"#, 2);
        assert!(e.contains("3 reply lines for 2 prompts") && e.contains("stderr"), "{e}");
        let e = err(r#"read l; echo '{"scores": [1, 2]}'; read l; echo '{"scores": [1]}'"#, 2);
        assert!(e.contains("prompt 1 (reply line 2): returned 1 scores for 2 completions"), "{e}");
    }

    #[test]
    fn non_numeric_and_non_finite_scores_are_errors() {
        let cases = [
            (r#"{"scores": [NaN, 1]}"#, "NaN and Infinity are not JSON numbers"),
            (r#"{"scores": [1, -Infinity]}"#, "NaN and Infinity are not JSON numbers"),
            (r#"{"scores": [1, 1e999]}"#, "too large for a 64-bit float"),
            (r#"{"scores": [1, "0.5"]}"#, "score 1 is \"0.5\", not a finite number"),
            (r#"{"scores": [1, null]}"#, "score 1 is null, not a finite number"),
            (r#"{"scores": 1}"#, "`scores` must be a list"),
            (r#"{"score": [1, 2]}"#, "no `scores` key"),
            (r#"[1, 2]"#, "expected an object"),
            ("hello", "not a JSON line"),
        ];
        for (reply, expected) in cases {
            let e = err(&format!("read l; echo '{reply}'"), 1);
            assert!(e.contains("prompt 0") && e.contains(expected), "{reply}: {e}");
        }
    }

    #[test]
    fn single_prompt_calls_and_empty_batches() {
        let mut judge = CommandJudge::new(ECHO_SCORES);
        let item = PromptItem::plain("p");
        assert_eq!(judge.judge(&item, &two()).unwrap().len(), 2);
        assert!(judge.judge_many(&[]).unwrap().is_empty());
        // Empty completion lists are sent too.
        assert_eq!(CommandJudge::new(r#"read l; echo '{"scores": []}'"#).judge(&item, &[]).unwrap(), vec![]);
    }

    #[test]
    fn a_command_that_ignores_its_input_is_fine() {
        let items = prompts(2000);
        let completions: Vec<String> = vec!["x".repeat(1000)];
        let batch: Vec<(&PromptItem, &[String])> = items.iter().map(|p| (p, &completions[..])).collect();
        let got = CommandJudge::new(r#"for i in $(seq 2000); do echo '{"scores": [0.25]}'; done"#).run(&batch).unwrap();
        assert_eq!(got.len(), 2000);
    }
}
