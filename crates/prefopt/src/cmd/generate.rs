//! `prefopt generate`: sample completions of a prompt file with a KV cache, batched across
//! prompts, and write them as JSONL with their sequence log-probs; or ask an OpenAI-compatible
//! server for them (`--sampler-url`) and score them with the local copy of the model.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use prefopt_data::{parse_prompt, read_records, tokenize_prompt, HfTokenizer};
use prefopt_loop::judge::PromptItem;
use prefopt_loop::remote::sampler::REQUEST_FIELDS;
use prefopt_loop::remote::{api_key_from_env, check_base_url, ApiClient, RemoteSampler};
use prefopt_loop::sampling::{remote_sample_records, sample_completions, sampling_params};
use prefopt_model::Generated;

use super::{AdapterArg, DeviceArg};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Hugging Face model folder (config.json, safetensors, tokenizer files) or
    /// `org/name[@revision]` in the local Hugging Face cache, or an adapter
    /// stack folder (adapter_stack.json, as the APO loop writes with LoRA).
    #[arg(long, value_parser = super::model_dir)]
    model: PathBuf,
    /// Prompts: JSONL or Parquet, one per record: `prompt` (a string, or a list of
    /// {role, content} messages) or `messages`. Conversations get the chat template with
    /// the generation prompt; plain strings are tokenized with the tokenizer's special tokens.
    #[arg(long)]
    prompts: PathBuf,
    /// Output JSONL: one line per (prompt, sample), prompts in input order.
    #[arg(long)]
    out: PathBuf,
    /// Completions sampled per prompt.
    #[arg(long, default_value_t = 1)]
    num_samples: usize,
    /// Softmax temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Keep only the k most likely tokens; 0 turns the filter off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// At most this many new tokens per completion (fewer when the model's context,
    /// max_position_embeddings, fills first).
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Random seed. Sample k of prompt i draws from its own ChaCha8 stream
    /// (seed, stream i * num_samples + k), so the output does not depend on --batch-size.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Prompts per batch (each with its --num-samples samples).
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[command(flatten)]
    adapter: AdapterArg,
    #[command(flatten)]
    device: DeviceArg,
    #[command(flatten)]
    server: ServerArgs,
}

/// Sampling from an inference server instead of in-process.
#[derive(clap::Args)]
struct ServerArgs {
    /// Ask an OpenAI-compatible server (vLLM, SGLang, `transformers serve`) at this base URL,
    /// `http://host:port/v1` (or https), for the completions (`POST /completions`, the prompt rendered by
    /// --model's chat template, a seed per sample); --model stays the local copy that renders
    /// the prompts and scores the log-probs, so it must be the model the server serves.
    /// Answers are kept in `<out>.partial.jsonl` as they arrive: rerun the same command after
    /// an interruption and only the missing prompts are asked for (docs/apo.md).
    #[arg(long)]
    sampler_url: Option<String>,
    /// The `model` of each request (default: --model's absolute path, which `transformers
    /// serve` loads).
    #[arg(long, requires = "sampler_url")]
    sampler_model: Option<String>,
    /// Name of the environment variable holding the server's API key (never the key).
    #[arg(long, requires = "sampler_url")]
    sampler_api_key_env: Option<String>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    sampler_concurrency: usize,
    /// Longest wait for one answer, in seconds.
    #[arg(long, default_value_t = 300.0)]
    sampler_timeout_s: f64,
    /// Retries of a request after a 429, a 5xx, a timeout or a refused connection, after
    /// 1, 2, 4, ... seconds (a 429's Retry-After wins).
    #[arg(long, default_value_t = 5)]
    sampler_retries: usize,
    /// A JSON object of fields added to every request, for what a server takes beyond
    /// OpenAI's API, e.g. `'{"generation_config": "{\"do_sample\": true}"}'` for
    /// `transformers serve`, which otherwise decodes greedily when the model's
    /// generation_config.json does not set do_sample.
    #[arg(long, requires = "sampler_url")]
    sampler_extra_body: Option<String>,
}

impl ServerArgs {
    /// The server's client, or `None` when sampling in-process.
    fn sampler(&self) -> Result<Option<RemoteSampler>> {
        let Some(url) = &self.sampler_url else { return Ok(None) };
        check_base_url(url).map_err(|e| anyhow::anyhow!("--sampler-url: {e}"))?;
        if self.sampler_concurrency == 0 || !(self.sampler_timeout_s > 0.0 && self.sampler_timeout_s.is_finite()) {
            bail!("--sampler-concurrency must be at least 1 and --sampler-timeout-s positive");
        }
        let api_key = api_key_from_env(self.sampler_api_key_env.as_deref())
            .map_err(|e| anyhow::anyhow!("--sampler-api-key-env: {e}"))?;
        Ok(Some(RemoteSampler {
            client: ApiClient {
                url: url.trim_end_matches('/').to_string(),
                api_key,
                timeout: std::time::Duration::from_secs_f64(self.sampler_timeout_s),
                retries: self.sampler_retries,
                backoff_s: 1.0,
            },
            concurrency: self.sampler_concurrency,
            extra_body: match &self.sampler_extra_body {
                None => serde_json::Map::new(),
                Some(text) => match serde_json::from_str(text) {
                    Ok(serde_json::Value::Object(map)) => {
                        if let Some(key) = map.keys().find(|k| REQUEST_FIELDS.contains(&k.as_str())) {
                            bail!("--sampler-extra-body: `{key}` is set from the other flags");
                        }
                        map
                    }
                    _ => bail!("--sampler-extra-body must be a JSON object, got {text}"),
                },
            },
        }))
    }
}

/// One output line, fields in this order.
#[derive(serde::Serialize)]
struct Line<'a> {
    prompt_index: usize,
    sample: usize,
    /// The record's `prompt` (string or messages), else its `messages`, as given.
    prompt: Option<&'a serde_json::Value>,
    /// The completion's text, special tokens (the stop token) skipped.
    completion: String,
    /// Completion tokens, the stop token included.
    n_tokens: usize,
    /// Sum of the completion tokens' log-probs under the model at temperature 1, unfiltered.
    logprob: f64,
    /// "stop": ended on an EOS/stop token; "length": ran out of --max-new-tokens or context.
    finish_reason: &'static str,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        bail!("--temperature must be a number >= 0 (0 is greedy), got {}", args.temperature);
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", args.top_p);
    }
    for (flag, value) in [
        ("--max-new-tokens", args.max_new_tokens),
        ("--num-samples", args.num_samples),
        ("--batch-size", args.batch_size),
    ] {
        if value == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    let device = args.device.device()?;
    let tokenizer = HfTokenizer::from_dir(&args.model)?;
    // Dropping the loaded folder right away frees the weights the model does not share.
    let model = args.adapter.network(&args.model, &device)?;
    let max_pos = model.config().max_position_embeddings;

    // Read and tokenize every prompt first, so a bad line fails the run before any compute.
    let records = read_records(&args.prompts)?;
    if records.is_empty() {
        bail!("{}: no prompts", args.prompts.display());
    }
    let mut prompts = Vec::with_capacity(records.len());
    for record in &records {
        let ids = tokenize_prompt(&tokenizer, &parse_prompt(record)?).with_context(|| record.source.to_string())?;
        if ids.is_empty() {
            bail!("{}: the prompt has no tokens", record.source);
        }
        if ids.len() >= max_pos {
            bail!(
                "{}: the prompt has {} tokens, leaving no room to generate within the model's \
                 max_position_embeddings ({max_pos})",
                record.source,
                ids.len()
            );
        }
        prompts.push(ids);
    }
    let params = sampling_params(&tokenizer, args.temperature, args.top_p, args.top_k, args.max_new_tokens);
    if params.stop_ids.is_empty() {
        eprintln!("note: the tokenizer has no EOS token; every completion runs to --max-new-tokens");
    }

    let k = args.num_samples;
    let progress = crate::progress::bar((prompts.len() * k) as u64, "samples");
    let start = Instant::now();
    let results = match args.server.sampler()? {
        None => sample_completions(&model, &prompts, k, &params, args.seed, args.batch_size, &mut |done| {
            progress.set_position((done * k) as u64)
        })?,
        Some(remote) => {
            if args.adapter.adapter.is_some() || args.top_k != 0 {
                bail!("--sampler-url: --adapter and --top-k are not sent to the server; serve the adapted model, and leave --top-k at 0");
            }
            let items = records
                .iter()
                .map(|r| Ok(PromptItem { text: parse_prompt(r)?, meta: serde_json::Value::Null }))
                .collect::<Result<Vec<_>>>()?;
            let refs: Vec<&PromptItem> = items.iter().collect();
            let served = match &args.server.sampler_model {
                Some(name) => name.clone(),
                None => std::fs::canonicalize(&args.model)?.display().to_string(),
            };
            let partial = args.out.with_extension("partial.jsonl");
            let bar = progress.clone();
            let (records, mismatched) = remote_sample_records(
                &remote,
                &served,
                &model,
                &tokenizer,
                &refs,
                k,
                &params,
                args.seed,
                &partial,
                &mut move |done, _| bar.set_position((done * k) as u64),
            )?;
            if mismatched > 0 {
                eprintln!("note: {mismatched} completions do not re-tokenize to the same text (the server returned no token ids)");
            }
            records
                .into_iter()
                .map(|r| {
                    r.tokens
                        .into_iter()
                        .zip(r.logprobs)
                        .map(|(tokens, logprob)| {
                            let stopped = tokens.last().is_some_and(|t| params.stop_ids.contains(t));
                            Generated { tokens, logprob, stopped }
                        })
                        .collect()
                })
                .collect()
        }
    };
    progress.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();

    let mut lines = Vec::with_capacity(prompts.len() * k);
    let mut new_tokens = 0;
    for (i, samples) in results.iter().enumerate() {
        let record = &records[i].value;
        let prompt = record.get("prompt").filter(|v| !v.is_null()).or(record.get("messages"));
        for (j, g) in samples.iter().enumerate() {
            lines.push(Line {
                prompt_index: i,
                sample: j,
                prompt,
                completion: tokenizer.decode(&g.tokens, true)?,
                n_tokens: g.tokens.len(),
                logprob: g.logprob,
                finish_reason: if g.stopped { "stop" } else { "length" },
            });
            new_tokens += g.tokens.len();
        }
    }
    prefopt_fs::write_jsonl(&args.out, &lines)
        .with_context(|| format!("writing completions to {}", args.out.display()))?;
    // The server's answers are kept until the output holds them.
    if args.server.sampler_url.is_some() {
        prefopt_fs::remove_file_if_exists(&args.out.with_extension("partial.jsonl"))?;
    }
    eprintln!(
        "generated {} completions of {} prompts, {new_tokens} new tokens in {seconds:.1}s ({:.0} tokens/s) -> {}",
        prompts.len() * k,
        prompts.len(),
        new_tokens as f64 / seconds.max(1e-9),
        args.out.display()
    );
    Ok(())
}
