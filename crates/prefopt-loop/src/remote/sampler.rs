//! Sampling from an OpenAI-compatible completion server (vLLM, SGLang, `transformers serve`)
//! instead of in-process: `sampler = "openai"` in `prefopt apo`, `--sampler-url` in
//! `prefopt generate`.
//!
//! Each prompt, rendered by prefopt's own chat template (so the sampled and the trained tokens
//! agree), is one `POST <sampler_url>/completions` with `n = K`, the temperature, top_p and
//! max_tokens, and a seed of its own. Transient failures are retried as [`ApiClient`] says;
//! a body that is not the completions JSON stops the stage at once. Fewer choices than asked
//! (`transformers serve` ignores `n`): the missing ones are asked for again, with the next
//! seeds, until K are there (an answer without any choice counts as a failed attempt).
//!
//! Answers go to a journal as they arrive ([`run_journaled`]); a rerun of an interrupted
//! stage asks only for the prompts not in it. Token ids come from the server when it returns
//! them (vLLM's `return_token_ids`); otherwise the caller tokenizes the text. A server that
//! refuses the `return_token_ids` field (`transformers serve` answers 422 to unknown fields)
//! is asked again without it, and so is every later request of the stage.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use super::client::{snippet, ApiClient, RemoteError};
use super::journal::run_journaled;
use crate::LoopError;

/// The server and how many requests it gets at once.
#[derive(Clone, Debug)]
pub struct RemoteSampler {
    pub client: ApiClient,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Fields added to every request (`sampler_extra_body`), for what a server takes beyond
    /// OpenAI's API: vLLM's `top_k` or `min_p`, `transformers serve`'s `generation_config`.
    pub extra_body: serde_json::Map<String, serde_json::Value>,
}

/// The request fields the sampler sets itself (`sampler_extra_body` may not).
pub const REQUEST_FIELDS: [&str; 8] =
    ["model", "prompt", "n", "temperature", "top_p", "max_tokens", "seed", "return_token_ids"];

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
    /// Each completion's `finish_reason` (`"stop"`, `"length"`), where the server gave one.
    #[serde(default)]
    pub finish_reasons: Vec<Option<String>>,
}

#[derive(Deserialize)]
struct Choice {
    text: String,
    #[serde(default)]
    token_ids: Option<Vec<u32>>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Completions {
    choices: Vec<Choice>,
}

/// A 400 or 422 that names the `return_token_ids` field: the server does not know it.
fn refuses_token_ids(e: &RemoteError) -> bool {
    matches!(e.status, Some(400 | 422)) && e.message.contains("return_token_ids")
}

impl RemoteSampler {
    /// The K completions of every prompt of `prompts` (rendered text), prompt i asking with
    /// seeds `seed_of(i) + j`. Answers in the journal `partial` (from an interrupted run) are
    /// kept and not asked again; new ones are appended as they arrive. `progress` hears
    /// (prompts done, prompts).
    pub fn sample(
        &self,
        request: &CompletionRequest,
        prompts: &[String],
        seed_of: impl Fn(usize) -> u64 + Sync,
        partial: &Path,
        progress: &mut (dyn FnMut(usize, usize) + Send),
    ) -> Result<Vec<RemoteAnswer>, LoopError> {
        let agent = self.client.agent();
        let ask_ids = AtomicBool::new(true);
        run_journaled(
            Some(partial),
            prompts.len(),
            self.concurrency,
            |a: &RemoteAnswer| (a.texts.len() == request.n).then_some(a.prompt_index),
            |i| Ok(self.complete(&agent, request, i, &prompts[i], seed_of(i), &ask_ids)?),
            progress,
        )
    }

    /// Loads the PEFT adapter folder `dir` into the server as `name` (vLLM's
    /// `POST /v1/load_lora_adapter`, which needs `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` and
    /// `--enable-lora`); an adapter already loaded under that name (a resumed run) is fine.
    pub fn load_lora_adapter(&self, name: &str, dir: &Path) -> Result<(), RemoteError> {
        let path = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let body = serde_json::json!({"lora_name": name, "lora_path": path.display().to_string()});
        match self.client.post_json(&self.client.agent(), "load_lora_adapter", &body, &format!("adapter {name}")) {
            Err(e) if e.status == Some(400) && e.message.contains("already been loaded") => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// All `request.n` completions of prompt `i`: asks again for what a short answer lacks.
    fn complete(
        &self,
        agent: &ureq::Agent,
        request: &CompletionRequest,
        i: usize,
        prompt: &str,
        seed: u64,
        ask_ids: &AtomicBool,
    ) -> Result<RemoteAnswer, RemoteError> {
        let what = format!("prompt {i}");
        let mut answer = RemoteAnswer {
            prompt_index: i,
            texts: Vec::new(),
            token_ids: Some(Vec::new()),
            finish_reasons: Vec::new(),
        };
        let mut empty = 0;
        while answer.texts.len() < request.n {
            let missing = request.n - answer.texts.len();
            let mut body = serde_json::json!({
                "model": request.model,
                "prompt": prompt,
                "n": missing,
                "temperature": request.temperature,
                "top_p": request.top_p,
                "max_tokens": request.max_tokens,
                "seed": seed + answer.texts.len() as u64,
            });
            if ask_ids.load(Ordering::SeqCst) {
                body["return_token_ids"] = true.into();
            }
            for (key, value) in &self.extra_body {
                body[key] = value.clone();
            }
            let text = match self.client.post_json(agent, "completions", &body, &what) {
                Err(e) if refuses_token_ids(&e) && body.get("return_token_ids").is_some() => {
                    ask_ids.store(false, Ordering::SeqCst);
                    continue;
                }
                other => other?,
            };
            let parsed: Completions = serde_json::from_str(&text).map_err(|e| {
                self.client.error(
                    "completions",
                    &what,
                    format!("the answer is not completions JSON ({e}): {}", snippet(&text)),
                )
            })?;
            if parsed.choices.is_empty() {
                empty += 1;
                if empty > self.client.retries {
                    return Err(self.client.error("completions", &what, format!("no choices after {empty} requests")));
                }
            }
            for c in parsed.choices.into_iter().take(missing) {
                match (&mut answer.token_ids, c.token_ids) {
                    (Some(all), Some(ids)) => all.push(ids),
                    (ids, _) => *ids = None,
                }
                answer.texts.push(c.text);
                answer.finish_reasons.push(c.finish_reason);
            }
        }
        Ok(answer)
    }
}
