//! A Hugging Face tokenizer folder: `tokenizer.json`, its special tokens, its chat
//! template and the EOS ids generation stops on.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{json_kind, DataError};
use crate::template::{ChatTemplate, SpecialTokens};

/// One chat message, as in TRL's conversational datasets.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, ... (passed to the template as is).
    pub role: String,
    /// The message text.
    pub content: String,
}

impl Message {
    /// A message with this role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A Hugging Face tokenizer folder, loaded: the `tokenizers` tokenizer, the special
/// tokens from `tokenizer_config.json`, the chat template, and the EOS ids of
/// `generation_config.json`.
#[derive(Clone)]
pub struct HfTokenizer {
    dir: PathBuf,
    tokenizer: tokenizers::Tokenizer,
    special: SpecialTokens,
    generation_eos_ids: Vec<u32>,
    chat_template: Option<ChatTemplate>,
}

impl fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("dir", &self.dir)
            .field("special", &self.special)
            .field("generation_eos_ids", &self.generation_eos_ids)
            .field("chat_template", &self.chat_template)
            .finish_non_exhaustive()
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, DataError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DataError::io(path, e)),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| DataError::file(path, format!("not valid JSON: {e}")))
}

/// `bos_token` & co.: a string, an AddedToken object `{"content": ...}`, or null.
fn special_token(config: &Value, key: &str, path: &Path) -> Result<Option<String>, DataError> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(obj)) => match obj.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(DataError::file(path, format!("field `{key}`: an AddedToken object needs a string `content`"))),
        },
        Some(other) => Err(DataError::file(
            path,
            format!(
                "field `{key}`: expected a string, an AddedToken object {{\"content\": ...}} or null, found {}",
                json_kind(other)
            ),
        )),
    }
}

/// `chat_template`: a string, or a list of `{name, template}` (we take "default").
fn config_chat_template(config: &Value, path: &Path) -> Result<Option<String>, DataError> {
    let bad = |what: String| DataError::file(path, format!("field `chat_template`: {what}"));
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(items)) => {
            let mut names = Vec::new();
            for item in items {
                let name = item.get("name").and_then(Value::as_str);
                let template = item.get("template").and_then(Value::as_str);
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_string())),
                    (Some(n), Some(_)) => names.push(n.to_string()),
                    _ => {
                        return Err(bad(
                            "each entry of the list must be an object {\"name\": string, \"template\": string}".into(),
                        ))
                    }
                }
            }
            Err(bad(format!("the list has no template named \"default\" (found: {})", names.join(", "))))
        }
        Some(other) => {
            Err(bad(format!("expected a string or a list of {{name, template}}, found {}", json_kind(other))))
        }
    }
}

/// transformers 5 (`TokenizersBackend`): when tokenizer_config.json sets `add_bos_token`
/// or `add_eos_token`, the post-processor of tokenizer.json is replaced by a template
/// that adds exactly those tokens (an unset flag counts as false, a flag whose token is
/// null is ignored). Without either key, tokenizer.json's post-processor stands.
fn apply_add_bos_eos(
    tokenizer: &mut tokenizers::Tokenizer,
    config: &Value,
    special: &SpecialTokens,
    path: &Path,
) -> Result<(), DataError> {
    let mut explicit = false;
    let mut flag = |key: &str| -> Result<bool, DataError> {
        match config.get(key) {
            None => Ok(false),
            Some(Value::Null) => {
                explicit = true;
                Ok(false)
            }
            Some(Value::Bool(b)) => {
                explicit = true;
                Ok(*b)
            }
            Some(other) => {
                Err(DataError::file(path, format!("field `{key}`: expected true or false, found {}", json_kind(other))))
            }
        }
    };
    let add_bos = flag("add_bos_token")?;
    let add_eos = flag("add_eos_token")?;
    if !explicit {
        return Ok(());
    }
    let mut special_tokens = Vec::new();
    let mut piece = |token: &Option<String>, add: bool, key: &str| -> Result<Option<String>, DataError> {
        match token {
            Some(text) if add => {
                let id = tokenizer.token_to_id(text).ok_or_else(|| {
                    DataError::file(path, format!("{key} {text:?} is not in the vocabulary of tokenizer.json"))
                })?;
                special_tokens.push((text.clone(), id));
                Ok(Some(text.clone()))
            }
            _ => Ok(None),
        }
    };
    let bos = piece(&special.bos_token, add_bos, "bos_token")?;
    let eos = piece(&special.eos_token, add_eos, "eos_token")?;
    let with = |seq: &str, type_id: u8| {
        let mut parts = Vec::new();
        if let Some(b) = &bos {
            parts.push(format!("{b}:{type_id}"));
        }
        parts.push(format!("{seq}:{type_id}"));
        if let Some(e) = &eos {
            parts.push(format!("{e}:{type_id}"));
        }
        parts.join(" ")
    };
    let (single, pair) = (with("$A", 0), format!("{} {}", with("$A", 0), with("$B", 1)));
    let template = tokenizers::processors::template::TemplateProcessing::builder()
        .try_single(single.as_str())
        .and_then(|b| b.try_pair(pair.as_str()))
        .map_err(|e| DataError::file(path, format!("cannot build the add_bos_token/add_eos_token template: {e}")))?
        .special_tokens(special_tokens)
        .build()
        .map_err(|e| DataError::file(path, format!("cannot build the add_bos_token/add_eos_token template: {e}")))?;
    tokenizer.with_post_processor(Some(template));
    Ok(())
}

impl HfTokenizer {
    /// Loads a tokenizer folder: `tokenizer.json` (required), `tokenizer_config.json`
    /// (special tokens, which may be strings, AddedToken objects or null; `chat_template`
    /// as a string or a list of `{name, template}`, "default" taken; `add_bos_token` /
    /// `add_eos_token`, which override tokenizer.json's post-processor as in transformers 5),
    /// `special_tokens_map.json` for special tokens the config lacks, `chat_template.jinja`
    /// (wins over the config's template, as in transformers 5) and
    /// `generation_config.json`'s `eos_token_id` (an int or a list).
    pub fn from_dir(dir: &Path) -> Result<Self, DataError> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(DataError::TokenizerNotFound { dir: dir.to_path_buf() });
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| DataError::file(&tokenizer_path, format!("cannot load tokenizer: {e}")))?;

        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?.unwrap_or(Value::Null);
        let map_path = dir.join("special_tokens_map.json");
        let map = read_json(&map_path)?.unwrap_or(Value::Null);
        let token = |key: &str| -> Result<Option<String>, DataError> {
            match special_token(&config, key, &config_path)? {
                Some(t) => Ok(Some(t)),
                None => special_token(&map, key, &map_path),
            }
        };
        let special = SpecialTokens {
            bos_token: token("bos_token")?,
            eos_token: token("eos_token")?,
            pad_token: token("pad_token")?,
            unk_token: token("unk_token")?,
        };
        for (key, value) in [("eos_token", &special.eos_token), ("pad_token", &special.pad_token)] {
            if let Some(text) = value {
                if tokenizer.token_to_id(text).is_none() {
                    return Err(DataError::file(
                        &config_path,
                        format!("{key} {text:?} is not in the vocabulary of tokenizer.json"),
                    ));
                }
            }
        }

        let mut tokenizer = tokenizer;
        apply_add_bos_eos(&mut tokenizer, &config, &special, &config_path)?;

        let jinja_path = dir.join("chat_template.jinja");
        let chat_template = match std::fs::read_to_string(&jinja_path) {
            Ok(source) => Some(ChatTemplate::compile(&source, &jinja_path)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match config_chat_template(&config, &config_path)? {
                Some(source) => Some(ChatTemplate::compile(&source, &config_path)?),
                None => None,
            },
            Err(e) => return Err(DataError::io(&jinja_path, e)),
        };

        let gen_path = dir.join("generation_config.json");
        let generation_eos_ids = match read_json(&gen_path)? {
            None => Vec::new(),
            Some(gen) => {
                let bad = |found: &Value| {
                    DataError::file(
                        &gen_path,
                        format!(
                            "field `eos_token_id`: expected a token id or a list of token ids, found {}",
                            json_kind(found)
                        ),
                    )
                };
                let as_id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
                match gen.get("eos_token_id") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Array(items)) => {
                        items.iter().map(|v| as_id(v).ok_or_else(|| bad(v))).collect::<Result<_, _>>()?
                    }
                    Some(v) => vec![as_id(v).ok_or_else(|| bad(v))?],
                }
            }
        };

        Ok(Self { dir: dir.to_path_buf(), tokenizer, special, generation_eos_ids, chat_template })
    }

    /// The folder this tokenizer was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    fn error(&self, message: String) -> DataError {
        DataError::Tokenizer { dir: self.dir.clone(), message }
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor
    /// (BOS for Llama-style tokenizers).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, DataError> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map(|enc| enc.get_ids().to_vec())
            .map_err(|e| self.error(format!("cannot encode text: {e}")))
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, DataError> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.error(format!("cannot decode ids {ids:?}: {e}")))
    }

    /// The EOS token's text, from `tokenizer_config.json`.
    pub fn eos_token(&self) -> Option<&str> {
        self.special.eos_token.as_deref()
    }

    /// The BOS token's text, from `tokenizer_config.json`.
    pub fn bos_token(&self) -> Option<&str> {
        self.special.bos_token.as_deref()
    }

    /// The padding token's text, from `tokenizer_config.json`.
    pub fn pad_token(&self) -> Option<&str> {
        self.special.pad_token.as_deref()
    }

    /// Every id generation stops on: the config's EOS token, then
    /// `generation_config.json`'s `eos_token_id`s, without duplicates.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let mut ids = Vec::new();
        let config_eos = self.eos_token().and_then(|t| self.tokenizer.token_to_id(t));
        for id in config_eos.into_iter().chain(self.generation_eos_ids.iter().copied()) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    /// The padding token's id, if the tokenizer has one.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token().and_then(|t| self.tokenizer.token_to_id(t))
    }

    /// The id batches are padded with: the pad token, else the first EOS id (what TRL and
    /// transformers fall back to), else 0. Padding is masked out of every result (right
    /// padding sits after the real tokens under a causal mask; left padding is excluded from
    /// attention), so this choice changes no number, only what the pad slots hold.
    pub fn padding_id(&self) -> u32 {
        self.pad_token_id().or(self.eos_token_ids().first().copied()).unwrap_or(0)
    }

    /// The id of a token's text, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Whether a chat template was found.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// The file the chat template came from, if any.
    pub fn chat_template_path(&self) -> Option<&Path> {
        self.chat_template.as_ref().map(ChatTemplate::path)
    }

    /// Renders `messages` with the chat template as transformers does: variables
    /// `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `pad_token`,
    /// `unk_token`; `raise_exception(msg)`, `tojson` and Python string methods work.
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, DataError> {
        match &self.chat_template {
            Some(t) => t.render(messages, add_generation_prompt, &self.special),
            None => Err(self.error(
                "no chat template (neither chat_template.jinja nor `chat_template` in tokenizer_config.json), \
                 so conversational data cannot be rendered"
                    .into(),
            )),
        }
    }
}
