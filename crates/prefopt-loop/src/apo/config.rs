//! `prefopt apo`'s configuration: every key with its default, TOML with `--set` overrides,
//! validated before anything runs.

use std::path::{Path, PathBuf};

use prefopt_data::HfTokenizer;
use prefopt_model::SamplingParams;
pub use prefopt_sim::AlphaSchedule;
use prefopt_train::config::apply_overrides;
use prefopt_train::TrainConfig;
use serde::{Deserialize, Serialize};

use crate::sampling::sampling_params;
use crate::LoopError;

/// `beta`: one value for every iteration, or one per iteration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BetaSchedule {
    One(f64),
    PerIteration(Vec<f64>),
}

/// How the extrapolated policy `pi_t ∝ pi_hat_t (pi_hat_t / pi_hat_{t-1})^alpha` enters the
/// next iteration. Both modes write the parameter-extrapolated weights to
/// `iter-<t>/extrapolated/` and sample from them; they differ in the reference of the loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Extrapolation {
    /// Weights `theta_t = theta_hat_t + alpha (theta_hat_t - theta_hat_{t-1})`: the sampler,
    /// the training start and the reference of the next iteration (the paper's experiments).
    /// Exact only for log-linear policies.
    Parameter,
    /// The sampler and training start as with `parameter`, but the reference is the
    /// policy-space step: `lp_ref(y) = (1+alpha) lp_{pi_hat_t}(y) - alpha lp_{pi_hat_{t-1}}(y)`,
    /// computed from the two last trained models and written into `iter-<t+1>/pairs-ref.jsonl`
    /// as TRL's `ref_chosen_logps`/`ref_rejected_logps` columns. It drops the prompt-only
    /// normalizer `log Z'(x)`, which cancels only in losses that see the reference through
    /// `rho_w - rho_l` with equal weights (`sigmoid`, cDPO, `robust`, `hinge`; methods.md
    /// section 3); with alpha > 0 other losses are refused. Iteration 1's reference is the
    /// base, as in both modes.
    Logprob,
}

/// Where the loop's training samples come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    /// In-process, with prefopt's own generation (the default).
    #[default]
    Local,
    /// An OpenAI-compatible completion server at `sampler_url` (vLLM, SGLang,
    /// `transformers serve`; docs/apo.md).
    Openai,
}

/// How the server comes to serve the current policy before each sampling round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerSync {
    /// The policy's folder is the request's `model` (`transformers serve` loads a folder on
    /// demand).
    #[default]
    Path,
    /// `sampler_sync_command` runs with `{model_dir}` replaced by the folder (a restart of
    /// `vllm serve`, SGLang's `/update_weights_from_disk`); then the loop waits until
    /// `<sampler_url>/models` answers, and sends `sampler_model` as the model.
    Command,
    /// LoRA runs (`train.use_peft`): the policy's adapter stack is written as one PEFT adapter
    /// (`<folder>-lora/`, the adapters concatenated, rank = their ranks summed) and loaded with
    /// `POST <sampler_url>/load_lora_adapter` (vLLM's runtime LoRA updating); requests name
    /// it. The base itself (iteration 1) is `sampler_model`, the name the server serves it by.
    Lora,
}

/// Every key of an APO run.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApoConfig {
    /// Base model folder (pi_0). Required.
    pub model: PathBuf,
    /// Training prompts: a JSONL/Parquet file (`prompt` or `messages`) or `task:<name>`.
    pub prompts: String,
    /// Prompts generated for `task:<name>` (default 256).
    pub num_prompts: usize,
    /// Oracle: a built-in task name, `rm:<folder>`, `cmd:<shell command>` or
    /// `llm:<base url>` (a chat model on an OpenAI-compatible server, comparing two samples at
    /// a time; docs/apo.md). Required.
    pub judge: String,
    /// Longest one call of a `cmd:` judge may run (all prompts of a stage), in seconds;
    /// then its whole process group is killed and the run stops. For an `llm:` judge, the
    /// longest wait for one reply (default 300).
    pub judge_timeout_s: f64,
    /// `llm:` judges: the model name the server serves (a folder for `transformers serve`).
    pub judge_model: Option<String>,
    /// `llm:` judges: `"chat"` (default; `/chat/completions`, the template as a user message)
    /// or `"completions"` (`/completions`, the template as a raw prompt).
    pub judge_endpoint: crate::judge::JudgeEndpoint,
    /// `llm:` judges: a file with the pairwise template (`{prompt}`, `{response_a}`,
    /// `{response_b}`); default: the built-in one (docs/apo.md).
    pub judge_template: Option<PathBuf>,
    /// `llm:` judges: name of the environment variable that holds the server's API key.
    pub judge_api_key_env: Option<String>,
    /// `llm:` judges: requests in flight, retries and first backoff as the sampler's
    /// (defaults 4, 5, 1.0), the longest reply in tokens (default 8), and the share of
    /// replies that may fail to parse before a stage stops (default 0.1).
    pub judge_concurrency: usize,
    pub judge_retries: usize,
    pub judge_backoff_s: f64,
    pub judge_max_tokens: usize,
    pub judge_max_failure_rate: f64,
    /// Iterations T (default 3, as the paper).
    pub iterations: usize,
    /// Prompts per iteration (default 64); iteration t takes the next fold of the shuffled
    /// prompts, wrapping around when they run out.
    pub prompts_per_iteration: usize,
    /// Completions sampled per prompt, K (default 5, as the paper).
    pub num_samples: usize,
    /// Nesterov momentum alpha (default 0.3, the paper's); 0 is iterative DPO.
    pub alpha: f64,
    /// `"constant"` (default, the paper's), or one of prefopt's own adaptive rules (not the
    /// paper's; docs/apo.md, "Adaptive momentum"): `"restart"`, alpha is 0 for an iteration
    /// whose training step opposed the momentum, judged on that iteration's pairs;
    /// `"monotone"`, the extrapolated model is kept only if its samples on the next
    /// iteration's prompts are judged at least as good as the trained model's (one more
    /// sampling and judging round per iteration).
    pub alpha_schedule: AlphaSchedule,
    /// KL strength: a number or one per iteration (default 0.1).
    pub beta: BetaSchedule,
    /// `"parameter"` (default, the paper's) or `"logprob"` (exact reference, same sampler);
    /// see [`Extrapolation`].
    pub extrapolation: Extrapolation,
    /// Held-out prompts: a file or `task:<name>` (default: the training task, other seed).
    pub eval_prompts: Option<String>,
    /// Held-out prompts generated for a task (default 64).
    pub num_eval_prompts: usize,
    /// Seeds prompt order, sampling and evaluation (default 0).
    pub seed: u64,
    /// Sampling (defaults 0.7 / 0.9, the paper's; top_k 0 = off; 64 new tokens).
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub max_new_tokens: usize,
    /// `"local"` (default) or `"openai"`: the training samples (and the `monotone` rule's)
    /// from an OpenAI-compatible server; held-out evaluation samples stay local.
    pub sampler: Sampler,
    /// The server's base URL, ending in `/v1` (`http://` or `https://`).
    pub sampler_url: Option<String>,
    /// Name of the environment variable that holds the server's API key (never the key).
    pub sampler_api_key_env: Option<String>,
    /// Requests in flight at once (default 4).
    pub sampler_concurrency: usize,
    /// Longest wait for one answer, in seconds (default 300).
    pub sampler_timeout_s: f64,
    /// Retries of a request after a 429, a 5xx, a timeout or a refused connection (default 5).
    pub sampler_retries: usize,
    /// First retry's wait in seconds, doubled each time, at most 30 (default 1.0); a 429's
    /// `Retry-After` wins.
    pub sampler_backoff_s: f64,
    /// Fields added to every completion request, for what a server takes beyond OpenAI's
    /// API (vLLM's `top_k`, `transformers serve`'s `generation_config`); not the fields the
    /// sampler sets (`model`, `prompt`, `n`, `temperature`, `top_p`, `max_tokens`, `seed`).
    pub sampler_extra_body: toml::Table,
    /// `"path"` (default), `"command"` or `"lora"`; see [`SamplerSync`].
    pub sampler_sync: SamplerSync,
    /// With `sampler_sync = "command"`: the shell command, `{model_dir}` replaced.
    pub sampler_sync_command: Option<String>,
    /// With `sampler_sync = "command"`: the model name the server serves (default: the
    /// folder); with `"lora"`: the base model's name on the server (required).
    pub sampler_model: Option<String>,
    /// Where iterations go. Required.
    pub output_dir: PathBuf,
    /// Where the tensors live: "cpu", "cuda" or "cuda:N" (default "cpu"); the inner training
    /// runs on it too.
    pub device: String,
    /// Training keys of `prefopt train` for the inner step (not `model`, `ref_model`,
    /// `train_data`, `output_dir`, `beta`: the loop sets those).
    pub train: toml::Table,
}

impl Default for ApoConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            prompts: String::new(),
            num_prompts: 256,
            judge: String::new(),
            judge_timeout_s: 300.0,
            judge_model: None,
            judge_endpoint: crate::judge::JudgeEndpoint::Chat,
            judge_template: None,
            judge_api_key_env: None,
            judge_concurrency: 4,
            judge_retries: 5,
            judge_backoff_s: 1.0,
            judge_max_tokens: 8,
            judge_max_failure_rate: 0.1,
            iterations: 3,
            prompts_per_iteration: 64,
            num_samples: 5,
            alpha: 0.3,
            alpha_schedule: AlphaSchedule::Constant,
            beta: BetaSchedule::One(0.1),
            extrapolation: Extrapolation::Parameter,
            eval_prompts: None,
            num_eval_prompts: 64,
            seed: 0,
            temperature: 0.7,
            top_p: 0.9,
            top_k: 0,
            max_new_tokens: 64,
            sampler: Sampler::Local,
            sampler_url: None,
            sampler_api_key_env: None,
            sampler_concurrency: 4,
            sampler_timeout_s: 300.0,
            sampler_retries: 5,
            sampler_backoff_s: 1.0,
            sampler_extra_body: toml::Table::new(),
            sampler_sync: SamplerSync::Path,
            sampler_sync_command: None,
            sampler_model: None,
            output_dir: PathBuf::new(),
            device: "cpu".into(),
            train: toml::Table::new(),
        }
    }
}

/// The API key in the environment variable `var` names (`key` is the config key naming it).
fn read_key(key: &str, var: Option<&str>) -> Result<Option<String>, LoopError> {
    crate::remote::api_key_from_env(var).map_err(|message| LoopError::Config { source_name: key.into(), message })
}

/// `[train]` keys the loop sets itself.
/// (`adapter` too: every iteration trains a fresh adapter over pi_{t-1}, whose reference is
/// pi_{t-1} itself; continuing one adapter would put it into the reference as well.)
const LOOP_SET_KEYS: [&str; 8] =
    ["model", "ref_model", "train_data", "output_dir", "beta", "resume_from_checkpoint", "device", "adapter"];

impl ApoConfig {
    /// Reads a TOML file with `key=value` overrides (`train.learning_rate=1e-6` reaches the
    /// `[train]` table) and validates it; errors name the file and key.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self, LoopError> {
        let name = path.map_or("--set".to_string(), |p| p.display().to_string());
        let err = |message: String| LoopError::Config { source_name: name.clone(), message };
        let mut text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|e| err(e.to_string()))?,
            None => String::new(),
        };
        if !overrides.is_empty() {
            let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| err(e.to_string()))?;
            apply_overrides(&mut table, overrides).map_err(&err)?;
            text = toml::to_string(&table).map_err(|e| err(e.to_string()))?;
        }
        let mut cfg: ApoConfig = toml::from_str(&text).map_err(|e: toml::de::Error| err(e.to_string()))?;
        cfg.validate().map_err(&err)?;
        // `org/name` in the local Hugging Face cache.
        cfg.model = prefopt_model::hub::resolve_model(&cfg.model).map_err(|e| err(format!("`model`: {e}")))?;
        Ok(cfg)
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        for (key, empty) in [
            ("model", self.model.as_os_str().is_empty()),
            ("prompts", self.prompts.is_empty()),
            ("judge", self.judge.is_empty()),
            ("output_dir", self.output_dir.as_os_str().is_empty()),
        ] {
            if empty {
                return Err(format!("missing required key `{key}`"));
            }
        }
        if self.iterations == 0 || self.prompts_per_iteration == 0 || self.num_samples < 2 {
            return Err("`iterations` and `prompts_per_iteration` must be at least 1, `num_samples` at least 2".into());
        }
        if !(self.judge_timeout_s > 0.0 && self.judge_timeout_s.is_finite()) {
            return Err(format!(
                "`judge_timeout_s` must be a positive number of seconds, got {}",
                self.judge_timeout_s
            ));
        }
        if self.judge.starts_with("llm:") {
            self.check_llm_judge()?;
        }
        if !(0.0..1.0).contains(&self.alpha) {
            return Err(format!("`alpha` must be in [0, 1), got {}", self.alpha));
        }
        if let BetaSchedule::PerIteration(b) = &self.beta {
            if b.len() != self.iterations {
                return Err(format!("`beta` lists {} values for {} iterations", b.len(), self.iterations));
            }
        }
        if let Some(key) = self.train.keys().find(|k| LOOP_SET_KEYS.contains(&k.as_str())) {
            return Err(format!("`train.{key}` is set by the loop itself; remove it"));
        }
        let names_kto = |v: &toml::Value| {
            v.as_str() == Some("kto") || v.as_array().is_some_and(|a| a.iter().any(|x| x.as_str() == Some("kto")))
        };
        if self.train.get("loss_type").is_some_and(names_kto) {
            return Err("`train.loss_type` `kto`: the loop ranks samples into preference pairs, which KTO does not \
                        read (it trains on unpaired rows); use a pair loss"
                .into());
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) || self.temperature < 0.0 {
            return Err("`top_p` must be in (0, 1] and `temperature` >= 0".into());
        }
        if self.extrapolation == Extrapolation::Logprob && self.alpha > 0.0 {
            self.check_logprob_losses()?;
        }
        if self.sampler == Sampler::Openai {
            self.check_remote_sampler()?;
        }
        Ok(())
    }

    fn check_llm_judge(&self) -> Result<(), String> {
        if self.judge_model.is_none() {
            return Err("`judge = \"llm:...\"` needs `judge_model`, the model name the server serves".into());
        }
        if self.judge_concurrency == 0 || self.judge_max_tokens == 0 {
            return Err("`judge_concurrency` and `judge_max_tokens` must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.judge_max_failure_rate) {
            return Err(format!("`judge_max_failure_rate` must be in [0, 1], got {}", self.judge_max_failure_rate));
        }
        if !(self.judge_backoff_s >= 0.0 && self.judge_backoff_s.is_finite()) {
            return Err("`judge_backoff_s` must not be negative".into());
        }
        Ok(())
    }

    /// The judge's options, with the `llm:` judge's API key read from its variable.
    pub fn judge_options(&self) -> Result<crate::judge::JudgeOptions, LoopError> {
        let timeout = std::time::Duration::from_secs_f64(self.judge_timeout_s);
        Ok(crate::judge::JudgeOptions {
            command_timeout: timeout,
            llm: crate::judge::LlmOptions {
                model: self.judge_model.clone(),
                endpoint: self.judge_endpoint,
                template: self.judge_template.clone(),
                api_key: read_key("judge_api_key_env", self.judge_api_key_env.as_deref())?,
                timeout,
                retries: self.judge_retries,
                backoff_s: self.judge_backoff_s,
                concurrency: self.judge_concurrency,
                max_tokens: self.judge_max_tokens,
                max_failure_rate: self.judge_max_failure_rate,
            },
        })
    }

    fn check_remote_sampler(&self) -> Result<(), String> {
        let url = self
            .sampler_url
            .as_deref()
            .ok_or("`sampler = \"openai\"` needs `sampler_url` (e.g. \"http://localhost:8000/v1\")")?;
        crate::remote::check_base_url(url).map_err(|e| format!("`sampler_url`: {e}"))?;
        let timeout_ok = self.sampler_timeout_s > 0.0 && self.sampler_timeout_s.is_finite();
        let backoff_ok = self.sampler_backoff_s >= 0.0 && self.sampler_backoff_s.is_finite();
        if self.sampler_concurrency == 0 || !timeout_ok || !backoff_ok {
            return Err(
                "`sampler_concurrency` must be at least 1, `sampler_timeout_s` positive and `sampler_backoff_s` \
                        not negative"
                    .into(),
            );
        }
        if let Some(key) =
            self.sampler_extra_body.keys().find(|k| crate::remote::sampler::REQUEST_FIELDS.contains(&k.as_str()))
        {
            return Err(format!("`sampler_extra_body.{key}`: the sampler sets `{key}` itself (from the loop's keys)"));
        }
        if self.sampler_sync == SamplerSync::Command && self.sampler_sync_command.is_none() {
            return Err("`sampler_sync = \"command\"` needs `sampler_sync_command` (with `{model_dir}`)".into());
        }
        let lora = self.train.get("use_peft").and_then(|v| v.as_bool()) == Some(true);
        match (lora, self.sampler_sync) {
            (true, SamplerSync::Path | SamplerSync::Command) => {
                return Err("`sampler = \"openai\"` with `train.use_peft`: the extrapolated policy is an adapter \
                            stack folder, which inference servers do not load; use `sampler_sync = \"lora\"` (a \
                            server with runtime LoRA loading, e.g. vLLM), train full weights, or sample locally"
                    .into());
            }
            (false, SamplerSync::Lora) => {
                return Err(
                    "`sampler_sync = \"lora\"` needs `train.use_peft = true` (it loads the policy's adapters)".into()
                );
            }
            (true, SamplerSync::Lora) if self.sampler_model.is_none() => {
                return Err("`sampler_sync = \"lora\"` needs `sampler_model`, the name the server serves the base \
                            model by"
                    .into());
            }
            _ => {}
        }
        Ok(())
    }

    /// The remote sampler of `sampler = "openai"`, with the API key read from its variable.
    pub fn remote_sampler(&self) -> Result<Option<crate::remote::RemoteSampler>, LoopError> {
        if self.sampler != Sampler::Openai {
            return Ok(None);
        }
        Ok(Some(crate::remote::RemoteSampler {
            client: crate::remote::ApiClient {
                url: self.sampler_url.clone().unwrap_or_default().trim_end_matches('/').to_string(),
                api_key: read_key("sampler_api_key_env", self.sampler_api_key_env.as_deref())?,
                timeout: std::time::Duration::from_secs_f64(self.sampler_timeout_s),
                retries: self.sampler_retries,
                backoff_s: self.sampler_backoff_s,
            },
            concurrency: self.sampler_concurrency,
            extra_body: match serde_json::to_value(&self.sampler_extra_body) {
                Ok(serde_json::Value::Object(map)) => map,
                _ => serde_json::Map::new(),
            },
        }))
    }

    /// `extrapolation = "logprob"` drops the normalizer `log Z'(x)` of the extrapolated
    /// reference, so it is exact only for losses that a prompt-only shift of the reference
    /// leaves unchanged; for the others `log Z' = alpha D_{1+alpha}(pi_hat_t || pi_hat_{t-1})
    /// >= 0` would bias the loss (methods.md section 3). prefopt refuses those combinations
    /// rather than estimate `Z'` from samples. With alpha = 0, `Z' = 1` and every loss is exact.
    fn check_logprob_losses(&self) -> Result<(), String> {
        // The `[train]` table as the loop will complete it; the paths are placeholders.
        let mut table = self.train.clone();
        for key in ["model", "train_data", "output_dir"] {
            table.insert(key.into(), toml::Value::String(key.into()));
        }
        let train = TrainConfig::from_table(&table).map_err(|m| format!("[train]: {m}"))?;
        let why = "`extrapolation = \"logprob\"` drops the prompt-only normalizer log Z'(x) of the extrapolated \
                   reference, which cancels only in losses that see the reference through rho_w - rho_l (`sigmoid`, \
                   cDPO, `robust`, `hinge`); otherwise log Z' = alpha * D_{1+alpha}(pi_hat_t || pi_hat_{t-1}) >= 0 \
                   biases the loss (docs/methods.md section 3). Use `extrapolation = \"parameter\"`, one of those \
                   losses, or alpha = 0";
        if let Some(loss) = train.loss_type.to_vec().into_iter().find(|l| !l.ignores_reference_shift()) {
            return Err(format!("`train.loss_type` `{}` with {why}", loss.name()));
        }
        if train.spo_lambda > 0.0 {
            return Err(format!(
                "`train.spo_lambda` > 0 (SPO's safe-region term reads the chosen reference log-prob alone) with {why}"
            ));
        }
        Ok(())
    }

    /// beta of iteration t (1-based).
    pub fn beta_at(&self, t: usize) -> f64 {
        match &self.beta {
            BetaSchedule::One(b) => *b,
            BetaSchedule::PerIteration(b) => b[t - 1],
        }
    }

    /// The sampler's settings, stopping at the tokenizer's EOS ids.
    pub fn sampling(&self, tok: &HfTokenizer) -> SamplingParams {
        sampling_params(tok, self.temperature, self.top_p, self.top_k, self.max_new_tokens)
    }

    /// The inner training config of iteration t: `[train]` keys, plus the loop's own.
    pub(super) fn train_config(
        &self,
        t: usize,
        start: &Path,
        pairs: &Path,
        out: &Path,
    ) -> Result<TrainConfig, LoopError> {
        let mut table = self.train.clone();
        let path = |p: &Path| toml::Value::String(p.display().to_string());
        // The reference is the training start (no `ref_model`: the default), which with LoRA
        // is the frozen base policy itself.
        table.insert("model".into(), path(start));
        table.insert("train_data".into(), path(pairs));
        table.insert("output_dir".into(), path(out));
        table.insert("beta".into(), toml::Value::Float(self.beta_at(t)));
        table.insert("resume_from_checkpoint".into(), toml::Value::String("latest".into()));
        table.insert("device".into(), toml::Value::String(self.device.clone()));
        TrainConfig::from_table(&table).map_err(|message| LoopError::Config { source_name: "[train]".into(), message })
    }
}
