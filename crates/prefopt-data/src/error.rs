//! The crate's one error type, and where a dataset record came from.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where in its file a record sits, for error messages.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    /// A JSON Lines line number, 1-based (as editors show it).
    Line(usize),
    /// A Parquet row index, 0-based (as `datasets` shows it).
    Row(usize),
    /// An element of a JSON array file, or of data built in memory, 0-based.
    Index(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line(n) => write!(f, "line {n}"),
            Location::Row(n) => write!(f, "row {n}"),
            Location::Index(n) => write!(f, "record {n}"),
        }
    }
}

/// The file and the position in it that a [`crate::Record`] was read from.
///
/// Displays as `data/train.jsonl:7`, `data/train.parquet: row 3` or
/// `data/train.json: record 3`, ready to prefix an error message.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RecordSource {
    /// The dataset file (or a label such as `<generated>` for data built in memory).
    pub path: PathBuf,
    /// The position inside that file.
    pub location: Location,
}

impl RecordSource {
    /// A JSON Lines line (1-based).
    pub fn line(path: impl Into<PathBuf>, line: usize) -> Self {
        Self { path: path.into(), location: Location::Line(line) }
    }

    /// A Parquet row (0-based).
    pub fn row(path: impl Into<PathBuf>, row: usize) -> Self {
        Self { path: path.into(), location: Location::Row(row) }
    }

    /// An element of a JSON array, or the n-th record of data built in memory (0-based).
    pub fn index(path: impl Into<PathBuf>, index: usize) -> Self {
        Self { path: path.into(), location: Location::Index(index) }
    }
}

impl fmt::Display for RecordSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match self.location {
            Location::Line(n) => write!(f, "{path}:{n}"),
            Location::Row(n) => write!(f, "{path}: row {n}"),
            Location::Index(n) => write!(f, "{path}: record {n}"),
        }
    }
}

/// Everything that can go wrong between a file on disk and a token sequence.
///
/// Every message names its source (a file, a file and line, a tokenizer folder) and
/// reads well on its own, so the CLI can print it as is.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be opened or read.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error (in the message, not a `source`: a chain printer
        /// would print it twice).
        error: std::io::Error,
    },

    /// A tokenizer folder has no `tokenizer.json`.
    #[error("tokenizer folder {}: tokenizer.json not found", dir.display())]
    TokenizerNotFound {
        /// The folder that was searched.
        dir: PathBuf,
    },

    /// A whole file is unusable: invalid JSON in a config, an unknown dataset extension,
    /// an unreadable Parquet file, an unsupported column type.
    #[error("{}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// A chat template failed to compile or to render.
    #[error("{}: chat_template: {message}", path.display())]
    Template {
        /// The file the template came from (`chat_template.jinja` or `tokenizer_config.json`).
        path: PathBuf,
        /// The template engine's message, with the template line when known.
        message: String,
    },

    /// A tokenizer folder cannot do what was asked (no chat template, no EOS token,
    /// encoding failed).
    #[error("tokenizer folder {}: {message}", dir.display())]
    Tokenizer {
        /// The tokenizer folder.
        dir: PathBuf,
        /// What is missing or failed.
        message: String,
    },

    /// A record as a whole is wrong (not JSON, not an object, an ambiguous layout, a
    /// prompt/completion that does not tokenize as it should).
    #[error("{at}: {message}")]
    Record {
        /// Where the record is.
        at: RecordSource,
        /// What is wrong.
        message: String,
    },

    /// A record lacks a field it needs.
    #[error("{at}: missing field `{field}`")]
    MissingField {
        /// Where the record is.
        at: RecordSource,
        /// The field's name.
        field: String,
    },

    /// A record's field has the wrong type or an unusable value.
    #[error("{at}: field `{field}`: {message}")]
    Field {
        /// Where the record is.
        at: RecordSource,
        /// The field's name.
        field: String,
        /// What was expected and what was found.
        message: String,
    },

    /// A conversation's tokens do not start with its prompt's tokens although its text
    /// does (a BPE merge across the prompt's end); `prompt_boundary = "common_prefix"`
    /// accepts such rows.
    #[error("{at}: field `{field}`: {message}")]
    PromptBoundary {
        /// Where the record is.
        at: RecordSource,
        /// `chosen`, `rejected` or `completion`.
        field: String,
        /// Where the tokens diverge.
        message: String,
    },

    /// Several rows of one file have [`DataError::PromptBoundary`] mismatches, all reported at
    /// once (a real dataset can hold hundreds).
    #[error(
        "{}: {count} rows tokenize across the prompt's end ({}{}); the first: {first}. Set \
         prompt_boundary = \"common_prefix\" to start their completions at the longest shared \
         token prefix (TRL's rule)",
        path.display(),
        rows.iter().map(|r| r.location.to_string()).collect::<Vec<_>>().join(", "),
        if *count > rows.len() { ", ..." } else { "" }
    )]
    PromptBoundaries {
        /// The data file.
        path: PathBuf,
        /// Rows with a mismatch.
        count: usize,
        /// The first few of them.
        rows: Vec<RecordSource>,
        /// The first row's error.
        first: Box<DataError>,
    },

    /// An error from the tokenizer or the chat template while processing one record.
    #[error("{at}: {inner}")]
    InRecord {
        /// Where the record is.
        at: RecordSource,
        /// The underlying error.
        inner: Box<DataError>,
    },
}

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io { path: path.to_path_buf(), error: source }
    }

    pub(crate) fn file(path: &Path, message: impl Into<String>) -> Self {
        DataError::File { path: path.to_path_buf(), message: message.into() }
    }

    pub(crate) fn record(at: &RecordSource, message: impl Into<String>) -> Self {
        DataError::Record { at: at.clone(), message: message.into() }
    }

    pub(crate) fn field(at: &RecordSource, field: &str, message: impl Into<String>) -> Self {
        DataError::Field { at: at.clone(), field: field.to_string(), message: message.into() }
    }

    pub(crate) fn missing(at: &RecordSource, field: &str) -> Self {
        DataError::MissingField { at: at.clone(), field: field.to_string() }
    }

    /// Attaches a record's source to an error that lacks one (tokenizer, template).
    pub(crate) fn in_record(self, at: &RecordSource) -> Self {
        match self {
            DataError::Record { .. }
            | DataError::MissingField { .. }
            | DataError::Field { .. }
            | DataError::PromptBoundary { .. }
            | DataError::InRecord { .. } => self,
            other => DataError::InRecord { at: at.clone(), inner: Box::new(other) },
        }
    }
}

/// How a JSON value is called in messages: "a string", "a number", "a list", ...
pub(crate) fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_display_as_message_prefixes() {
        assert_eq!(RecordSource::line("data/train.jsonl", 7).to_string(), "data/train.jsonl:7");
        assert_eq!(RecordSource::row("d.parquet", 0).to_string(), "d.parquet: row 0");
        let err =
            DataError::field(&RecordSource::line("data/train.jsonl", 7), "chosen", "expected a string, found a number");
        assert_eq!(err.to_string(), "data/train.jsonl:7: field `chosen`: expected a string, found a number");
    }
}
