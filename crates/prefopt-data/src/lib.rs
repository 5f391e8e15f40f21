//! Files in, token sequences out: the data side of prefopt.
//!
//! This crate reads preference, SFT and prompt datasets in TRL's column conventions
//! (JSON Lines or Parquet; plain strings or `{role, content}` conversations), loads a
//! Hugging Face tokenizer folder with its special tokens and chat template, and turns
//! each example into token ids with the completion's start marked and the length
//! budget applied, following `docs/methods.md` section 1 (TRL's convention).
//!
//! It is not a model, a batcher or a trainer: it knows nothing of tensors, devices or
//! losses. Every error names its source (file and line, or tokenizer folder) and bad
//! input is reported, never skipped and never a panic.
//!
//! ```no_run
//! use prefopt_data::*;
//! # fn main() -> Result<(), DataError> {
//! let tok = HfTokenizer::from_dir(std::path::Path::new("models/qwen"))?;
//! let opts = TokenizeOptions { max_length: Some(1024), ..TokenizeOptions::default() };
//! for record in read_records(std::path::Path::new("data/train.jsonl"))? {
//!     let example = parse_preference(&record)?;
//!     match tokenize_pair(&tok, &example, &opts)? {
//!         PairOutcome::Kept(pair) => println!("{} chosen tokens", pair.chosen.completion_len()),
//!         PairOutcome::Dropped(why) => eprintln!("{}: dropped: {why}", record.source),
//!     }
//! }
//! # Ok(()) }
//! ```

pub mod char_tokenizer;
pub mod error;
mod parquet_rows;
pub mod preference;
pub mod records;
pub mod reward;
pub mod sequence;
pub mod sft;
mod template;
pub mod text;
pub mod tokenizer;
pub mod unpaired;
pub mod workload;

pub use char_tokenizer::{printable_ascii, write_char_tokenizer};
pub use error::{DataError, Location, RecordSource};
pub use preference::{parse_preference, PreferenceExample};
pub use records::{read_records, Record};
pub use reward::{tokenize_reward_pair, tokenize_scored, ScoredPair, ScoredPairOutcome};
pub use sequence::{
    tokenize_pair, tokenize_prompt, tokenize_records, tokenize_sft, PairOutcome, PromptBoundary, SeqOutcome,
    TokenizeOptions, TokenizedPair, TokenizedSequence,
};
pub use sft::{parse_prompt, parse_sft, SftExample};
pub use text::Text;
pub use tokenizer::{HfTokenizer, Message};
pub use unpaired::{parse_unpaired, UnpairedExample};
