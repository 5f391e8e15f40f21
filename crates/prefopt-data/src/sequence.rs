//! Prompt + completion to token ids, and truncation: methods.md section 1, exactly.
//!
//! - Plain text: the EOS token's text is appended to the completion (unless it
//!   already ends with it, as TRL's `add_eos` does); `prompt` and
//!   `prompt + completion + eos` are tokenized as whole strings with special tokens
//!   (BOS where the tokenizer adds one); the completion starts after the longest
//!   shared prefix of the two token lists.
//! - Conversational: the prompt is rendered with `add_generation_prompt = true`, the
//!   whole conversation with `false`, both tokenized without special tokens (the
//!   template writes BOS itself); the conversation's tokens must start with the
//!   prompt's, and the completion starts right after them.
//! - Truncation: `max_prompt_length` keeps the END of the prompt; then `max_length`
//!   keeps the START of the sequence, cutting the completion; a pair whose prompt alone
//!   has `max_length` tokens or more is dropped.

use std::path::Path;

use crate::error::{DataError, RecordSource};
use crate::preference::PreferenceExample;
use crate::records::Record;
use crate::sft::SftExample;
use crate::text::Text;
use crate::tokenizer::{HfTokenizer, Message};

/// Length limits, in tokens, as in TRL's `DPOConfig`, and the prompt-boundary rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenizeOptions {
    /// Total budget per sequence (prompt + completion); keeps the start.
    pub max_length: Option<usize>,
    /// Budget for the prompt part; keeps the end.
    pub max_prompt_length: Option<usize>,
    /// What to do when a conversation's tokens do not start with its prompt's.
    pub prompt_boundary: PromptBoundary,
}

/// A conversation whose rendering starts with the prompt's rendering, but whose tokens do
/// not start with the prompt's tokens: a byte-level BPE merged the prompt's last characters
/// with the completion's first (a completion that starts with a newline or spaces, after a
/// template that ends with one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptBoundary {
    /// Refuse the row: the completion's first token would also hold part of the prompt.
    #[default]
    Error,
    /// TRL's rule: the completion starts at the longest shared prefix of the two
    /// tokenizations (the merged token counts as completion).
    CommonPrefix,
}

/// One token sequence = prompt + completion; completion tokens are
/// `input_ids[completion_start..]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizedSequence {
    /// Prompt and completion tokens.
    pub input_ids: Vec<u32>,
    /// Index of the first completion token.
    pub completion_start: usize,
    /// The completion starts inside the rendered prompt (`PromptBoundary::CommonPrefix`
    /// moved the boundary to the shared token prefix).
    pub boundary_moved: bool,
}

impl TokenizedSequence {
    /// Prompt and completion tokens with the completion starting at `completion_start`.
    pub fn new(input_ids: Vec<u32>, completion_start: usize) -> Self {
        Self { input_ids, completion_start, boundary_moved: false }
    }
}

impl TokenizedSequence {
    /// Number of completion tokens (the ones the log-probability sums over).
    pub fn completion_len(&self) -> usize {
        self.input_ids.len().saturating_sub(self.completion_start)
    }

    /// The prompt part of the sequence.
    pub fn prompt_ids(&self) -> &[u32] {
        self.input_ids.get(..self.completion_start).unwrap_or(&self.input_ids)
    }

    /// The completion part of the sequence.
    pub fn completion_ids(&self) -> &[u32] {
        self.input_ids.get(self.completion_start..).unwrap_or(&[])
    }
}

/// A tokenized preference pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizedPair {
    /// The prompt tokenized alone (after `max_prompt_length`).
    pub prompt_ids: Vec<u32>,
    /// Prompt + chosen completion.
    pub chosen: TokenizedSequence,
    /// Prompt + rejected completion.
    pub rejected: TokenizedSequence,
}

impl TokenizedPair {
    /// Tokens of both sequences (the prompt once per sequence): what the pair costs to run,
    /// for balancing work across threads.
    pub fn num_tokens(&self) -> usize {
        self.chosen.input_ids.len() + self.rejected.input_ids.len()
    }
}

/// A pair, or why it was left out (counted in the run's summary).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PairOutcome {
    /// The pair fits the budget (possibly truncated).
    Kept(TokenizedPair),
    /// The prompt alone fills the budget; the reason reads e.g.
    /// "prompt has 30 tokens, max_length is 24".
    Dropped(String),
}

/// A single sequence, or why it was left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SeqOutcome {
    /// The sequence fits the budget (possibly truncated).
    Kept(TokenizedSequence),
    /// The prompt alone fills the budget.
    Dropped(String),
}

/// A prompt, tokenized and (for conversations) rendered, ready to be extended by a
/// completion.
enum PromptPart<'a> {
    Plain { text: &'a str, ids: Vec<u32> },
    Chat { messages: &'a [Message], text: String, ids: Vec<u32> },
}

impl PromptPart<'_> {
    fn ids(&self) -> &[u32] {
        match self {
            PromptPart::Plain { ids, .. } | PromptPart::Chat { ids, .. } => ids,
        }
    }
}

fn prompt_part<'a>(tok: &HfTokenizer, prompt: &'a Text) -> Result<PromptPart<'a>, DataError> {
    Ok(match prompt {
        Text::Plain(text) => PromptPart::Plain { text, ids: tok.encode(text, true)? },
        Text::Conversation(messages) => {
            let text = tok.apply_chat_template(messages, true)?;
            let ids = tok.encode(&text, false)?;
            PromptPart::Chat { messages, text, ids }
        }
    })
}

fn common_prefix_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Prompt + `completion` as one sequence, untruncated.
fn sequence(
    tok: &HfTokenizer,
    prompt: &PromptPart<'_>,
    completion: &Text,
    field: &str,
    at: &RecordSource,
    boundary: PromptBoundary,
) -> Result<TokenizedSequence, DataError> {
    let seq = match (prompt, completion) {
        (PromptPart::Plain { text, ids }, Text::Plain(completion)) => {
            let eos = tok.eos_token().ok_or_else(|| {
                DataError::Tokenizer {
                    dir: tok.dir().to_path_buf(),
                    message: "no eos_token in tokenizer_config.json; plain-text completions \
                              need one to be appended"
                        .into(),
                }
                .in_record(at)
            })?;
            // TRL's add_eos: a completion that already ends with EOS keeps a single one.
            let eos = if completion.ends_with(eos) { "" } else { eos };
            let full = tok.encode(&format!("{text}{completion}{eos}"), true).map_err(|e| e.in_record(at))?;
            TokenizedSequence::new(full.clone(), common_prefix_len(ids, &full))
        }
        (PromptPart::Chat { messages, text, ids }, Text::Conversation(completion)) => {
            let all: Vec<Message> = messages.iter().chain(completion).cloned().collect();
            let full_text = tok.apply_chat_template(&all, false).map_err(|e| e.in_record(at))?;
            let full = tok.encode(&full_text, false).map_err(|e| e.in_record(at))?;
            if full.starts_with(ids) {
                TokenizedSequence::new(full, ids.len())
            } else if boundary == PromptBoundary::CommonPrefix && full_text.starts_with(text.as_str()) {
                let start = common_prefix_len(ids, &full);
                TokenizedSequence { input_ids: full, completion_start: start, boundary_moved: true }
            } else {
                return Err(prefix_mismatch(tok, text, &full_text, ids, &full, field, at));
            }
        }
        (p, c) => {
            let p_kind = match p {
                PromptPart::Plain { .. } => "a string",
                PromptPart::Chat { .. } => "a list of messages",
            };
            return Err(crate::preference::mixed(at, field, c.kind(), p_kind));
        }
    };
    if seq.completion_len() == 0 {
        return Err(DataError::field(at, field, "the completion tokenizes to zero tokens"));
    }
    Ok(seq)
}

/// Up to `n` characters of `s` from byte `from`, quoted.
fn snippet(s: &str, from: usize, n: usize) -> String {
    let tail = s.get(from..).unwrap_or("");
    let cut: String = tail.chars().take(n).collect();
    let more = if tail.chars().count() > n { "..." } else { "" };
    format!("{cut:?}{more}")
}

/// The error for a conversation whose tokens do not start with its prompt's tokens,
/// showing where the two diverge.
fn prefix_mismatch(
    tok: &HfTokenizer,
    prompt_text: &str,
    full_text: &str,
    prompt_ids: &[u32],
    full_ids: &[u32],
    field: &str,
    at: &RecordSource,
) -> DataError {
    let head = format!(
        "the chat template's rendering of prompt + {field} does not start with its rendering of \
         the prompt alone (add_generation_prompt = true)"
    );
    if !full_text.starts_with(prompt_text) {
        let byte = prompt_text
            .char_indices()
            .zip(full_text.chars())
            .find(|((_, a), b)| a != b)
            .map_or(prompt_text.len().min(full_text.len()), |((i, _), _)| i);
        return DataError::field(
            at,
            field,
            format!(
                "{head}: the texts differ at character {}: the prompt continues with {}, the \
                 conversation with {}",
                prompt_text.get(..byte).unwrap_or("").chars().count(),
                snippet(prompt_text, byte, 40),
                snippet(full_text, byte, 40)
            ),
        );
    }
    let i = common_prefix_len(prompt_ids, full_ids);
    let show = |ids: &[u32]| {
        let window = ids.get(i..(i + 6).min(ids.len())).unwrap_or(&[]);
        let text = tok.decode(window, false).unwrap_or_default();
        format!("{text:?} {window:?}")
    };
    DataError::PromptBoundary {
        at: at.clone(),
        field: field.to_string(),
        message: format!(
            "{head}: the texts agree but the tokens diverge at token {i} (the tokenizer merges \
             across the prompt's end): the prompt continues with {}, the conversation with {}",
            show(prompt_ids),
            show(full_ids)
        ),
    }
}

/// Keeps the last `max` prompt tokens of a sequence.
fn truncate_prompt_keep_end(seq: &mut TokenizedSequence, max: usize) {
    if seq.completion_start > max {
        let cut = seq.completion_start - max;
        seq.input_ids.drain(..cut);
        seq.completion_start = max;
    }
}

fn keep_end(ids: &mut Vec<u32>, max: usize) {
    if ids.len() > max {
        let cut = ids.len() - max;
        ids.drain(..cut);
    }
}

fn dropped(prompt_len: usize, max_length: usize) -> String {
    format!("prompt has {prompt_len} tokens, max_length is {max_length}")
}

/// How many rows a [`DataError::PromptBoundaries`] lists by location.
const BOUNDARY_ROWS_SHOWN: usize = 5;

/// Tokenizes every record of `path` with `tokenize_one`, in order. A prompt-boundary mismatch
/// ([`DataError::PromptBoundary`]) does not stop the pass: all of them are collected and
/// reported as one [`DataError::PromptBoundaries`], so a large file shows how many rows and
/// where; any other error stops at once.
pub fn tokenize_records<T>(
    path: &Path,
    records: &[Record],
    mut tokenize_one: impl FnMut(&Record) -> Result<T, DataError>,
) -> Result<Vec<T>, DataError> {
    let mut out = Vec::with_capacity(records.len());
    let (mut count, mut rows, mut first) = (0, Vec::new(), None);
    for record in records {
        match tokenize_one(record) {
            Ok(t) => out.push(t),
            Err(e @ DataError::PromptBoundary { .. }) => {
                count += 1;
                if rows.len() < BOUNDARY_ROWS_SHOWN {
                    rows.push(record.source.clone());
                }
                first.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    match first {
        None => Ok(out),
        Some(first) if count == 1 => Err(first),
        Some(first) => {
            Err(DataError::PromptBoundaries { path: path.to_path_buf(), count, rows, first: Box::new(first) })
        }
    }
}

/// Tokenizes a preference pair (see the module doc for the rules) and truncates it.
/// Errors name the example's file and line.
pub fn tokenize_pair(
    tok: &HfTokenizer,
    ex: &PreferenceExample,
    opts: &TokenizeOptions,
) -> Result<PairOutcome, DataError> {
    let at = &ex.source;
    let prompt = prompt_part(tok, &ex.prompt).map_err(|e| e.in_record(at))?;
    let mut chosen = sequence(tok, &prompt, &ex.chosen, "chosen", at, opts.prompt_boundary)?;
    let mut rejected = sequence(tok, &prompt, &ex.rejected, "rejected", at, opts.prompt_boundary)?;
    let mut prompt_ids = prompt.ids().to_vec();

    if let Some(max) = opts.max_prompt_length {
        keep_end(&mut prompt_ids, max);
        truncate_prompt_keep_end(&mut chosen, max);
        truncate_prompt_keep_end(&mut rejected, max);
    }
    if let Some(max) = opts.max_length {
        let prompt_len = prompt_ids.len().max(chosen.completion_start).max(rejected.completion_start);
        if prompt_len >= max {
            return Ok(PairOutcome::Dropped(dropped(prompt_len, max)));
        }
        chosen.input_ids.truncate(max);
        rejected.input_ids.truncate(max);
    }
    Ok(PairOutcome::Kept(TokenizedPair { prompt_ids, chosen, rejected }))
}

/// Tokenizes an SFT example with the same rules as [`tokenize_pair`].
pub fn tokenize_sft(tok: &HfTokenizer, ex: &SftExample, opts: &TokenizeOptions) -> Result<SeqOutcome, DataError> {
    let at = &ex.source;
    let prompt = prompt_part(tok, &ex.prompt).map_err(|e| e.in_record(at))?;
    let mut seq = sequence(tok, &prompt, &ex.completion, "completion", at, opts.prompt_boundary)?;
    let prompt_len = prompt.ids().len();
    if let Some(max) = opts.max_prompt_length {
        truncate_prompt_keep_end(&mut seq, max);
    }
    if let Some(max) = opts.max_length {
        let prompt_len = opts.max_prompt_length.map_or(prompt_len, |m| prompt_len.min(m)).max(seq.completion_start);
        if prompt_len >= max {
            return Ok(SeqOutcome::Dropped(dropped(prompt_len, max)));
        }
        seq.input_ids.truncate(max);
    }
    Ok(SeqOutcome::Kept(seq))
}

/// The token ids a model generates from: plain prompts with special tokens (BOS),
/// conversations rendered with `add_generation_prompt = true` and tokenized without.
pub fn tokenize_prompt(tok: &HfTokenizer, prompt: &Text) -> Result<Vec<u32>, DataError> {
    match prompt_part(tok, prompt)? {
        PromptPart::Plain { ids, .. } | PromptPart::Chat { ids, .. } => Ok(ids),
    }
}

#[cfg(test)]
mod tests;
