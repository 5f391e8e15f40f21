//! What a reward model reads: a prompt and a completion as one token sequence, made as TRL's
//! `RewardTrainer` makes it, so that a model trained by `prefopt reward` or by TRL reads what
//! it was trained on when it judges (the `rm:` judge).
//!
//! - standard (strings): `prompt + completion`, with the tokenizer's EOS text appended unless
//!   the completion already ends with it, tokenized with the tokenizer's special-token rule
//!   (a BOS where the tokenizer adds one);
//! - conversational: the prompt's messages followed by the completion's, rendered by the
//!   chat template without a generation prompt and tokenized without added special tokens.
//!
//! There is no prompt/completion split and no truncation: TRL drops a pair that is too long
//! ([`tokenize_reward_pair`]).

use crate::error::DataError;
use crate::preference::PreferenceExample;
use crate::text::Text;
use crate::tokenizer::HfTokenizer;

/// The token ids a reward model scores for `completion` after `prompt` (module doc); both in
/// one format.
pub fn tokenize_scored(tok: &HfTokenizer, prompt: &Text, completion: &Text) -> Result<Vec<u32>, DataError> {
    match (prompt, completion) {
        (Text::Plain(p), Text::Plain(c)) => {
            let mut text = format!("{p}{c}");
            if let Some(eos) = tok.eos_token() {
                if !c.ends_with(eos) {
                    text.push_str(eos);
                }
            }
            tok.encode(&text, true)
        }
        (Text::Conversation(p), Text::Conversation(c)) => {
            let all: Vec<_> = p.iter().chain(c).cloned().collect();
            tok.encode(&tok.apply_chat_template(&all, false)?, false)
        }
        (p, c) => Err(DataError::Tokenizer {
            dir: tok.dir().to_path_buf(),
            message: format!(
                "a reward model reads a prompt and a completion in one format, not {} and {}",
                p.kind(),
                c.kind()
            ),
        }),
    }
}

/// A preference pair as a reward model reads it: the chosen and the rejected sequence, each
/// with the prompt in front ([`tokenize_scored`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScoredPair {
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

/// A pair tokenized for reward-model training, or why it was dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScoredPairOutcome {
    Kept(ScoredPair),
    /// Longer than the budget (TRL's rule: a pair is dropped when either sequence has more
    /// than `max_length` tokens; nothing is cut).
    Dropped(String),
}

/// Tokenizes a preference pair for reward-model training (module doc) and applies TRL's
/// length rule: a pair with more than `max_length` tokens on either side is dropped.
pub fn tokenize_reward_pair(
    tok: &HfTokenizer,
    ex: &PreferenceExample,
    max_length: Option<usize>,
) -> Result<ScoredPairOutcome, DataError> {
    // parse_preference has made the three fields one format.
    let chosen = tokenize_scored(tok, &ex.prompt, &ex.chosen).map_err(|e| e.in_record(&ex.source))?;
    let rejected = tokenize_scored(tok, &ex.prompt, &ex.rejected).map_err(|e| e.in_record(&ex.source))?;
    if let Some(max) = max_length {
        let longest = chosen.len().max(rejected.len());
        if longest > max {
            return Ok(ScoredPairOutcome::Dropped(format!(
                "{longest} tokens, more than max_length {max} (pairs are dropped, not cut)"
            )));
        }
    }
    Ok(ScoredPairOutcome::Kept(ScoredPair { chosen, rejected }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::RecordSource;
    use crate::tokenizer::Message;

    fn chatml() -> HfTokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tokenizers/chatml");
        HfTokenizer::from_dir(&dir).unwrap()
    }

    #[test]
    fn plain_text_gets_one_eos_and_conversations_are_rendered_whole() {
        let tok = chatml();
        let plain = |s: &str| Text::Plain(s.into());
        let ids = tokenize_scored(&tok, &plain("Hi "), &plain("there")).unwrap();
        assert_eq!(ids, tok.encode("Hi there<|im_end|>", true).unwrap());
        let ids = tokenize_scored(&tok, &plain("Hi "), &plain("there<|im_end|>")).unwrap();
        assert_eq!(ids, tok.encode("Hi there<|im_end|>", true).unwrap());

        let user = vec![Message::new("user", "Hi")];
        let reply = vec![Message::new("assistant", "there")];
        let ids = tokenize_scored(&tok, &Text::Conversation(user.clone()), &Text::Conversation(reply.clone())).unwrap();
        let whole = tok.apply_chat_template(&[user[0].clone(), reply[0].clone()], false).unwrap();
        assert_eq!(ids, tok.encode(&whole, false).unwrap());

        let err = tokenize_scored(&tok, &Text::Conversation(user), &plain("x")).unwrap_err();
        assert!(err.to_string().contains("one format"), "{err}");
    }

    #[test]
    fn a_pair_longer_than_the_budget_on_either_side_is_dropped_whole() {
        let tok = chatml();
        let ex = PreferenceExample {
            prompt: Text::Plain("Q ".into()),
            chosen: Text::Plain("a".into()),
            rejected: Text::Plain("a much longer answer than the other".into()),
            source: RecordSource::line("t.jsonl", 3),
        };
        let ScoredPairOutcome::Kept(pair) = tokenize_reward_pair(&tok, &ex, None).unwrap() else { panic!() };
        let longest = pair.rejected.len();
        assert!(matches!(tokenize_reward_pair(&tok, &ex, Some(longest)).unwrap(), ScoredPairOutcome::Kept(_)));
        assert!(matches!(tokenize_reward_pair(&tok, &ex, Some(longest - 1)).unwrap(), ScoredPairOutcome::Dropped(_)));
    }
}
