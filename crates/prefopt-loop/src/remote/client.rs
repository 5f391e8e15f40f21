//! One OpenAI-compatible server's HTTP client: JSON POSTs with the retry rules every
//! caller shares (the sampler, the LLM judge), and the wait for a restarted server.
//!
//! - 429 and 5xx answers, timeouts and refused connections are retried, up to `retries`
//!   times per request, after `backoff_s * 2^attempt` seconds (at most 30), or after the
//!   `Retry-After` seconds of a 429 when it gives them;
//! - any other status stops at once;
//! - every error names the URL, the request (`prompt 3`) and the status or the transport error.

use std::time::{Duration, Instant};

/// A server's base URL (ending in `/v1`) and how hard to try.
#[derive(Clone, Debug)]
pub struct ApiClient {
    /// Base URL ending in `/v1`, no trailing slash.
    pub url: String,
    /// The bearer token, read from the environment variable a config names (never the config).
    pub api_key: Option<String>,
    /// Longest wait for one answer.
    pub timeout: Duration,
    pub retries: usize,
    pub backoff_s: f64,
}

/// Why a request failed: the endpoint's URL and what went wrong there.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{url}: {message}")]
pub struct RemoteError {
    pub url: String,
    pub message: String,
    /// The HTTP status of an answer that was refused for good (a 4xx), if that was the failure.
    pub status: Option<u16>,
}

/// Why one attempt failed: worth another try (after how long, if the server said), or not.
enum Failure {
    Retry { message: String, after: Option<f64> },
    Fatal { status: Option<u16>, message: String },
}

/// Checks a base URL: `http://` or `https://` (TLS by rustls with Mozilla's root
/// certificates, bundled: no system store needed). The error says what is expected.
pub fn check_base_url(url: &str) -> Result<(), String> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err(format!(
            "`{url}` is not an http:// or https:// URL; give the server's base URL ending in /v1, e.g. \
             http://localhost:8000/v1"
        ))
    }
}

/// The API key in the environment variable `var` names (a config never holds the key itself);
/// `None` without a variable.
pub fn api_key_from_env(var: Option<&str>) -> Result<Option<String>, String> {
    let Some(var) = var else { return Ok(None) };
    std::env::var(var).map(Some).map_err(|_| format!("environment variable `{var}` is not set"))
}

/// The longest wait between two attempts, in seconds.
const MAX_WAIT_S: f64 = 30.0;

impl ApiClient {
    /// A connection pool for one stage: its workers share kept-alive connections.
    pub fn agent(&self) -> ureq::Agent {
        ureq::AgentBuilder::new().timeout(self.timeout).build()
    }

    /// The error of request `what` (e.g. `prompt 3`) at `<url>/<path>`.
    pub fn error(&self, path: &str, what: &str, message: impl std::fmt::Display) -> RemoteError {
        RemoteError { url: format!("{}/{path}", self.url), message: format!("{what}: {message}"), status: None }
    }

    /// POSTs `body` to `<url>/<path>` and returns the answer's body, retrying transient
    /// failures (module doc); `what` names the request in errors.
    pub fn post_json(
        &self,
        agent: &ureq::Agent,
        path: &str,
        body: &serde_json::Value,
        what: &str,
    ) -> Result<String, RemoteError> {
        let mut attempt = 0;
        loop {
            match self.post_once(agent, path, body) {
                Ok(text) => return Ok(text),
                Err(Failure::Fatal { status, message }) => {
                    return Err(RemoteError { status, ..self.error(path, what, message) })
                }
                Err(Failure::Retry { message, after }) => {
                    if attempt >= self.retries {
                        let message = format!("{message} (gave up after {} attempts)", attempt + 1);
                        return Err(self.error(path, what, message));
                    }
                    let wait = after.unwrap_or(self.backoff_s * 2f64.powi(attempt as i32)).min(MAX_WAIT_S);
                    std::thread::sleep(Duration::from_secs_f64(wait));
                    attempt += 1;
                }
            }
        }
    }

    fn post_once(&self, agent: &ureq::Agent, path: &str, body: &serde_json::Value) -> Result<String, Failure> {
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
                    Err(Failure::Fatal { status: Some(code), message })
                }
            }
            Err(ureq::Error::Transport(t)) => Err(Failure::Retry { message: describe_transport(&t), after: None }),
        }
    }

    /// Waits until `GET <url>/models` answers 200 (a restarted server is up), for at most
    /// `limit`.
    pub fn wait_until_up(&self, limit: Duration) -> Result<(), RemoteError> {
        let started = Instant::now();
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
                return Err(RemoteError {
                    url: format!("{}/models", self.url),
                    message: format!("the server did not answer within {:.0} s: {last}", limit.as_secs_f64()),
                    status: None,
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// A transport error without the URL, which ureq's own message repeats (ours names it once).
fn describe_transport(t: &ureq::Transport) -> String {
    let mut out = t.kind().to_string();
    for part in
        [t.message().map(str::to_string), std::error::Error::source(t).map(|s| s.to_string())].into_iter().flatten()
    {
        out.push_str(": ");
        out.push_str(&part);
    }
    out
}

/// The start of a body, for messages.
pub fn snippet(text: &str) -> String {
    let t: String = text.chars().take(200).collect();
    if t.len() < text.len() {
        format!("{t}...")
    } else {
        t
    }
}
