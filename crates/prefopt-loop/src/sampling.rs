//! Sampling K completions per prompt: the one sampling loop of prefopt, shared by
//! `prefopt generate` and the online loop's stages (training samples, held-out evaluation).

use prefopt_data::{tokenize_prompt, HfTokenizer};
use prefopt_model::{generate, sample_rng, Generated, Llama, SamplingParams};
use serde::{Deserialize, Serialize};

use crate::judge::PromptItem;
use crate::LoopError;

/// Prompts per generation batch in the loop's stages (each with its K samples).
pub const PROMPTS_PER_BATCH: usize = 8;

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

/// The sampler's settings for a tokenizer: generation stops at its EOS ids, prompts are
/// padded with its padding id.
pub fn sampling_params(
    tok: &HfTokenizer,
    temperature: f64,
    top_p: f64,
    top_k: usize,
    max_new_tokens: usize,
) -> SamplingParams {
    SamplingParams {
        temperature,
        top_p,
        top_k,
        max_new_tokens,
        stop_ids: tok.eos_token_ids(),
        pad_id: tok.padding_id(),
    }
}

/// `k` completions of each prompt (token ids) from `net`, `prompts_per_batch` prompts per
/// batch, shortest prompts first (less padding). Sample j of prompt i draws from its own
/// stream (`seed`, `i * k + j`), so the output does not depend on the batching. Returns one
/// `Vec` of `k` per prompt, in input order; `progress` hears the prompts done so far.
pub fn sample_completions(
    net: &Llama,
    prompts: &[Vec<u32>],
    k: usize,
    params: &SamplingParams,
    seed: u64,
    prompts_per_batch: usize,
    progress: &mut dyn FnMut(usize),
) -> prefopt_model::Result<Vec<Vec<Generated>>> {
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| prompts[i].len());
    let mut out: Vec<Vec<Generated>> = vec![Vec::new(); prompts.len()];
    let mut done = 0;
    for chunk in order.chunks(prompts_per_batch.max(1)) {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let mut rngs: Vec<_> =
            chunk.iter().flat_map(|&i| (0..k).map(move |j| sample_rng(seed, (i * k + j) as u64))).collect();
        let generated = generate(net, &batch, params, &mut rngs)?;
        for (&i, samples) in chunk.iter().zip(generated.chunks(k)) {
            out[i] = samples.to_vec();
        }
        done += chunk.len();
        progress(done);
    }
    Ok(out)
}

/// K samples of each prompt from `net` as the loop's records (text, tokens, log-probs);
/// every random choice flows from `seed`. `progress` hears (prompts done, prompts).
pub fn sample_records(
    net: &Llama,
    tok: &HfTokenizer,
    prompts: &[&PromptItem],
    k: usize,
    params: &SamplingParams,
    seed: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<SampleRecord>, LoopError> {
    let ids = prompts.iter().map(|p| tokenize_prompt(tok, &p.text)).collect::<Result<Vec<_>, _>>()?;
    let total = prompts.len();
    let generated = sample_completions(net, &ids, k, params, seed, PROMPTS_PER_BATCH, &mut |d| progress(d, total))?;
    let mut out = Vec::with_capacity(total);
    for (i, (p, samples)) in prompts.iter().zip(generated).enumerate() {
        let mut record = SampleRecord {
            prompt_index: i,
            prompt: p.text.to_json(),
            meta: p.meta.clone(),
            completions: Vec::with_capacity(k),
            tokens: Vec::with_capacity(k),
            logprobs: Vec::with_capacity(k),
        };
        for g in samples {
            record.completions.push(tok.decode(&g.tokens, true)?);
            record.logprobs.push(g.logprob);
            record.tokens.push(g.tokens);
        }
        out.push(record);
    }
    Ok(out)
}
