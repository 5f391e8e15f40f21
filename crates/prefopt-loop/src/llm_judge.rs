//! `llm:<base url>`: a chat model behind an OpenAI-compatible server as a pairwise judge.
//!
//! The judge compares two completions of a prompt at a time: the template (a documented
//! default, or a file) gets the prompt and both completions, goes to
//! `POST <url>/chat/completions` as one user message (temperature 0, a fixed seed), and the
//! reply must be a verdict. With `judge_endpoint = "completions"` the filled template is sent
//! as a raw prompt to `POST <url>/completions` instead (a template with its own chat markup,
//! or one that ends where the verdict goes, e.g. `The better response is Response`), and the
//! completion's text is the reply.
//!
//! - **Strict parser**: after trimming whitespace and one trailing `.`, the reply is `A`,
//!   `B` or `tie` (any case). Anything else is a failure: counted, reported in the
//!   iteration's record, never read as a tie. A stage whose failures exceed
//!   `judge_max_failure_rate` of its requests stops with the first unparsed replies.
//! - **Both orders**: every comparison is asked twice, each completion once in the first
//!   place, which cancels a judge's position bias.
//! - **Ranking of the K samples** (prefopt's rule, not a paper's): all K(K-1)/2 pairs, both
//!   orders, K(K-1) requests per prompt; each verdict gives the winner 1 point, a tie 1/2
//!   each, the loser 0; a sample's score is its mean over the verdicts that parsed (its win
//!   rate against the prompt's other samples), 1/2 if none did. The loop pairs the best
//!   against the worst by these scores, as with any judge.
//! - **Evaluation**: a pairwise judge has no score for one completion; held-out evaluation
//!   compares the model's sample with the base model's, both orders ([`PairwiseJudge`]).
//!
//! Requests run `judge_concurrency` at a time, with the sampler's retry rules
//! ([`crate::remote::client`]); the replies go to a journal as they arrive, keyed by the
//! exact request, so a stage interrupted midway asks only for what was not answered.

use std::path::{Path, PathBuf};
use std::time::Duration;

use prefopt_data::Text;
use serde::{Deserialize, Serialize};

use crate::judge::{Judge, JudgeCall, JudgeError, Judgement, PromptItem};
use crate::remote::{run_journaled, ApiClient};

/// The default pairwise template; `{prompt}`, `{response_a}` and `{response_b}` are replaced
/// verbatim (other braces are left as they are).
pub const DEFAULT_TEMPLATE: &str = "\
You are comparing two responses to the same prompt. Decide which response answers the prompt \
better: more helpful, more correct, clearer.

[Prompt]
{prompt}

[Response A]
{response_a}

[Response B]
{response_b}

Reply with exactly one word: A if Response A is better, B if Response B is better, or tie if \
they are equally good. Do not explain.";

/// The placeholders a template must contain.
const PLACEHOLDERS: [&str; 3] = ["{prompt}", "{response_a}", "{response_b}"];

/// Which endpoint the judge asks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JudgeEndpoint {
    /// `/chat/completions`, the template as one user message (the default).
    #[default]
    Chat,
    /// `/completions`, the template as a raw prompt.
    Completions,
}

/// How to reach the judge's server and what to ask it.
#[derive(Clone, Debug)]
pub struct LlmJudgeSettings {
    /// `judge_model`: the model name the server serves (or a folder, for `transformers serve`).
    pub model: String,
    pub endpoint: JudgeEndpoint,
    /// The template text (the default, or a file's content).
    pub template: String,
    pub concurrency: usize,
    /// The longest reply, in tokens (`judge_max_tokens`).
    pub max_tokens: usize,
    /// A stage stops when more than this share of its verdicts do not parse.
    pub max_failure_rate: f64,
}

/// The `judge_*` keys of an `llm:` judge.
#[derive(Clone, Debug)]
pub struct LlmOptions {
    /// `judge_model` (required).
    pub model: Option<String>,
    /// `judge_endpoint`.
    pub endpoint: JudgeEndpoint,
    /// `judge_template`: a file with the template (default [`DEFAULT_TEMPLATE`]).
    pub template: Option<PathBuf>,
    /// The key, read from the variable `judge_api_key_env` names.
    pub api_key: Option<String>,
    /// Longest wait for one reply (`judge_timeout_s`).
    pub timeout: Duration,
    pub retries: usize,
    pub backoff_s: f64,
    pub concurrency: usize,
    pub max_tokens: usize,
    pub max_failure_rate: f64,
}

impl Default for LlmOptions {
    fn default() -> Self {
        Self {
            model: None,
            endpoint: JudgeEndpoint::Chat,
            template: None,
            api_key: None,
            timeout: Duration::from_secs(300),
            retries: 5,
            backoff_s: 1.0,
            concurrency: 4,
            max_tokens: 8,
            max_failure_rate: 0.1,
        }
    }
}

/// What a stage's verdicts were: how many requests, which place won, how many failed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VerdictStats {
    pub requests: usize,
    /// Verdicts for the completion shown first (`A`), second (`B`), and ties; with both
    /// orders asked, `first - second` shows the judge's position bias.
    pub first: usize,
    pub second: usize,
    pub ties: usize,
    /// Replies that are not a verdict (left out of the scores).
    pub failures: usize,
}

impl VerdictStats {
    fn add(&mut self, other: &VerdictStats) {
        self.requests += other.requests;
        self.first += other.first;
        self.second += other.second;
        self.ties += other.ties;
        self.failures += other.failures;
    }
}

/// One parsed reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    First,
    Second,
    Tie,
}

impl Verdict {
    /// Points of the completion shown first (1 win, 1/2 tie, 0 loss).
    fn first_points(self) -> f64 {
        match self {
            Verdict::First => 1.0,
            Verdict::Second => 0.0,
            Verdict::Tie => 0.5,
        }
    }
}

/// The strict parser: `A`, `B` or `tie` (any case), after trimming whitespace and one
/// trailing `.`; anything else is `None`.
pub fn parse_verdict(reply: &str) -> Option<Verdict> {
    let r = reply.trim();
    let r = r.strip_suffix('.').unwrap_or(r).trim_end();
    match r.to_ascii_lowercase().as_str() {
        "a" => Some(Verdict::First),
        "b" => Some(Verdict::Second),
        "tie" => Some(Verdict::Tie),
        _ => None,
    }
}

/// A judge that compares two completions instead of scoring one.
pub trait PairwiseJudge {
    /// For each `(prompt, a, b)`: `a`'s points against `b`, the mean over both presentation
    /// orders of the verdicts that parsed (1/2 if neither did).
    fn compare(&mut self, items: &[(&PromptItem, &str, &str)], call: &mut JudgeCall) -> Result<Vec<f64>, JudgeError>;
}

/// One journalled reply: the request's index in its stage and a hash of the request.
#[derive(Serialize, Deserialize)]
struct Reply {
    index: usize,
    key: String,
    reply: String,
}

#[derive(Deserialize)]
struct ChatCompletion {
    choices: Vec<ChatChoice>,
}

/// A choice of either endpoint: a chat `message`, or a completion's `text`.
#[derive(Deserialize)]
struct ChatChoice {
    #[serde(default)]
    message: Option<ChatMessage>,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessage {
    #[serde(default)]
    content: Option<String>,
}

/// The `llm:` judge (module doc).
pub struct LlmJudge {
    client: ApiClient,
    settings: LlmJudgeSettings,
    /// Verdicts since the last [`Judge::take_verdict_stats`].
    stats: VerdictStats,
}

impl LlmJudge {
    /// A judge asking `client`'s server; the template must hold the three placeholders.
    pub fn new(client: ApiClient, settings: LlmJudgeSettings) -> Result<Self, JudgeError> {
        let missing: Vec<&str> = PLACEHOLDERS.iter().copied().filter(|p| !settings.template.contains(p)).collect();
        if !missing.is_empty() {
            return Err(JudgeError::Spec {
                spec: format!("llm:{}", client.url),
                message: format!("the judge template lacks {}", missing.join(", ")),
            });
        }
        Ok(Self { client, settings, stats: VerdictStats::default() })
    }

    /// The judge `llm:<url>` with the `judge_*` keys.
    pub fn from_options(url: &str, o: &LlmOptions) -> Result<Self, JudgeError> {
        let spec = |message: String| JudgeError::Spec { spec: format!("llm:{url}"), message };
        crate::remote::check_base_url(url).map_err(|e| spec(format!("`llm:` needs the server's base URL: {e}")))?;
        let model = o.model.clone().ok_or_else(|| {
            spec(
                "an `llm:` judge needs `judge_model`, the model name the server serves (or a folder, for \
                  `transformers serve`)"
                    .into(),
            )
        })?;
        let client = ApiClient {
            url: url.trim_end_matches('/').to_string(),
            api_key: o.api_key.clone(),
            timeout: o.timeout,
            retries: o.retries,
            backoff_s: o.backoff_s,
        };
        let settings = LlmJudgeSettings {
            model,
            endpoint: o.endpoint,
            template: load_template(o.template.as_deref())?,
            concurrency: o.concurrency.max(1),
            max_tokens: o.max_tokens,
            max_failure_rate: o.max_failure_rate,
        };
        Self::new(client, settings)
    }

    /// The template filled with a prompt and two completions (first shown as A).
    pub fn render(&self, prompt: &PromptItem, first: &str, second: &str) -> String {
        let prompt = match &prompt.text {
            Text::Plain(s) => s.clone(),
            // A conversation as `role: content` lines (a lone user message as its content).
            Text::Conversation(m) if m.len() == 1 && m[0].role == "user" => m[0].content.clone(),
            Text::Conversation(m) => {
                m.iter().map(|m| format!("{}: {}", m.role, m.content)).collect::<Vec<_>>().join("\n")
            }
        };
        // One pass, so a completion that contains a placeholder is not filled in turn.
        let mut out = String::with_capacity(self.settings.template.len() + prompt.len() + first.len() + second.len());
        let mut rest = self.settings.template.as_str();
        while let Some(start) = rest.find('{') {
            out.push_str(&rest[..start]);
            let tail = &rest[start..];
            let hit = [("{prompt}", prompt.as_str()), ("{response_a}", first), ("{response_b}", second)]
                .into_iter()
                .find(|(p, _)| tail.starts_with(p));
            match hit {
                Some((p, value)) => {
                    out.push_str(value);
                    rest = &tail[p.len()..];
                }
                None => {
                    out.push('{');
                    rest = &tail[1..];
                }
            }
        }
        out.push_str(rest);
        out
    }

    /// The server's replies to `messages` (rendered templates), asked concurrently and kept in
    /// `call.journal` as they arrive; `labels` name each request in errors.
    fn ask_all(&self, messages: &[String], labels: &[String], call: &mut JudgeCall) -> Result<Vec<String>, JudgeError> {
        let endpoint = format!("{}:{:?}", self.settings.model, self.settings.endpoint);
        let keys: Vec<String> = messages.iter().map(|m| request_key(&endpoint, m)).collect();
        let agent = self.client.agent();
        let (path, shape) = match self.settings.endpoint {
            JudgeEndpoint::Chat => ("chat/completions", "chat completion"),
            JudgeEndpoint::Completions => ("completions", "completions"),
        };
        let ask = |i: usize| -> Result<Reply, JudgeError> {
            let what = format!("comparison {i} ({})", labels[i]);
            let mut body = serde_json::json!({
                "model": self.settings.model,
                "temperature": 0.0,
                "max_tokens": self.settings.max_tokens,
                "seed": 0,
            });
            match self.settings.endpoint {
                JudgeEndpoint::Chat => {
                    body["messages"] = serde_json::json!([{"role": "user", "content": messages[i]}]);
                    body["stream"] = false.into();
                }
                JudgeEndpoint::Completions => body["prompt"] = messages[i].clone().into(),
            }
            let text = self.client.post_json(&agent, path, &body, &what)?;
            let bad = |why: String| self.client.error(path, &what, why);
            let parsed: ChatCompletion = serde_json::from_str(&text).map_err(|e| {
                bad(format!("the answer is not {shape} JSON ({e}): {}", crate::remote::client::snippet(&text)))
            })?;
            let choice = parsed.choices.into_iter().next().ok_or_else(|| bad("the answer has no choices".into()))?;
            let reply = choice.message.and_then(|m| m.content).or(choice.text).unwrap_or_default();
            Ok(Reply { index: i, key: keys[i].clone(), reply })
        };
        let keep = |r: &Reply| keys.get(r.index).is_some_and(|k| *k == r.key).then_some(r.index);
        let replies = run_journaled(call.journal, messages.len(), self.settings.concurrency, keep, ask, call.progress)?;
        Ok(replies.into_iter().map(|r| r.reply).collect())
    }

    fn spec_error(&self, message: String) -> JudgeError {
        JudgeError::Replies { judge: self.name(), message }
    }

    /// Parses `replies`, adds them to the stats, and stops the stage when too many fail.
    fn verdicts(&mut self, replies: &[String]) -> Result<Vec<Option<Verdict>>, JudgeError> {
        let verdicts: Vec<Option<Verdict>> = replies.iter().map(|r| parse_verdict(r)).collect();
        let mut stats = VerdictStats { requests: replies.len(), ..VerdictStats::default() };
        for v in &verdicts {
            match v {
                Some(Verdict::First) => stats.first += 1,
                Some(Verdict::Second) => stats.second += 1,
                Some(Verdict::Tie) => stats.ties += 1,
                None => stats.failures += 1,
            }
        }
        self.stats.add(&stats);
        if stats.failures as f64 > self.settings.max_failure_rate * stats.requests as f64 {
            let examples: Vec<String> = replies
                .iter()
                .zip(&verdicts)
                .filter(|(_, v)| v.is_none())
                .take(3)
                .map(|(r, _)| format!("{:?}", r.chars().take(80).collect::<String>()))
                .collect();
            return Err(self.spec_error(format!(
                "{} of {} replies are not a verdict (A, B or tie), more than judge_max_failure_rate = {}; the first: \
                 {} (a stronger judge model, a template that asks for one word, or a higher judge_max_tokens)",
                stats.failures,
                stats.requests,
                self.settings.max_failure_rate,
                examples.join(", ")
            )));
        }
        Ok(verdicts)
    }
}

impl Judge for LlmJudge {
    fn judge(&mut self, prompt: &PromptItem, completions: &[String]) -> Result<Vec<Judgement>, JudgeError> {
        Ok(self.judge_many(&[(prompt, completions)])?.remove(0))
    }

    fn judge_many(&mut self, batch: &[(&PromptItem, &[String])]) -> Result<Vec<Vec<Judgement>>, JudgeError> {
        self.judge_many_with(batch, &mut JudgeCall::quiet())
    }

    fn judge_many_with(
        &mut self,
        batch: &[(&PromptItem, &[String])],
        call: &mut JudgeCall,
    ) -> Result<Vec<Vec<Judgement>>, JudgeError> {
        // Every ordered pair (i, j), i != j, of every prompt: (prompt, first, second).
        let mut asks = Vec::new();
        let mut messages = Vec::new();
        let mut labels = Vec::new();
        for (p, (prompt, completions)) in batch.iter().enumerate() {
            for i in 0..completions.len() {
                for j in (0..completions.len()).filter(|&j| j != i) {
                    asks.push((p, i, j));
                    messages.push(self.render(prompt, &completions[i], &completions[j]));
                    labels.push(format!("prompt {p}, sample {i} as A, {j} as B"));
                }
            }
        }
        let replies = self.ask_all(&messages, &labels, call)?;
        let verdicts = self.verdicts(&replies)?;
        // (points, verdicts counted) per sample.
        let mut points: Vec<Vec<(f64, usize)>> = batch.iter().map(|(_, c)| vec![(0.0, 0); c.len()]).collect();
        for (&(p, i, j), v) in asks.iter().zip(&verdicts) {
            if let Some(v) = v {
                let first = v.first_points();
                points[p][i].0 += first;
                points[p][i].1 += 1;
                points[p][j].0 += 1.0 - first;
                points[p][j].1 += 1;
            }
        }
        Ok(points
            .into_iter()
            .map(|ps| ps.into_iter().map(|(s, n)| Judgement::score_only(mean_or_half(s, n))).collect())
            .collect())
    }

    fn as_pairwise(&mut self) -> Option<&mut dyn PairwiseJudge> {
        Some(self)
    }

    fn take_verdict_stats(&mut self) -> Option<VerdictStats> {
        Some(std::mem::take(&mut self.stats))
    }

    fn name(&self) -> String {
        format!("llm:{}", self.client.url)
    }
}

impl PairwiseJudge for LlmJudge {
    fn compare(&mut self, items: &[(&PromptItem, &str, &str)], call: &mut JudgeCall) -> Result<Vec<f64>, JudgeError> {
        let messages: Vec<String> =
            items.iter().flat_map(|(prompt, a, b)| [self.render(prompt, a, b), self.render(prompt, b, a)]).collect();
        let labels: Vec<String> = (0..items.len())
            .flat_map(|p| [format!("prompt {p}, first order"), format!("prompt {p}, second order")])
            .collect();
        let replies = self.ask_all(&messages, &labels, call)?;
        let verdicts = self.verdicts(&replies)?;
        Ok(verdicts
            .chunks(2)
            .map(|v| {
                // `a` first, then `a` second.
                let a = [v[0].map(Verdict::first_points), v[1].map(|x| 1.0 - x.first_points())];
                let counted: Vec<f64> = a.into_iter().flatten().collect();
                mean_or_half(counted.iter().sum(), counted.len())
            })
            .collect())
    }
}

fn mean_or_half(sum: f64, n: usize) -> f64 {
    if n == 0 {
        0.5
    } else {
        sum / n as f64
    }
}

/// A stable hash (FNV-1a, 64 bits) of the model and the message: a journalled reply is
/// reused only for the very same request.
fn request_key(model: &str, message: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in model.bytes().chain([0]).chain(message.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The template of `judge_template`: a file's text, or the default.
pub fn load_template(path: Option<&Path>) -> Result<String, JudgeError> {
    match path {
        None => Ok(DEFAULT_TEMPLATE.to_string()),
        Some(p) => std::fs::read_to_string(p).map_err(|e| JudgeError::Spec {
            spec: "judge_template".into(),
            message: format!("judge_template {}: {e}", p.display()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parser_is_strict() {
        for (reply, verdict) in [
            ("A", Some(Verdict::First)),
            (" b.\n", Some(Verdict::Second)),
            ("Tie", Some(Verdict::Tie)),
            ("TIE.", Some(Verdict::Tie)),
            ("A is better", None),
            ("**A**", None),
            ("A..", None),
            ("", None),
            ("C", None),
            ("A or B", None),
        ] {
            assert_eq!(parse_verdict(reply), verdict, "{reply:?}");
        }
    }

    fn judge(template: &str) -> Result<LlmJudge, JudgeError> {
        let client = ApiClient {
            url: "http://127.0.0.1:9/v1".into(),
            api_key: None,
            timeout: std::time::Duration::from_secs(1),
            retries: 0,
            backoff_s: 0.0,
        };
        let settings = LlmJudgeSettings {
            model: "m".into(),
            endpoint: JudgeEndpoint::Chat,
            template: template.into(),
            concurrency: 1,
            max_tokens: 4,
            max_failure_rate: 0.0,
        };
        LlmJudge::new(client, settings)
    }

    #[test]
    fn the_template_is_filled_once_and_must_hold_every_placeholder() {
        let j = judge("P={prompt} A={response_a} B={response_b} {other}").unwrap();
        let prompt = PromptItem::plain("q");
        assert_eq!(j.render(&prompt, "{response_b}", "y"), "P=q A={response_b} B=y {other}");
        let e = judge("only {prompt}").err().unwrap().to_string();
        assert!(e.contains("lacks {response_a}, {response_b}"), "{e}");
        assert!(judge(DEFAULT_TEMPLATE).is_ok());
    }

    #[test]
    fn request_keys_tell_requests_apart() {
        assert_eq!(request_key("m", "x"), request_key("m", "x"));
        assert_ne!(request_key("m", "x"), request_key("m", "y"));
        assert_ne!(request_key("mx", ""), request_key("m", "x"));
    }
}
