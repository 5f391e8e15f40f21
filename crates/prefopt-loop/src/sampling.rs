//! Sampling K completions per prompt: the one sampling loop of prefopt, shared by
//! `prefopt generate` and the online loop's stages (training samples, held-out evaluation).

use std::path::Path;

use prefopt_data::{tokenize_prompt, HfTokenizer, Text, TokenizedSequence};
use prefopt_model::{generate, sample_rng, Generated, Llama, SamplingParams};
use prefopt_train::{completion_logps, SequenceBatch};
use serde::{Deserialize, Serialize};

use crate::judge::PromptItem;
use crate::remote::{CompletionRequest, RemoteSampler};
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

/// K samples of each prompt from an OpenAI-compatible server ([`crate::remote`]) as the
/// loop's records: the prompt rendered as [`tokenize_prompt`] renders it (the chat template
/// with the generation prompt for conversations), the server's token ids or the text
/// tokenized here (with the EOS token where the server says it stopped), and log-probs under
/// `net`, the local copy of the served model. Sample j of
/// prompt i asks with seed `seed + i * k + j`. Also returns how many completions' tokens do
/// not decode back to their text (a re-tokenization that may differ from the server's).
#[allow(clippy::too_many_arguments)]
pub fn remote_sample_records(
    remote: &RemoteSampler,
    model: &str,
    net: &Llama,
    tok: &HfTokenizer,
    prompts: &[&PromptItem],
    k: usize,
    params: &SamplingParams,
    seed: u64,
    partial: &Path,
    progress: &mut (dyn FnMut(usize, usize) + Send),
) -> Result<(Vec<SampleRecord>, usize), LoopError> {
    let texts = prompts
        .iter()
        .map(|p| match &p.text {
            Text::Plain(s) => Ok(s.clone()),
            Text::Conversation(m) => tok.apply_chat_template(m, true),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let request = CompletionRequest {
        model,
        n: k,
        temperature: params.temperature,
        top_p: params.top_p,
        max_tokens: params.max_new_tokens,
    };
    // Seeds as OpenAI's API takes them: non-negative 32-bit integers.
    let base = seed & 0x7fff_ffff;
    let answers = remote.sample(&request, &texts, |i| base + (i * k) as u64, partial, progress)?;
    let (mut out, mut mismatched) = (Vec::with_capacity(prompts.len()), 0);
    for (i, (p, answer)) in prompts.iter().zip(answers).enumerate() {
        let tokens = match answer.token_ids {
            Some(ids) => ids,
            None => {
                let mut all = Vec::with_capacity(k);
                for (j, text) in answer.texts.iter().enumerate() {
                    let mut ids = tok.encode(text, false)?;
                    mismatched += usize::from(tok.decode(&ids, false)? != *text);
                    // The server leaves the stop token out of the text; the local sampler's
                    // tokens (and log-probs) include it.
                    let stopped = answer.finish_reasons.get(j).is_some_and(|r| r.as_deref() == Some("stop"));
                    if let (true, Some(&eos)) = (stopped, tok.eos_token_ids().first()) {
                        ids.push(eos);
                    }
                    all.push(ids);
                }
                all
            }
        };
        let prompt_ids = tokenize_prompt(tok, &p.text)?;
        let logprobs = score_completions(net, &prompt_ids, &tokens)?;
        out.push(SampleRecord {
            prompt_index: i,
            prompt: p.text.to_json(),
            meta: p.meta.clone(),
            completions: answer.texts,
            tokens,
            logprobs,
        });
    }
    Ok((out, mismatched))
}

/// Summed log-probs under `net` of each completion (token ids) after `prompt_ids`.
pub fn score_completions(net: &Llama, prompt_ids: &[u32], completions: &[Vec<u32>]) -> Result<Vec<f64>, LoopError> {
    let seqs: Vec<TokenizedSequence> =
        completions.iter().map(|c| TokenizedSequence::new([prompt_ids, c].concat(), prompt_ids.len())).collect();
    score_sequences(net, &seqs)
}

/// Summed completion log-probs of `seqs` under `net`, 16 packed sequences per pass.
pub fn score_sequences(net: &Llama, seqs: &[TokenizedSequence]) -> Result<Vec<f64>, LoopError> {
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(16) {
        let refs: Vec<&TokenizedSequence> = chunk.iter().collect();
        let batch = SequenceBatch::packed(&refs, net.device())?;
        let lp: Vec<f32> = completion_logps(net, &batch)?.logps.to_vec1()?;
        out.extend(lp.into_iter().map(f64::from));
    }
    Ok(out)
}
