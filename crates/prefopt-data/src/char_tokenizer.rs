//! A character-level Hugging Face tokenizer for models trained from scratch on small
//! alphabets (the built-in tasks): one token per character, an end-of-text token, and an
//! unknown token. Written through the `tokenizers` crate as `tokenizer.json` (a BPE model
//! with no merges, so every character stays its own token; the `Fuse` decoder joins them
//! back without spaces), plus a `tokenizer_config.json` that `transformers` and
//! [`HfTokenizer`](crate::HfTokenizer) read.

use std::path::Path;

use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::{AddedToken, Tokenizer};

use crate::DataError;

/// The end-of-text token: ends every completion, pads batches.
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// Stands for any character outside the alphabet.
pub const UNKNOWN: &str = "<unk>";

/// Every printable ASCII character, space and newline: enough for the built-in tasks.
pub fn printable_ascii() -> Vec<char> {
    std::iter::once('\n').chain((' '..='~').collect::<Vec<_>>()).collect()
}

/// Writes `tokenizer.json` and `tokenizer_config.json` into `dir` (created if missing).
/// Ids: 0 is the end-of-text token, 1 the unknown token, then `alphabet` in order.
pub fn write_char_tokenizer(dir: &Path, alphabet: &[char]) -> Result<usize, DataError> {
    let err = |e: &dyn std::fmt::Display| DataError::file(dir, e.to_string());
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = alphabet.iter().find(|c| !seen.insert(**c)) {
        return Err(err(&format!("character {dup:?} appears twice in the alphabet")));
    }
    let vocab: Vocab = [END_OF_TEXT.to_string(), UNKNOWN.to_string()]
        .into_iter()
        .chain(alphabet.iter().map(char::to_string))
        .enumerate()
        .map(|(id, token)| (token, id as u32))
        .collect();
    let size = vocab.len();
    let bpe = BPE::builder().vocab_and_merges(vocab, vec![]).unk_token(UNKNOWN.into()).build().map_err(|e| err(&e))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_decoder(Some(Fuse::new()));
    tokenizer.add_special_tokens(&[AddedToken::from(END_OF_TEXT, true), AddedToken::from(UNKNOWN, true)]);
    std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
    tokenizer.save(dir.join("tokenizer.json"), true).map_err(|e| err(&e))?;
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": END_OF_TEXT,
        "pad_token": END_OF_TEXT,
        "unk_token": UNKNOWN,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": false,
    });
    let text = serde_json::to_string_pretty(&config).map_err(|e| err(&e))?;
    std::fs::write(dir.join("tokenizer_config.json"), text).map_err(|e| err(&e))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HfTokenizer;

    #[test]
    fn one_token_per_character_and_a_lossless_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let size = write_char_tokenizer(dir.path(), &printable_ascii()).unwrap();
        assert_eq!(size, 2 + 96);
        let tok = HfTokenizer::from_dir(dir.path()).unwrap();
        let text = "What is 37 + 48?\nAnswer: 85";
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(ids.len(), text.chars().count());
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        assert_eq!(tok.eos_token(), Some(END_OF_TEXT));
        assert_eq!(tok.eos_token_ids(), vec![0]);
        // Outside the alphabet: the unknown token, not a crash or a silent drop.
        assert_eq!(tok.encode("é", true).unwrap(), vec![1]);
        let eos = tok.encode(&format!("7{END_OF_TEXT}"), true).unwrap();
        assert_eq!(eos, vec![ids[text.find('7').unwrap()], 0]);
    }

    #[test]
    fn a_repeated_character_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = write_char_tokenizer(dir.path(), &['a', 'b', 'a']).unwrap_err();
        assert!(e.to_string().contains("'a' appears twice"), "{e}");
    }
}
