//! Tests of tokenization and truncation on a tiny word-level tokenizer built in code,
//! plus the fixture-parity test against ids computed by the Python side.

use std::path::Path;

use serde_json::json;

use super::*;
use crate::records::Record;
use crate::{parse_preference, parse_sft};

// Ids: 0 <unk>, 1 <s>, 2 </s>, 3 <|im_start|>, 4 <|im_end|>, then the words below.
const WORDS: &[&str] =
    &["Q", ":", "hi", "there", "hithere", "user", "assistant", "a", "b", "c", "x", "system", "think"];
const Q: u32 = 5;
const COLON: u32 = 6;
const HI: u32 = 7;
const HITHERE: u32 = 9;
const USER: u32 = 10;
const ASSISTANT: u32 = 11;
const A: u32 = 12;
const B: u32 = 13;
const C: u32 = 14;
const X: u32 = 15;

/// A WordLevel tokenizer (whitespace pre-tokenizer, BOS post-processor) as tokenizer.json.
fn tokenizer_json() -> String {
    let specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"];
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(id, t)| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let mut vocab = serde_json::Map::new();
    for (id, t) in specials.iter().chain(WORDS).enumerate() {
        vocab.insert(t.to_string(), json!(id));
    }
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
    .to_string()
}

/// ChatML-like, with the BOS written by the template.
const CHATML: &str = "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

struct Folder {
    dir: tempfile::TempDir,
}

impl Folder {
    fn new(config: serde_json::Value) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), tokenizer_json()).unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        Folder { dir }
    }
    fn with(self, name: &str, text: &str) -> Self {
        std::fs::write(self.dir.path().join(name), text).unwrap();
        self
    }
    fn load(&self) -> Result<HfTokenizer, DataError> {
        HfTokenizer::from_dir(self.dir.path())
    }
}

fn tok_with_template(template: &str) -> (Folder, HfTokenizer) {
    let f = Folder::new(json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}));
    let t = f.load().unwrap();
    (f, t)
}

fn tok() -> (Folder, HfTokenizer) {
    tok_with_template(CHATML)
}

fn rec(value: serde_json::Value) -> Record {
    Record { value, source: RecordSource::line("data/train.jsonl", 3) }
}

fn pair(tok: &HfTokenizer, value: serde_json::Value, opts: TokenizeOptions) -> Result<PairOutcome, DataError> {
    tokenize_pair(tok, &parse_preference(&rec(value))?, &opts)
}

fn kept(outcome: PairOutcome) -> TokenizedPair {
    match outcome {
        PairOutcome::Kept(p) => p,
        PairOutcome::Dropped(why) => panic!("dropped: {why}"),
    }
}

fn opts(max_length: Option<usize>, max_prompt_length: Option<usize>) -> TokenizeOptions {
    TokenizeOptions { max_length, max_prompt_length, ..TokenizeOptions::default() }
}

#[test]
fn plain_text_gets_bos_and_eos_and_completion_starts_after_prompt() {
    let (_f, tok) = tok();
    let p = kept(pair(&tok, json!({"prompt": "Q :", "chosen": " a", "rejected": " b c"}), opts(None, None)).unwrap());
    assert_eq!(p.prompt_ids, vec![1, Q, COLON]);
    assert_eq!(p.chosen.input_ids, vec![1, Q, COLON, A, 2]);
    assert_eq!(p.chosen.completion_start, 3);
    assert_eq!(p.rejected.input_ids, vec![1, Q, COLON, B, C, 2]);
    assert_eq!(p.rejected.completion_len(), 3);
    assert_eq!(p.rejected.completion_ids(), &[B, C, 2]);
}

#[test]
fn completion_already_ending_with_eos_keeps_a_single_eos() {
    let (_f, tok) = tok();
    let p = kept(pair(&tok, json!({"prompt": "Q", "chosen": " a</s>", "rejected": " b"}), opts(None, None)).unwrap());
    assert_eq!(p.chosen.input_ids, vec![1, Q, A, 2]);
    assert_eq!(p.rejected.input_ids, vec![1, Q, B, 2]);
}

#[test]
fn completion_start_is_the_longest_shared_token_prefix() {
    // "hi" + "there" tokenizes to one word "hithere": the prompt's last token is not shared.
    let (_f, tok) = tok();
    let p = kept(pair(&tok, json!({"prompt": "hi", "chosen": "there", "rejected": " a"}), opts(None, None)).unwrap());
    assert_eq!(p.prompt_ids, vec![1, HI]);
    assert_eq!(p.chosen.input_ids, vec![1, HITHERE, 2]);
    assert_eq!(p.chosen.completion_start, 1);
    assert_eq!(p.rejected.input_ids, vec![1, HI, A, 2]);
    assert_eq!(p.rejected.completion_start, 2);
}

#[test]
fn max_length_keeps_the_start_and_cuts_the_completion() {
    let (_f, tok) = tok();
    let p = kept(
        pair(&tok, json!({"prompt": "Q :", "chosen": " a", "rejected": " b c c c"}), opts(Some(5), None)).unwrap(),
    );
    assert_eq!(p.chosen.input_ids, vec![1, Q, COLON, A, 2]);
    assert_eq!(p.rejected.input_ids, vec![1, Q, COLON, B, C]);
    assert_eq!(p.rejected.completion_start, 3);
    // One completion token left is enough to keep the pair.
    let p =
        kept(pair(&tok, json!({"prompt": "Q :", "chosen": " a", "rejected": " b c"}), opts(Some(4), None)).unwrap());
    assert_eq!(p.rejected.input_ids, vec![1, Q, COLON, B]);
}

#[test]
fn pair_is_dropped_when_the_prompt_fills_the_budget() {
    let (_f, tok) = tok();
    let out = pair(&tok, json!({"prompt": "Q :", "chosen": " a", "rejected": " b"}), opts(Some(3), None)).unwrap();
    assert_eq!(out, PairOutcome::Dropped("prompt has 3 tokens, max_length is 3".into()));
}

#[test]
fn max_prompt_length_keeps_the_end_of_the_prompt() {
    let (_f, tok) = tok();
    let value = json!({"prompt": "x x Q :", "chosen": " a", "rejected": " b c"});
    let p = kept(pair(&tok, value.clone(), opts(None, Some(2))).unwrap());
    assert_eq!(p.prompt_ids, vec![Q, COLON]);
    assert_eq!(p.chosen.input_ids, vec![Q, COLON, A, 2]);
    assert_eq!(p.chosen.completion_start, 2);
    assert_eq!(p.rejected.input_ids, vec![Q, COLON, B, C, 2]);
    // Then max_length applies to the shortened sequence.
    let p = kept(pair(&tok, value.clone(), opts(Some(4), Some(3))).unwrap());
    assert_eq!(p.prompt_ids, vec![X, Q, COLON]);
    assert_eq!(p.rejected.input_ids, vec![X, Q, COLON, B]);
    assert_eq!(p.rejected.completion_start, 3);
    let out = pair(&tok, value, opts(Some(3), Some(3))).unwrap();
    assert_eq!(out, PairOutcome::Dropped("prompt has 3 tokens, max_length is 3".into()));
}

#[test]
fn conversations_use_the_template_without_adding_special_tokens() {
    let (_f, tok) = tok();
    let value = json!({
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b c"}]});
    let p = kept(pair(&tok, value, opts(None, None)).unwrap());
    // One BOS (the template's), then the generation prompt.
    let prompt = vec![1, 3, USER, HI, 4, 3, ASSISTANT];
    assert_eq!(p.prompt_ids, prompt);
    assert_eq!(p.chosen.input_ids, [prompt.clone(), vec![A, 4]].concat());
    assert_eq!(p.chosen.completion_start, prompt.len());
    assert_eq!(p.rejected.completion_ids(), &[B, C, 4]);
}

#[test]
fn implicit_prompt_conversations_tokenize_like_explicit_ones() {
    let (_f, tok) = tok();
    let explicit = kept(
        pair(
            &tok,
            json!({
        "prompt": [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}]}),
            opts(None, None),
        )
        .unwrap(),
    );
    let implicit = kept(pair(&tok, json!({
        "chosen": [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}]}),
        opts(None, None)).unwrap());
    assert_eq!(explicit, implicit);
}

#[test]
fn template_whose_prompt_is_not_a_prefix_is_an_error_showing_where() {
    // The generation prompt opens a "think" block that the full rendering lacks.
    let (_f, tok) = tok_with_template(
        "{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant think{% endif %}",
    );
    let value = json!({
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}]});
    let e = pair(&tok, value, opts(None, None)).unwrap_err().to_string();
    assert!(e.starts_with("data/train.jsonl:3: field `chosen`: the chat template's rendering"), "{e}");
    assert!(e.contains("the prompt continues with \"think\", the conversation with \"a<|im_end|>\""), "{e}");

    // Same text, but the tokenizer merges across the prompt's end.
    let (_f, tok) = tok_with_template("{% for m in messages %}{{ m.content }}{% endfor %}");
    let value = json!({
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "there"}],
        "rejected": [{"role": "assistant", "content": " b"}]});
    let e = pair(&tok, value, opts(None, None)).unwrap_err().to_string();
    assert!(e.contains("tokens diverge at token 0"), "{e}");
    assert!(e.contains("\"hi\" [7]") && e.contains("\"hithere\" [9]"), "{e}");
}

#[test]
fn common_prefix_starts_a_merged_completion_at_the_shared_tokens_and_marks_it() {
    // "hi" + "there" renders "hithere", one token: the prompt's tokens [hi] are no prefix of
    // the conversation's [hithere].
    let (_f, tok) = tok_with_template("{% for m in messages %}{{ m.content }}{% endfor %}");
    let value = json!({
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "there"}],
        "rejected": [{"role": "assistant", "content": " b"}]});
    let lenient = TokenizeOptions { prompt_boundary: PromptBoundary::CommonPrefix, ..opts(None, None) };
    let PairOutcome::Kept(p) = pair(&tok, value.clone(), lenient).unwrap() else { panic!("dropped") };
    assert_eq!(
        (p.chosen.input_ids.clone(), p.chosen.completion_start, p.chosen.boundary_moved),
        (vec![HITHERE], 0, true)
    );
    assert_eq!((p.rejected.completion_start, p.rejected.boundary_moved), (1, false));
    assert!(matches!(pair(&tok, value, opts(None, None)), Err(DataError::PromptBoundary { .. })));
    // A template whose texts differ stays an error under either rule.
    let (_f, tok) = tok_with_template(
        "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %} think{% endif %}",
    );
    let value = json!({"prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]});
    let e = pair(&tok, value, lenient).unwrap_err().to_string();
    assert!(e.contains("the texts differ"), "{e}");
}

#[test]
fn every_row_that_merges_across_the_prompt_is_reported_in_one_pass() {
    let (_f, tok) = tok_with_template("{% for m in messages %}{{ m.content }}{% endfor %}");
    let row = |chosen: &str| {
        json!({
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": " b"}]})
    };
    let records: Vec<Record> = ["there", " a", "there", " c", "there"]
        .iter()
        .enumerate()
        .map(|(i, c)| Record { value: row(c), source: RecordSource::line("data/train.jsonl", i + 1) })
        .collect();
    let tokenize = |o: TokenizeOptions| {
        tokenize_records(Path::new("data/train.jsonl"), &records, |r| tokenize_pair(&tok, &parse_preference(r)?, &o))
    };
    let e = tokenize(opts(None, None)).unwrap_err().to_string();
    assert!(
        e.starts_with("data/train.jsonl: 3 rows tokenize across the prompt's end (line 1, line 3, line 5); the first: data/train.jsonl:1: field `chosen`"),
        "{e}"
    );
    assert!(e.contains("prompt_boundary = \"common_prefix\""), "{e}");
    let lenient = TokenizeOptions { prompt_boundary: PromptBoundary::CommonPrefix, ..opts(None, None) };
    let kept = tokenize(lenient).unwrap();
    let moved = kept.iter().filter(|o| matches!(o, PairOutcome::Kept(p) if p.chosen.boundary_moved)).count();
    assert_eq!((kept.len(), moved), (5, 3));
}

#[test]
fn completion_with_zero_tokens_is_an_error() {
    let (_f, tok) =
        tok_with_template("{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}");
    let value = json!({
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}]});
    let e = pair(&tok, value, opts(None, None)).unwrap_err().to_string();
    assert_eq!(e, "data/train.jsonl:3: field `chosen`: the completion tokenizes to zero tokens");
}

#[test]
fn template_errors_carry_the_record_source() {
    let (f, tok) = tok_with_template(
        "{% for m in messages %}{% if m.role == 'assistant' and loop.first %}{{ raise_exception('Conversation must start with user') }}{% endif %}{{ m.content }}{% endfor %}",
    );
    let value = json!({
        "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
        "rejected": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "c"}]});
    let e = pair(&tok, value, opts(None, None)).unwrap_err().to_string();
    let config = f.dir.path().join("tokenizer_config.json");
    assert_eq!(
        e,
        format!(
            "data/train.jsonl:3: {}: chat_template: raise_exception: Conversation must start with user (template line 1)",
            config.display()
        )
    );
}

#[test]
fn plain_text_needs_an_eos_token() {
    let f = Folder::new(json!({"bos_token": "<s>", "eos_token": null}));
    let tok = f.load().unwrap();
    let e =
        pair(&tok, json!({"prompt": "Q", "chosen": " a", "rejected": " b"}), opts(None, None)).unwrap_err().to_string();
    assert!(e.starts_with("data/train.jsonl:3: tokenizer folder"), "{e}");
    assert!(e.contains("no eos_token"), "{e}");
}

#[test]
fn sft_and_prompt_tokenization_follow_the_same_rules() {
    let (_f, tok) = tok();
    let ex = parse_sft(&rec(json!({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "a b"}]})))
    .unwrap();
    let SeqOutcome::Kept(seq) = tokenize_sft(&tok, &ex, &opts(None, None)).unwrap() else { panic!() };
    assert_eq!(seq.input_ids, vec![1, 3, USER, HI, 4, 3, ASSISTANT, A, B, 4]);
    assert_eq!(seq.completion_start, 7);
    let SeqOutcome::Kept(seq) = tokenize_sft(&tok, &ex, &opts(Some(8), None)).unwrap() else { panic!() };
    assert_eq!(seq.completion_ids(), &[A]);
    assert_eq!(
        tokenize_sft(&tok, &ex, &opts(Some(7), None)).unwrap(),
        SeqOutcome::Dropped("prompt has 7 tokens, max_length is 7".into())
    );
    let ex = parse_sft(&rec(json!({"prompt": "Q", "completion": " a"}))).unwrap();
    let SeqOutcome::Kept(seq) = tokenize_sft(&tok, &ex, &opts(None, None)).unwrap() else { panic!() };
    assert_eq!(seq.input_ids, vec![1, Q, A, 2]);

    assert_eq!(tokenize_prompt(&tok, &Text::Plain("Q :".into())).unwrap(), vec![1, Q, COLON]);
    let conv = Text::Conversation(vec![Message::new("user", "hi")]);
    assert_eq!(tokenize_prompt(&tok, &conv).unwrap(), vec![1, 3, USER, HI, 4, 3, ASSISTANT]);
}

// ---- tokenizer folders ----

#[test]
fn special_tokens_may_be_added_token_objects_and_generation_config_adds_eos_ids() {
    let f = Folder::new(json!({
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
        "eos_token": {"content": "</s>"},
        "pad_token": null}))
    .with("generation_config.json", r#"{"eos_token_id": [4, 2]}"#);
    let tok = f.load().unwrap();
    assert_eq!(tok.bos_token(), Some("<s>"));
    assert_eq!(tok.eos_token(), Some("</s>"));
    assert_eq!(tok.eos_token_ids(), vec![2, 4]);
    assert_eq!(tok.pad_token_id(), None);
    assert!(!tok.has_chat_template());
    let e = tok.apply_chat_template(&[Message::new("user", "hi")], true).unwrap_err().to_string();
    assert!(e.contains("no chat template"), "{e}");

    let f = Folder::new(json!({"eos_token": "</s>", "pad_token": "<unk>"}))
        .with("generation_config.json", r#"{"eos_token_id": 2}"#);
    let tok = f.load().unwrap();
    assert_eq!(tok.eos_token_ids(), vec![2]);
    assert_eq!(tok.pad_token_id(), Some(0));
    assert_eq!(tok.decode(&[1, Q, 2], true).unwrap(), "Q");
}

#[test]
fn add_bos_and_add_eos_flags_override_the_post_processor_like_transformers() {
    let encode = |config: serde_json::Value| Folder::new(config).load().unwrap().encode("Q", true).unwrap();
    let base = |extra: serde_json::Value| {
        let mut c = json!({"bos_token": "<s>", "eos_token": "</s>"});
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        c
    };
    assert_eq!(encode(base(json!({}))), vec![1, Q], "no flag: tokenizer.json decides");
    assert_eq!(encode(base(json!({"add_bos_token": false}))), vec![Q]);
    assert_eq!(encode(base(json!({"add_eos_token": true}))), vec![Q, 2], "an unset flag counts as false");
    assert_eq!(encode(base(json!({"add_bos_token": true, "add_eos_token": true}))), vec![1, Q, 2]);
    assert_eq!(encode(json!({"bos_token": null, "add_bos_token": true})), vec![Q]);
    let e = Folder::new(base(json!({"add_bos_token": "yes"}))).load().unwrap_err().to_string();
    assert!(e.contains("field `add_bos_token`: expected true or false, found a string"), "{e}");
}

#[test]
fn tokenizers_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<HfTokenizer>();
}

#[test]
fn chat_template_comes_from_the_config_or_the_jinja_file_which_wins() {
    let msgs = [Message::new("user", "hi")];
    let f = Folder::new(json!({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages[0].content }}"}]}));
    assert_eq!(f.load().unwrap().apply_chat_template(&msgs, false).unwrap(), "Dhi");
    let f = f.with("chat_template.jinja", "J{{ messages[0].content }}\n");
    let tok = f.load().unwrap();
    assert_eq!(tok.apply_chat_template(&msgs, false).unwrap(), "Jhi");
    assert_eq!(tok.chat_template_path(), Some(f.dir.path().join("chat_template.jinja").as_path()));

    let f = Folder::new(json!({"chat_template": [{"name": "tool_use", "template": "T"}]}));
    let e = f.load().unwrap_err().to_string();
    assert!(e.contains("no template named \"default\""), "{e}");
}

#[test]
fn tokenizer_folder_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let e = HfTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert_eq!(e, format!("tokenizer folder {}: tokenizer.json not found", dir.path().display()));

    let f = Folder::new(json!({"eos_token": 5}));
    let e = f.load().unwrap_err().to_string();
    assert!(e.contains("tokenizer_config.json: field `eos_token`: expected a string"), "{e}");

    let f = Folder::new(json!({"eos_token": "<eos>"}));
    let e = f.load().unwrap_err().to_string();
    assert!(e.contains("eos_token \"<eos>\" is not in the vocabulary"), "{e}");

    let f = Folder::new(json!({})).with("chat_template.jinja", "{% for m in messages %}");
    let e = f.load().unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{}: chat_template: syntax error", f.dir.path().join("chat_template.jinja").display())),
        "{e}"
    );

    let f = Folder::new(json!({})).with("tokenizer_config.json", "{oops");
    let e = f.load().unwrap_err().to_string();
    assert!(e.contains("tokenizer_config.json: not valid JSON"), "{e}");
}

// ---- fixture parity with the Python side ----

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures"))
}

mod parity;
