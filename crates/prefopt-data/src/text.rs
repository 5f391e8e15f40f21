//! A dataset field's text: a plain string or a conversation, and the shared code that
//! reads one from a record with errors naming the file, line and field.

use serde_json::Value;

use crate::error::{json_kind, DataError, RecordSource};
use crate::records::Record;
use crate::tokenizer::Message;

/// A prompt or completion as TRL datasets hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Text {
    /// Standard format: a string.
    Plain(String),
    /// Conversational format: a list of `{role, content}` messages.
    Conversation(Vec<Message>),
}

impl Text {
    /// Whether this is the conversational format.
    pub fn is_conversational(&self) -> bool {
        matches!(self, Text::Conversation(_))
    }

    /// The value as TRL datasets hold it: a string, or a list of `{role, content}` objects.
    pub fn to_json(&self) -> Value {
        match self {
            Text::Plain(s) => Value::String(s.clone()),
            Text::Conversation(messages) => Value::Array(
                messages.iter().map(|m| serde_json::json!({"role": m.role, "content": m.content})).collect(),
            ),
        }
    }

    /// Reads a field's value (a string or a non-empty list of `{role, content}` messages);
    /// errors name `at` and `field`. The inverse of [`Text::to_json`].
    pub fn from_json(at: &RecordSource, field: &str, value: &Value) -> Result<Text, DataError> {
        parse_text(at, field, value)
    }

    /// How this format is called in messages.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Text::Plain(_) => "a string",
            Text::Conversation(_) => "a list of messages",
        }
    }
}

/// The value of `field`, or `None` when it is absent or null.
pub(crate) fn get<'a>(record: &'a Record, field: &str) -> Option<&'a Value> {
    record.value.get(field).filter(|v| !v.is_null())
}

/// The value of `field`, or a "missing field" error.
pub(crate) fn require<'a>(record: &'a Record, field: &str) -> Result<&'a Value, DataError> {
    get(record, field).ok_or_else(|| DataError::missing(&record.source, field))
}

const EXPECTED: &str = "expected a string or a list of {role, content} messages";

/// Reads a field holding a string or a non-empty list of `{role, content}` messages.
pub(crate) fn parse_text(at: &RecordSource, field: &str, value: &Value) -> Result<Text, DataError> {
    match value {
        Value::String(s) => Ok(Text::Plain(s.clone())),
        Value::Array(items) => parse_messages(at, field, items).map(Text::Conversation),
        other => Err(DataError::field(at, field, format!("{EXPECTED}, found {}", json_kind(other)))),
    }
}

/// Reads a field that must be a conversation.
pub(crate) fn parse_conversation(at: &RecordSource, field: &str, value: &Value) -> Result<Vec<Message>, DataError> {
    match value {
        Value::Array(items) => parse_messages(at, field, items),
        other => Err(DataError::field(
            at,
            field,
            format!("expected a list of {{role, content}} messages, found {}", json_kind(other)),
        )),
    }
}

fn parse_messages(at: &RecordSource, field: &str, items: &[Value]) -> Result<Vec<Message>, DataError> {
    if items.is_empty() {
        return Err(DataError::field(at, field, format!("{EXPECTED}, found an empty list")));
    }
    items.iter().enumerate().map(|(i, item)| parse_message(at, field, i, item)).collect()
}

fn parse_message(at: &RecordSource, field: &str, i: usize, item: &Value) -> Result<Message, DataError> {
    let err = |msg: String| DataError::field(at, field, format!("message {i}: {msg}"));
    let Value::Object(obj) = item else {
        return Err(err(format!("expected a {{role, content}} object, found {}", json_kind(item))));
    };
    let mut role = None;
    let mut content = None;
    for (key, value) in obj {
        match (key.as_str(), value) {
            ("role", Value::String(s)) => role = Some(s.clone()),
            ("content", Value::String(s)) => content = Some(s.clone()),
            ("role" | "content", Value::Null) => {}
            ("role" | "content", other) => {
                let hint = if key == "content" && other.is_array() {
                    " (multimodal content parts are not supported)"
                } else {
                    ""
                };
                return Err(err(format!("`{key}` must be a string, found {}{hint}", json_kind(other))));
            }
            // Parquet structs carry every field of the schema, null where unused.
            (_, Value::Null) => {}
            (other, _) => {
                return Err(err(format!("unsupported key `{other}`: prefopt reads only `role` and `content`")))
            }
        }
    }
    match (role, content) {
        (Some(role), Some(content)) => Ok(Message { role, content }),
        (None, _) => Err(err("missing `role`".into())),
        (_, None) => Err(err("missing `content`".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_plain_and_conversational_text() {
        let at = RecordSource::line("samples.jsonl", 3);
        for text in [
            Text::Plain("Q: 2+2?".into()),
            Text::Conversation(vec![Message::new("system", "s"), Message::new("user", "hi")]),
        ] {
            assert_eq!(Text::from_json(&at, "prompt", &text.to_json()).unwrap(), text);
        }
        let err = Text::from_json(&at, "prompt", &serde_json::json!(7)).unwrap_err().to_string();
        assert_eq!(
            err,
            "samples.jsonl:3: field `prompt`: expected a string or a list of {role, content} messages, found a number"
        );
    }
}
