//! A preference file, tokenized once: the kept pairs, where each came from, and how many
//! were dropped by the length budget.

use std::path::{Path, PathBuf};

use prefopt_data::{
    parse_preference, read_records, tokenize_pair, HfTokenizer, PairOutcome, TokenizeOptions, TokenizedPair,
};

use crate::TrainError;

/// Tokenized preference pairs of one file.
pub struct PairDataset {
    pub path: PathBuf,
    pub pairs: Vec<TokenizedPair>,
    /// Where pair i came from (e.g. `train.jsonl:7`), for error messages.
    pub sources: Vec<String>,
    /// Examples dropped because their prompt alone filled `max_length`.
    pub dropped: usize,
}

impl PairDataset {
    /// Reads and tokenizes `path`. An empty file, or one whose every example is dropped by
    /// truncation, is an error: training on nothing is never what the user meant.
    pub fn load(path: &Path, tok: &HfTokenizer, opts: &TokenizeOptions) -> Result<Self, TrainError> {
        let records = read_records(path)?;
        if records.is_empty() {
            return Err(TrainError::Data(format!("{}: the dataset is empty", path.display())));
        }
        let mut pairs = Vec::new();
        let mut sources = Vec::new();
        let mut dropped = 0;
        let mut first_reason = None;
        for record in &records {
            match tokenize_pair(tok, &parse_preference(record)?, opts)? {
                PairOutcome::Kept(pair) => {
                    pairs.push(pair);
                    sources.push(record.source.to_string());
                }
                PairOutcome::Dropped(reason) => {
                    dropped += 1;
                    first_reason.get_or_insert(format!("{}: {reason}", record.source));
                }
            }
        }
        if pairs.is_empty() {
            return Err(TrainError::Data(format!(
                "{}: all {dropped} examples were dropped by truncation (e.g. {}); raise max_length",
                path.display(),
                first_reason.unwrap_or_default()
            )));
        }
        Ok(Self { path: path.to_path_buf(), pairs, sources, dropped })
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}
