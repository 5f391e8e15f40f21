//! TRL's unpaired preference format (KTO): a `prompt`, one `completion`, and a boolean
//! `label` (true: desirable, a thumbs-up; false: undesirable).

use crate::error::DataError;
use crate::records::Record;
use crate::sft::{parse_sft, SftExample};
use crate::text::{get, require};

/// One judged completion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnpairedExample {
    /// The prompt and the completion (either format, as an SFT example's).
    pub example: SftExample,
    /// Whether the completion is desirable.
    pub desirable: bool,
}

/// Reads an unpaired example: `prompt` and `completion` (strings, or lists of messages)
/// and `label` (`true` or `false`). Paired data (`chosen`/`rejected`) is refused with a
/// note: KTO learns from judged single completions.
pub fn parse_unpaired(record: &Record) -> Result<UnpairedExample, DataError> {
    let at = &record.source;
    if get(record, "completion").is_none() && get(record, "chosen").is_some() {
        return Err(DataError::record(
            at,
            "has `chosen`/`rejected` (paired data); KTO reads unpaired rows: `prompt`, `completion` and a \
             boolean `label` (TRL's format; a pair is two rows, the chosen labelled true, the rejected false)",
        ));
    }
    let label = require(record, "label")?;
    let desirable = label.as_bool().ok_or_else(|| {
        DataError::field(at, "label", format!("expected true (desirable) or false (undesirable), found {label}"))
    })?;
    if get(record, "messages").is_some() && get(record, "completion").is_none() {
        return Err(DataError::missing(at, "completion"));
    }
    Ok(UnpairedExample { example: parse_sft(record)?, desirable })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::RecordSource;
    use crate::text::Text;

    fn record(json: &str) -> Record {
        Record { value: serde_json::from_str(json).unwrap(), source: RecordSource::line("kto.jsonl", 4) }
    }

    #[test]
    fn rows_with_a_boolean_label_are_read_and_others_are_named() {
        let ex = parse_unpaired(&record(r#"{"prompt": "Q", "completion": " A", "label": false}"#)).unwrap();
        assert!(!ex.desirable);
        assert_eq!(ex.example.completion, Text::Plain(" A".into()));
        let msg = |json: &str| parse_unpaired(&record(json)).unwrap_err().to_string();
        let e = msg(r#"{"prompt": "Q", "completion": " A", "label": 1}"#);
        assert!(e.contains("kto.jsonl:4") && e.contains("`label`") && e.contains("true (desirable)"), "{e}");
        let e = msg(r#"{"prompt": "Q", "completion": " A"}"#);
        assert!(e.contains("missing field `label`"), "{e}");
        let e = msg(r#"{"prompt": "Q", "chosen": "a", "rejected": "b", "label": true}"#);
        assert!(e.contains("paired data"), "{e}");
    }
}
