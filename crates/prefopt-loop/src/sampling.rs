//! Sampling K completions per prompt from a policy, as the loop's first stage.

use candle_core::Device;
use prefopt_data::{tokenize_prompt, HfTokenizer, Text};
use prefopt_model::HfModel;
use serde::{Deserialize, Serialize};

use crate::judge::PromptItem;
use crate::LoopError;

/// The sampler's knobs (the paper: temperature 0.7, top-p 0.9).
#[derive(Clone, Debug)]
pub struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub max_new_tokens: usize,
}

/// One prompt's samples, a line of `iter-<t>/samples.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SampleRecord {
    pub prompt_index: usize,
    /// The prompt as datasets hold it: a string or a list of messages.
    pub prompt: serde_json::Value,
    /// Task data for the oracle (operands, answer), or null.
    pub meta: serde_json::Value,
    pub completions: Vec<String>,
    /// Completion token ids, for log-prob scoring without re-tokenizing.
    pub tokens: Vec<Vec<u32>>,
    /// Sequence log-prob of each completion under the sampling model.
    pub logprobs: Vec<f64>,
}

/// A prompt as JSON, in TRL's column convention.
pub fn text_to_json(text: &Text) -> serde_json::Value {
    match text {
        Text::Plain(s) => serde_json::Value::String(s.clone()),
        Text::Conversation(messages) => serde_json::to_value(messages).unwrap_or_default(),
    }
}

/// The prompt back from its JSON form.
pub fn json_to_text(value: &serde_json::Value) -> Result<Text, LoopError> {
    match value {
        serde_json::Value::String(s) => Ok(Text::Plain(s.clone())),
        other => serde_json::from_value(other.clone())
            .map(Text::Conversation)
            .map_err(|e| LoopError::Io(format!("a prompt is neither a string nor a list of messages: {e}"))),
    }
}

/// K samples for each prompt from `model`; every random choice flows from `seed`.
#[allow(clippy::too_many_arguments)]
pub fn sample_prompts(
    model: &HfModel,
    tok: &HfTokenizer,
    prompts: &[&PromptItem],
    k: usize,
    sampling: &Sampling,
    seed: u64,
    _device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<SampleRecord>, LoopError> {
    let net = model.build(false)?;
    let params = prefopt_model::generate::SamplingParams {
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        top_k: sampling.top_k,
        max_new_tokens: sampling.max_new_tokens,
        stop_ids: tok.eos_token_ids(),
    };
    let pad_id = tok.pad_token_id().or(tok.eos_token_ids().first().copied()).unwrap_or(0);
    let mut out = Vec::with_capacity(prompts.len());
    // Sample j of prompt i draws from its own stream i*K + j, so the output does not depend
    // on how prompts are batched.
    const PROMPTS_PER_BATCH: usize = 8;
    for chunk in prompts.chunks(PROMPTS_PER_BATCH) {
        let first = out.len();
        let ids = chunk.iter().map(|p| tokenize_prompt(tok, &p.text)).collect::<Result<Vec<_>, _>>()?;
        let mut rngs: Vec<_> =
            (0..chunk.len() * k).map(|s| prefopt_model::generate::sample_rng(seed, ((first * k) + s) as u64)).collect();
        let generated = prefopt_model::generate::generate(&net, &ids, &params, &mut rngs, pad_id)?;
        for (j, p) in chunk.iter().enumerate() {
            let rows = &generated[j * k..(j + 1) * k];
            let mut record = SampleRecord {
                prompt_index: out.len(),
                prompt: text_to_json(&p.text),
                meta: p.meta.clone(),
                completions: Vec::with_capacity(k),
                tokens: Vec::with_capacity(k),
                logprobs: Vec::with_capacity(k),
            };
            for g in rows {
                record.completions.push(tok.decode(&g.tokens, true)?);
                record.tokens.push(g.tokens.clone());
                record.logprobs.push(g.logprob);
            }
            out.push(record);
        }
        progress(out.len(), prompts.len());
    }
    Ok(out)
}
