//! TRL's preference formats: `prompt`/`chosen`/`rejected`, plain or conversational,
//! with the prompt explicit or implicit in the conversations.

use crate::error::{DataError, RecordSource};
use crate::records::Record;
use crate::text::{get, parse_text, require, Text};
use crate::tokenizer::Message;

/// One preference pair: a prompt, the preferred and the dispreferred completion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreferenceExample {
    /// The prompt (plain, or the conversation before the completions).
    pub prompt: Text,
    /// The preferred completion (plain, or the messages after the prompt).
    pub chosen: Text,
    /// The dispreferred completion.
    pub rejected: Text,
    /// Where the example was read from; tokenization errors name it.
    pub source: RecordSource,
}

/// Reads a preference pair in one of TRL's formats:
///
/// - standard: `prompt`, `chosen`, `rejected` strings (`prompt` required);
/// - conversational: lists of `{role, content}` messages; `prompt` may be absent when
///   `chosen`/`rejected` hold the whole conversations: the prompt is then their longest
///   common leading run of whole messages and the completions are the rest.
///
/// Mixed formats are an error, with one exception TRL also accepts: a plain `prompt`
/// beside whole conversations (as in `ultrafeedback_binarized`) when it is the text of
/// the conversations' last shared user message; the prompt is then taken from the
/// conversations.
pub fn parse_preference(record: &Record) -> Result<PreferenceExample, DataError> {
    let at = &record.source;
    let chosen = parse_text(at, "chosen", require(record, "chosen")?)?;
    let rejected = parse_text(at, "rejected", require(record, "rejected")?)?;
    let prompt = get(record, "prompt").map(|v| parse_text(at, "prompt", v)).transpose()?;

    let example = |prompt, chosen, rejected| PreferenceExample { prompt, chosen, rejected, source: at.clone() };
    match (prompt, chosen, rejected) {
        (Some(p @ Text::Plain(_)), c @ Text::Plain(_), r @ Text::Plain(_)) => Ok(example(p, c, r)),
        (Some(p @ Text::Conversation(_)), c @ Text::Conversation(_), r @ Text::Conversation(_)) => Ok(example(p, c, r)),
        (None, Text::Conversation(c), Text::Conversation(r)) => {
            let (p, c, r) = split_implicit_prompt(at, c, r)?;
            Ok(example(p, c, r))
        }
        (Some(Text::Plain(p)), Text::Conversation(c), Text::Conversation(r)) => {
            let (prompt, c, r) =
                split_implicit_prompt(at, c, r).map_err(|_| mixed(at, "chosen", "a list of messages", "a string"))?;
            match &prompt {
                Text::Conversation(msgs) if is_redundant_prompt(&p, msgs) => Ok(example(prompt, c, r)),
                _ => Err(DataError::field(
                    at,
                    "prompt",
                    "is a string but `chosen` and `rejected` are lists of messages, and the string is not \
                     their last shared user message; use lists of messages for all three fields \
                     (or omit `prompt` to take it from the conversations)",
                )),
            }
        }
        (None, Text::Plain(_), Text::Plain(_)) => Err(DataError::missing(at, "prompt")),
        (None, c, r) => Err(mixed(at, "rejected", r.kind(), c.kind())),
        (Some(p), c, r) => {
            if c.is_conversational() != p.is_conversational() {
                Err(mixed(at, "chosen", c.kind(), p.kind()))
            } else {
                Err(mixed(at, "rejected", r.kind(), p.kind()))
            }
        }
    }
}

/// The error for a field whose format differs from the others'.
pub(crate) fn mixed(at: &RecordSource, field: &str, is: &str, others: &str) -> DataError {
    DataError::field(
        at,
        field,
        format!(
            "is {is} but the other fields are {others}; use one format (strings, or lists of \
             {{role, content}} messages) for every field"
        ),
    )
}

/// TRL's `maybe_extract_prompt` ignores a plain `prompt` beside whole conversations; we
/// accept it only when it repeats the conversation's last prompt message.
fn is_redundant_prompt(prompt: &str, messages: &[Message]) -> bool {
    messages.last().is_some_and(|m| m.role == "user" && m.content.trim() == prompt.trim())
}

/// Splits whole conversations into the shared prompt and the two completions.
fn split_implicit_prompt(
    at: &RecordSource,
    chosen: Vec<Message>,
    rejected: Vec<Message>,
) -> Result<(Text, Text, Text), DataError> {
    let shared = chosen.iter().zip(&rejected).take_while(|(c, r)| c == r).count();
    if shared == 0 {
        return Err(DataError::record(
            at,
            "no `prompt` field, and `chosen` and `rejected` share no leading message, so the prompt \
             cannot be inferred; add a `prompt` field",
        ));
    }
    for (field, msgs) in [("chosen", &chosen), ("rejected", &rejected)] {
        if msgs.len() == shared {
            return Err(DataError::field(
                at,
                field,
                "no message left after removing the prompt shared with the other completion \
                 (one conversation is a prefix of the other)",
            ));
        }
    }
    let mut chosen = chosen;
    let mut rejected = rejected;
    let chosen_rest = chosen.split_off(shared);
    let rejected_rest = rejected.split_off(shared);
    Ok((Text::Conversation(chosen), Text::Conversation(chosen_rest), Text::Conversation(rejected_rest)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(value: serde_json::Value) -> Record {
        Record { value, source: RecordSource::line("data/train.jsonl", 7) }
    }

    fn conv(pairs: &[(&str, &str)]) -> Text {
        Text::Conversation(pairs.iter().map(|(r, c)| Message::new(*r, *c)).collect())
    }

    fn err(value: serde_json::Value) -> String {
        parse_preference(&rec(value)).unwrap_err().to_string()
    }

    #[test]
    fn standard_format_reads_three_strings() {
        let ex = parse_preference(&rec(json!({"prompt": "Q", "chosen": " a", "rejected": " b", "score": 3}))).unwrap();
        assert_eq!(ex.prompt, Text::Plain("Q".into()));
        assert_eq!(ex.chosen, Text::Plain(" a".into()));
        assert_eq!(ex.rejected, Text::Plain(" b".into()));
        assert_eq!(ex.source, RecordSource::line("data/train.jsonl", 7));
    }

    #[test]
    fn explicit_conversational_prompt_is_kept() {
        let ex = parse_preference(&rec(json!({
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]})))
        .unwrap();
        assert_eq!(ex.prompt, conv(&[("user", "hi")]));
        assert_eq!(ex.rejected, conv(&[("assistant", "b")]));
    }

    #[test]
    fn implicit_prompt_is_the_longest_common_run_of_whole_messages() {
        let ex = parse_preference(&rec(json!({
            "chosen": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                       {"role": "assistant", "content": "a"}, {"role": "user", "content": "more"}],
            "rejected": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "b"}]})))
        .unwrap();
        assert_eq!(ex.prompt, conv(&[("system", "s"), ("user", "hi")]));
        assert_eq!(ex.chosen, conv(&[("assistant", "a"), ("user", "more")]));
        assert_eq!(ex.rejected, conv(&[("assistant", "b")]));
    }

    #[test]
    fn implicit_split_that_empties_a_completion_is_an_error() {
        let e = err(json!({
            "chosen": [{"role": "user", "content": "hi"}],
            "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}]}));
        assert!(e.starts_with("data/train.jsonl:7: field `chosen`: no message left"), "{e}");
        let e = err(json!({
            "chosen": [{"role": "user", "content": "a"}],
            "rejected": [{"role": "user", "content": "b"}]}));
        assert!(e.contains("share no leading message"), "{e}");
    }

    #[test]
    fn plain_text_without_prompt_is_a_missing_field() {
        assert_eq!(err(json!({"chosen": "a", "rejected": "b"})), "data/train.jsonl:7: missing field `prompt`");
        assert_eq!(err(json!({"prompt": "p", "rejected": "b"})), "data/train.jsonl:7: missing field `chosen`");
    }

    #[test]
    fn wrong_types_name_the_field_and_what_was_found() {
        assert_eq!(
            err(json!({"prompt": "p", "chosen": 3, "rejected": "b"})),
            "data/train.jsonl:7: field `chosen`: expected a string or a list of {role, content} messages, found a number"
        );
        let e = err(json!({"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant"}]}));
        assert_eq!(e, "data/train.jsonl:7: field `rejected`: message 0: missing `content`");
        let e = err(json!({"chosen": [{"role": "user", "content": [{"type": "text"}]}], "rejected": "b"}));
        assert!(e.contains("multimodal"), "{e}");
        let e = err(json!({"prompt": [], "chosen": "a", "rejected": "b"}));
        assert!(e.contains("field `prompt`") && e.contains("empty list"), "{e}");
    }

    #[test]
    fn mixed_formats_are_an_error() {
        let e = err(json!({"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}));
        assert!(
            e.starts_with(
                "data/train.jsonl:7: field `chosen`: is a list of messages but the other fields are a string"
            ),
            "{e}"
        );
        let e = err(json!({"prompt": [{"role": "user", "content": "p"}], "chosen": "a", "rejected": "b"}));
        assert!(e.starts_with("data/train.jsonl:7: field `chosen`: is a string"), "{e}");
        let e = err(json!({"chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}));
        assert!(e.starts_with("data/train.jsonl:7: field `rejected`: is a string"), "{e}");
        // A plain prompt beside whole conversations that it does not repeat.
        let e = err(json!({"prompt": "other",
            "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}]}));
        assert!(e.starts_with("data/train.jsonl:7: field `prompt`: is a string"), "{e}");
    }

    #[test]
    fn ultrafeedback_style_redundant_plain_prompt_is_accepted() {
        let ex = parse_preference(&rec(json!({"prompt": "hi",
            "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}]})))
        .unwrap();
        assert_eq!(ex.prompt, conv(&[("user", "hi")]));
        assert_eq!(ex.chosen, conv(&[("assistant", "a")]));
    }
}
