//! Sampling from an OpenAI-compatible completion server (vLLM, SGLang, `transformers serve`)
//! instead of in-process: `sampler = "openai"` in `prefopt apo`.
//!
//! Each prompt, rendered by prefopt's own chat template (so the sampled and the trained tokens
//! agree), is one `POST <sampler_url>/completions` with `n = K`, the loop's temperature,
//! top_p and max_tokens, and a seed of its own. What can go wrong, and what happens:
//!
//! - 429 and 5xx answers, timeouts and refused connections are retried, up to
//!   `sampler_retries` times per request, after `sampler_backoff_s * 2^attempt` seconds (at
//!   most 30), or after the `Retry-After` seconds of a 429 when it gives them;
//! - any other status, or a body that is not the completions JSON, stops the stage at once;
//! - fewer choices than asked (`transformers serve` ignores `n`): the missing ones are asked
//!   for again, with the next seeds, until K are there (each ask counts as an attempt);
//! - every error names the URL, the status and the prompt index.
//!
//! Answers are appended to a partial file as they arrive (one JSON line per prompt); a rerun
//! of an interrupted stage reads it back and asks only for the prompts not in it (a line cut
//! by a kill is ignored). Token ids come from the server when it returns them (vLLM's
//! `return_token_ids`); otherwise the text is tokenized here, and completions whose tokens do
//! not decode back to the same text are counted.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::LoopError;

/// How to reach the server and how hard to try.
#[derive(Clone, Debug)]
pub struct RemoteSampler {
    /// Base URL ending in `/v1` (no trailing slash).
    pub url: String,
    /// The bearer token, read from the environment variable the config names.
    pub api_key: Option<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    pub timeout: Duration,
    pub retries: usize,
    pub backoff_s: f64,
}

/// What one request asks for.
#[derive(Clone, Debug)]
pub struct CompletionRequest<'a> {
    /// The `model` field: a name the server knows, or a folder it loads (`sampler_sync = "path"`).
    pub model: &'a str,
    pub n: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: usize,
}

/// One prompt's K completions as the server returned them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RemoteAnswer {
    pub prompt_index: usize,
    pub texts: Vec<String>,
    /// The completions' token ids, when the server returned them (every choice).
    pub token_ids: Option<Vec<Vec<u32>>>,
}

#[derive(Deserialize)]
struct Choice {
    text: String,
    #[serde(default)]
    token_ids: Option<Vec<u32>>,
}

#[derive(Deserialize)]
struct Completions {
    choices: Vec<Choice>,
}

/// Why one attempt failed: worth another try (after how long, if the server said), or not.
enum Failure {
    Retry { message: String, after: Option<f64> },
    Fatal(String),
}

impl RemoteSampler {
    /// The K completions of every prompt of `prompts` (rendered text), each prompt i with
    /// seeds `seed_of(i) + j`. Answers in `partial` (from an interrupted run) are kept and not
    /// asked again; new ones are appended as they arrive. `progress` hears (done, total).
    pub fn sample(
        &self,
        request: &CompletionRequest,
        prompts: &[String],
        seed_of: impl Fn(usize) -> u64 + Sync,
        partial: &Path,
        progress: &mut (dyn FnMut(usize, usize) + Send),
    ) -> Result<Vec<RemoteAnswer>, LoopError> {
        let mut answers: Vec<Option<RemoteAnswer>> = vec![None; prompts.len()];
        for a in read_partial(partial) {
            if a.prompt_index < prompts.len() && a.texts.len() == request.n {
                let i = a.prompt_index;
                answers[i] = Some(a);
            }
        }
        let todo: Vec<usize> = (0..prompts.len()).filter(|&i| answers[i].is_none()).collect();
        let done = AtomicUsize::new(prompts.len() - todo.len());
        let next = AtomicUsize::new(0);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(partial)
            .map_err(|e| prefopt_fs::FsError::io(partial, e))?;
        // A line cut by a kill ends the file without a newline: start the next one on its own.
        if std::fs::read(partial).is_ok_and(|b| b.last().is_some_and(|&c| c != b'\n')) {
            writeln!(file).map_err(|e| prefopt_fs::FsError::io(partial, e))?;
        }
        let shared = Mutex::new((file, answers, progress));
        let first_error: Mutex<Option<LoopError>> = Mutex::new(None);
        // One agent for the stage: its workers share a pool of kept-alive connections.
        let agent = ureq::AgentBuilder::new().timeout(self.timeout).build();
        std::thread::scope(|s| {
            for _ in 0..self.concurrency.clamp(1, todo.len().max(1)) {
                s.spawn(|| loop {
                    if first_error.lock().map(|e| e.is_some()).unwrap_or(true) {
                        return;
                    }
                    let k = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&i) = todo.get(k) else { return };
                    let result = self.complete(&agent, request, i, &prompts[i], seed_of(i)).and_then(|answer| {
                        let mut guard = shared.lock().map_err(|_| remote_error(&self.url, i, "a worker panicked"))?;
                        let (file, answers, progress) = &mut *guard;
                        let line = serde_json::to_string(&answer).map_err(|e| remote_error(&self.url, i, e))?;
                        writeln!(file, "{line}")
                            .and_then(|()| file.flush())
                            .map_err(|e| prefopt_fs::FsError::io(partial, e))?;
                        answers[i] = Some(answer);
                        progress(done.fetch_add(1, Ordering::SeqCst) + 1, prompts.len());
                        Ok(())
                    });
                    if let Err(e) = result {
                        if let Ok(mut slot) = first_error.lock() {
                            slot.get_or_insert(e);
                        }
                        return;
                    }
                });
            }
        });
        if let Some(e) = first_error.into_inner().ok().flatten() {
            return Err(e);
        }
        let (_, answers, _) = shared.into_inner().map_err(|_| remote_error(&self.url, 0, "a worker panicked"))?;
        Ok(answers.into_iter().flatten().collect())
    }

    /// All `request.n` completions of prompt `i`: asks again for what a short answer lacks.
    fn complete(
        &self,
        agent: &ureq::Agent,
        request: &CompletionRequest,
        i: usize,
        prompt: &str,
        seed: u64,
    ) -> Result<RemoteAnswer, LoopError> {
        let (mut texts, mut ids, mut all_ids) = (Vec::new(), Vec::new(), true);
        let mut attempt = 0;
        while texts.len() < request.n {
            let missing = request.n - texts.len();
            let body = serde_json::json!({
                "model": request.model,
                "prompt": prompt,
                "n": missing,
                "temperature": request.temperature,
                "top_p": request.top_p,
                "max_tokens": request.max_tokens,
                "seed": seed + texts.len() as u64,
                "return_token_ids": true,
            });
            match self.post(agent, "completions", &body) {
                Ok(text) => {
                    let parsed: Completions = serde_json::from_str(&text).map_err(|e| {
                        remote_error(
                            &self.url,
                            i,
                            format!("the answer is not completions JSON ({e}): {}", snippet(&text)),
                        )
                    })?;
                    if parsed.choices.is_empty() {
                        attempt += 1;
                        if attempt > self.retries {
                            return Err(remote_error(&self.url, i, format!("no choices after {attempt} requests")));
                        }
                    }
                    for c in parsed.choices.into_iter().take(missing) {
                        all_ids &= c.token_ids.is_some();
                        ids.push(c.token_ids.unwrap_or_default());
                        texts.push(c.text);
                    }
                }
                Err(Failure::Fatal(message)) => return Err(remote_error(&self.url, i, message)),
                Err(Failure::Retry { message, after }) => {
                    if attempt >= self.retries {
                        return Err(remote_error(
                            &self.url,
                            i,
                            format!("{message} (gave up after {} attempts)", attempt + 1),
                        ));
                    }
                    let wait = after.unwrap_or(self.backoff_s * 2f64.powi(attempt as i32)).min(30.0);
                    std::thread::sleep(Duration::from_secs_f64(wait));
                    attempt += 1;
                }
            }
        }
        Ok(RemoteAnswer { prompt_index: i, texts, token_ids: all_ids.then_some(ids) })
    }

    /// One POST to `<url>/<path>`: the body on 2xx, else why it failed.
    fn post(&self, agent: &ureq::Agent, path: &str, body: &serde_json::Value) -> Result<String, Failure> {
        let mut req = agent.post(&format!("{}/{path}", self.url));
        if let Some(key) = &self.api_key {
            req = req.set("Authorization", &format!("Bearer {key}"));
        }
        match req.send_json(body) {
            Ok(resp) => resp
                .into_string()
                .map_err(|e| Failure::Retry { message: format!("reading the answer: {e}"), after: None }),
            Err(ureq::Error::Status(code, resp)) => {
                let after = resp.header("Retry-After").and_then(|v| v.trim().parse::<f64>().ok());
                let text = resp.into_string().unwrap_or_default();
                let message = format!("HTTP {code}: {}", snippet(&text));
                if code == 429 || code >= 500 {
                    Err(Failure::Retry { message, after: if code == 429 { after } else { None } })
                } else {
                    Err(Failure::Fatal(message))
                }
            }
            Err(ureq::Error::Transport(t)) => Err(Failure::Retry { message: t.to_string(), after: None }),
        }
    }

    /// Waits until `GET <url>/models` answers 200 (a restarted server is up), for at most
    /// `limit`.
    pub fn wait_until_up(&self, limit: Duration) -> Result<(), LoopError> {
        let started = std::time::Instant::now();
        let agent = ureq::AgentBuilder::new().timeout(self.timeout.min(Duration::from_secs(10))).build();
        loop {
            let mut req = agent.get(&format!("{}/models", self.url));
            if let Some(key) = &self.api_key {
                req = req.set("Authorization", &format!("Bearer {key}"));
            }
            let last = match req.call() {
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            };
            if started.elapsed() > limit {
                return Err(LoopError::Remote {
                    url: format!("{}/models", self.url),
                    message: format!("the server did not answer within {:.0} s: {last}", limit.as_secs_f64()),
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// The answers an interrupted stage kept; a torn or unreadable line is skipped.
fn read_partial(path: &Path) -> Vec<RemoteAnswer> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn remote_error(url: &str, prompt: usize, message: impl std::fmt::Display) -> LoopError {
    LoopError::Remote { url: format!("{url}/completions"), message: format!("prompt {prompt}: {message}") }
}

/// The start of a body, for messages.
fn snippet(text: &str) -> String {
    let t: String = text.chars().take(200).collect();
    if t.len() < text.len() {
        format!("{t}...")
    } else {
        t
    }
}
