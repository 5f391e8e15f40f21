//! TRL's SFT formats (`prompt`/`completion`, or `messages`) and prompt-only files.

use crate::error::{DataError, RecordSource};
use crate::preference::mixed;
use crate::records::Record;
use crate::text::{get, parse_conversation, parse_text, require, Text};

/// One supervised example: a prompt and the completion to learn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SftExample {
    /// The prompt (plain, or the conversation before the completion).
    pub prompt: Text,
    /// The completion (plain, or the assistant message(s) after the prompt).
    pub completion: Text,
    /// Where the example was read from; tokenization errors name it.
    pub source: RecordSource,
}

/// Reads an SFT example in one of TRL's formats:
///
/// - prompt-completion: `prompt` and `completion`, both strings or both lists of
///   `{role, content}` messages;
/// - conversational `messages`: the prompt is everything before the last assistant
///   message, the completion is that message (which must be the last one).
///
/// `prompt`/`completion` win when both layouts are present. TRL's language-modeling
/// `text` format (no prompt) is not supported and says so.
pub fn parse_sft(record: &Record) -> Result<SftExample, DataError> {
    let at = &record.source;
    let example = |prompt, completion| SftExample { prompt, completion, source: at.clone() };
    if let Some(completion) = get(record, "completion") {
        let completion = parse_text(at, "completion", completion)?;
        let prompt = parse_text(at, "prompt", require(record, "prompt")?)?;
        if prompt.is_conversational() != completion.is_conversational() {
            return Err(mixed(at, "completion", completion.kind(), prompt.kind()));
        }
        return Ok(example(prompt, completion));
    }
    if let Some(messages) = get(record, "messages") {
        let mut messages = parse_conversation(at, "messages", messages)?;
        let Some(last) = messages.iter().rposition(|m| m.role == "assistant") else {
            return Err(DataError::field(at, "messages", "has no assistant message to learn"));
        };
        if last + 1 != messages.len() {
            return Err(DataError::field(
                at,
                "messages",
                format!(
                    "the last assistant message (message {last}) is followed by {} more; \
                     the conversation must end with the assistant message to learn",
                    messages.len() - last - 1
                ),
            ));
        }
        if last == 0 {
            return Err(DataError::field(
                at,
                "messages",
                "starts with the assistant message to learn; there is no prompt before it",
            ));
        }
        let completion = messages.split_off(last);
        return Ok(example(Text::Conversation(messages), Text::Conversation(completion)));
    }
    if get(record, "text").is_some() {
        return Err(DataError::record(
            at,
            "field `text` (TRL's language-modeling format) is not supported; use `prompt` and \
             `completion`, or `messages`",
        ));
    }
    if get(record, "prompt").is_some() {
        return Err(DataError::missing(at, "completion"));
    }
    Err(DataError::record(at, "missing fields: expected `prompt` and `completion`, or `messages`"))
}

/// Reads the prompt of a prompt-only record (for generation): `prompt` (a string or a
/// list of messages), or else `messages` (a conversation that must not end with an
/// assistant message).
pub fn parse_prompt(record: &Record) -> Result<Text, DataError> {
    let at = &record.source;
    if let Some(prompt) = get(record, "prompt") {
        return parse_text(at, "prompt", prompt);
    }
    if let Some(messages) = get(record, "messages") {
        let messages = parse_conversation(at, "messages", messages)?;
        if messages.last().is_some_and(|m| m.role == "assistant") {
            return Err(DataError::field(
                at,
                "messages",
                "ends with an assistant message; a prompt must end with the message to answer",
            ));
        }
        return Ok(Text::Conversation(messages));
    }
    Err(DataError::missing(at, "prompt"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::Message;
    use serde_json::json;

    fn rec(value: serde_json::Value) -> Record {
        Record { value, source: RecordSource::line("d.jsonl", 2) }
    }

    #[test]
    fn prompt_completion_plain_and_conversational() {
        let ex = parse_sft(&rec(json!({"prompt": "Q", "completion": " A"}))).unwrap();
        assert_eq!(ex.completion, Text::Plain(" A".into()));
        let ex = parse_sft(&rec(json!({
            "prompt": [{"role": "user", "content": "Q"}],
            "completion": [{"role": "assistant", "content": "A"}]})))
        .unwrap();
        assert_eq!(ex.prompt, Text::Conversation(vec![Message::new("user", "Q")]));
        let e = parse_sft(&rec(json!({"prompt": "Q", "completion": [{"role": "assistant", "content": "A"}]})))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("d.jsonl:2: field `completion`: is a list of messages"), "{e}");
        let e = parse_sft(&rec(json!({"completion": "A"}))).unwrap_err().to_string();
        assert_eq!(e, "d.jsonl:2: missing field `prompt`");
    }

    #[test]
    fn messages_split_before_the_last_assistant_message() {
        let ex = parse_sft(&rec(json!({"messages": [
            {"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"}]})))
        .unwrap();
        match &ex.prompt {
            Text::Conversation(m) => assert_eq!(m.len(), 4),
            other => panic!("{other:?}"),
        }
        assert_eq!(ex.completion, Text::Conversation(vec![Message::new("assistant", "a2")]));
        let e = parse_sft(&rec(json!({"messages": [
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "q2"}]})))
        .unwrap_err()
        .to_string();
        assert!(e.contains("followed by 1 more"), "{e}");
        let e = parse_sft(&rec(json!({"text": "x"}))).unwrap_err().to_string();
        assert!(e.contains("not supported"), "{e}");
    }

    #[test]
    fn prompt_only_records() {
        assert_eq!(parse_prompt(&rec(json!({"prompt": "Q"}))).unwrap(), Text::Plain("Q".into()));
        let t = parse_prompt(&rec(json!({"messages": [{"role": "user", "content": "Q"}]}))).unwrap();
        assert_eq!(t, Text::Conversation(vec![Message::new("user", "Q")]));
        let e =
            parse_prompt(&rec(json!({"messages": [{"role": "assistant", "content": "A"}]}))).unwrap_err().to_string();
        assert!(e.contains("ends with an assistant message"), "{e}");
        assert_eq!(
            parse_prompt(&rec(json!({"question": "Q"}))).unwrap_err().to_string(),
            "d.jsonl:2: missing field `prompt`"
        );
    }
}
