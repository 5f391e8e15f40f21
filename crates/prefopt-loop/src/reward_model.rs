//! `rm:<model folder>`: a Hugging Face `*ForSequenceClassification` reward model of the
//! Llama family (`LlamaForSequenceClassification`, `MistralForSequenceClassification`,
//! `Qwen2ForSequenceClassification`), run on prefopt's own model code.
//!
//! The checkpoint holds the base model's `model.*` tensors and a bias-free `score.weight`
//! (num_labels, hidden); there is no `lm_head`. The reward of a completion is label 0 of
//! `score(h)` at the rightmost token of prompt + completion that is not `config.pad_token_id`
//! (at the last token when the config has no pad id), as transformers computes it.
//!
//! Prompt + completion become tokens as TRL's `RewardTrainer` makes them, so a model trained
//! there reads what it was trained on:
//! - plain prompt: `prompt + completion`, with the tokenizer's EOS text appended unless the
//!   completion already ends with it, tokenized with the tokenizer's special-token rule;
//! - conversation: the prompt's messages plus `{"role": "assistant", "content": completion}`,
//!   rendered by the model's chat template (no generation prompt), tokenized without added
//!   special tokens. A conversation needs a chat template; without one it is an error.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use prefopt_data::{HfTokenizer, Message, Text};
use prefopt_model::config::config_path;
use prefopt_model::{parameter_shapes, Llama, LlamaConfig, Mode, Params, Precision};

use crate::judge::{Judge, JudgeError, Judgement, PromptItem};

/// Sequences scored in one forward pass.
const BATCH: usize = 16;

/// A loaded reward model and its tokenizer.
pub struct RewardModel {
    dir: PathBuf,
    net: Llama,
    /// (num_labels, C); row 0 is the reward.
    score: Tensor,
    tok: HfTokenizer,
    pad_token_id: Option<u32>,
    max_positions: usize,
    device: Device,
}

impl RewardModel {
    /// Loads the folder: `config.json`, safetensors weights (f32/bf16/f16, computed in f32)
    /// and the tokenizer files.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, JudgeError> {
        let err = |message: String| JudgeError::RewardModel { dir: dir.to_path_buf(), message };
        if !dir.is_dir() {
            return Err(err("folder not found".into()));
        }
        let (mut cfg, raw) = LlamaConfig::from_file(&config_path(dir))?;
        if let Some(archs) = raw.get("architectures").and_then(|a| a.as_array()) {
            let names: Vec<&str> = archs.iter().filter_map(|a| a.as_str()).collect();
            if !names.is_empty() && !names.iter().any(|a| a.ends_with("ForSequenceClassification")) {
                return Err(err(format!("config.json names {names:?}, not a *ForSequenceClassification reward model")));
            }
        }
        // transformers writes `id2label`; `num_labels` is its length (2 when neither is given).
        let num_labels = match (raw.get("num_labels").and_then(|n| n.as_u64()), raw.get("id2label")) {
            (Some(n), _) => n as usize,
            (None, Some(serde_json::Value::Object(labels))) => labels.len(),
            _ => 2,
        };
        if num_labels == 0 {
            return Err(err("config.json has no labels (num_labels 0)".into()));
        }
        let pad_token_id = match raw.get("pad_token_id") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(|| err(format!("config.json: pad_token_id must be a token id, found {v}")))?,
            ),
        };
        // No LM head: build the network as if tied, so it needs no `lm_head.weight`.
        cfg.tie_word_embeddings = true;
        let mut shapes = parameter_shapes(&cfg);
        shapes.push(("score.weight".to_string(), vec![num_labels, cfg.hidden_size]));
        let (params, unused) = Params::load(dir, &shapes, device)?;
        if unused.iter().any(|n| n == "score.bias") {
            return Err(err("the score head has a bias (`score.bias`); transformers' has none".into()));
        }
        let net = Llama::new(&cfg, &params, Mode::Infer, Precision::F32)?;
        let score = params
            .get("score.weight")
            .ok_or_else(|| err("no `score.weight`".into()))?
            .as_detached_tensor()
            .to_dtype(DType::F32)?;
        let tok = HfTokenizer::from_dir(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            net,
            score,
            tok,
            pad_token_id,
            max_positions: cfg.max_position_embeddings,
            device: device.clone(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The token ids the model reads for `prompt` followed by `completion` (module doc).
    pub fn tokenize(&self, prompt: &Text, completion: &str) -> Result<Vec<u32>, JudgeError> {
        match prompt {
            Text::Plain(p) => {
                let mut text = format!("{p}{completion}");
                if let Some(eos) = self.tok.eos_token() {
                    if !completion.ends_with(eos) {
                        text.push_str(eos);
                    }
                }
                Ok(self.tok.encode(&text, true)?)
            }
            Text::Conversation(messages) => {
                if !self.tok.has_chat_template() {
                    return Err(JudgeError::RewardModel {
                        dir: self.dir.clone(),
                        message: "the prompt is a conversation but the tokenizer has no chat template".into(),
                    });
                }
                let mut all = messages.clone();
                all.push(Message::new("assistant", completion));
                let text = self.tok.apply_chat_template(&all, false)?;
                Ok(self.tok.encode(&text, false)?)
            }
        }
    }

    /// Where the reward is read: the rightmost token that is not the pad id (0 if all are,
    /// as transformers' argmax gives), or the last token when there is no pad id.
    fn reward_position(&self, ids: &[u32]) -> usize {
        match self.pad_token_id {
            Some(pad) => ids.iter().rposition(|&t| t != pad).unwrap_or(0),
            None => ids.len().saturating_sub(1),
        }
    }

    /// The reward of each token sequence.
    pub fn score_ids(&self, sequences: &[Vec<u32>]) -> Result<Vec<f64>, JudgeError> {
        let err = |message: String| JudgeError::RewardModel { dir: self.dir.clone(), message };
        for (i, ids) in sequences.iter().enumerate() {
            if ids.is_empty() {
                return Err(err(format!("sequence {i} is empty")));
            }
            if ids.len() > self.max_positions {
                return Err(err(format!(
                    "sequence {i} has {} tokens, more than the model's max_position_embeddings ({})",
                    ids.len(),
                    self.max_positions
                )));
            }
        }
        let mut out = Vec::with_capacity(sequences.len());
        for chunk in sequences.chunks(BATCH) {
            // Right-padded: under causal attention the pad tokens after a position cannot
            // change its hidden state, so no attention mask is needed.
            let width = chunk.iter().map(Vec::len).max().unwrap_or(0);
            let fill = self.pad_token_id.unwrap_or(0);
            let flat: Vec<u32> =
                chunk.iter().flat_map(|ids| ids.iter().copied().chain(std::iter::repeat(fill)).take(width)).collect();
            let input = Tensor::from_vec(flat, (chunk.len(), width), &self.device)?;
            let h = self.net.hidden_states(&input, &[], None)?; // (B, T, C)
            let rows = chunk
                .iter()
                .enumerate()
                .map(|(b, ids)| h.i((b, self.reward_position(ids))))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let pooled = Tensor::stack(&rows, 0)?.to_dtype(DType::F32)?; // (B, C)
            let rewards = pooled.matmul(&self.score.i(0..1)?.t()?)?.squeeze(1)?; // (B,)
            out.extend(rewards.to_vec1::<f32>()?.into_iter().map(f64::from));
        }
        Ok(out)
    }

    /// The reward of each completion after `prompt`.
    pub fn score(&self, prompt: &Text, completions: &[String]) -> Result<Vec<f64>, JudgeError> {
        let ids = completions.iter().map(|c| self.tokenize(prompt, c)).collect::<Result<Vec<_>, _>>()?;
        self.score_ids(&ids)
    }
}

impl Judge for RewardModel {
    fn judge(&mut self, prompt: &PromptItem, completions: &[String]) -> Result<Vec<Judgement>, JudgeError> {
        let scores = self.score(&prompt.text, completions)?;
        if let Some((i, s)) = scores.iter().enumerate().find(|(_, s)| !s.is_finite()) {
            return Err(JudgeError::RewardModel {
                dir: self.dir.clone(),
                message: format!("non-finite reward {s} for completion {i}"),
            });
        }
        Ok(scores.into_iter().map(Judgement::score_only).collect())
    }

    fn name(&self) -> String {
        format!("rm:{}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
    }

    fn load() -> RewardModel {
        RewardModel::load(&fixtures().join("models/qwen2-rm"), &Device::Cpu).unwrap()
    }

    fn expected() -> Vec<Value> {
        let text = std::fs::read_to_string(fixtures().join("expected/rm_scores.json")).unwrap();
        let json: Value = serde_json::from_str(&text).unwrap();
        json["cases"].as_array().unwrap().clone()
    }

    fn ids(v: &Value) -> Vec<u32> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
    }

    fn prompt(v: &Value) -> Text {
        match v {
            Value::String(s) => Text::Plain(s.clone()),
            other => Text::Conversation(serde_json::from_value(other.clone()).unwrap()),
        }
    }

    #[test]
    fn tokenization_matches_trl() {
        let rm = load();
        for case in expected().iter().filter(|c| c.get("prompt").is_some()) {
            let got = rm.tokenize(&prompt(&case["prompt"]), case["completion"].as_str().unwrap()).unwrap();
            assert_eq!(got, ids(&case["input_ids"]), "{}", case["name"]);
        }
    }

    #[test]
    fn rewards_match_transformers() {
        let rm = load();
        let cases = expected();
        let seqs: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["input_ids"])).collect();
        // All at once (right-padded batch) and one at a time.
        let batched = rm.score_ids(&seqs).unwrap();
        let mut worst: f64 = 0.0;
        for (i, case) in cases.iter().enumerate() {
            let want = case["score"].as_f64().unwrap();
            let alone = rm.score_ids(&seqs[i..i + 1]).unwrap()[0];
            for got in [batched[i], alone] {
                assert!((got - want).abs() < 1e-4, "{}: {got} vs transformers {want}", case["name"]);
                worst = worst.max((got - want).abs());
            }
        }
        eprintln!("reward model parity: max |diff| {worst:.2e} over {} cases", cases.len());
    }

    #[test]
    fn judge_scores_completions_of_a_prompt() {
        let mut judge = judge_from_fixture();
        let cases = expected();
        let case = &cases[0];
        let completions = vec![
            case["completion"].as_str().unwrap().to_string(),
            cases[1]["completion"].as_str().unwrap().to_string(),
        ];
        let item = PromptItem { text: prompt(&case["prompt"]), meta: Value::Null };
        let got = judge.judge(&item, &completions).unwrap();
        assert!((got[0].score - case["score"].as_f64().unwrap()).abs() < 1e-4);
        assert!((got[1].score - cases[1]["score"].as_f64().unwrap()).abs() < 1e-4);
        assert_eq!((got[0].correct, got[0].malformed), (None, false));
    }

    fn judge_from_fixture() -> Box<dyn Judge> {
        let spec = format!("rm:{}", fixtures().join("models/qwen2-rm").display());
        crate::judge::judge_from_spec(&spec, &Device::Cpu).unwrap()
    }

    #[test]
    fn causal_lm_folders_and_long_sequences_are_refused() {
        let e = RewardModel::load(&fixtures().join("models/qwen2-tied"), &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("Qwen2ForCausalLM") && e.contains("not a *ForSequenceClassification"), "{e}");
        let rm = load();
        let e = rm.score_ids(&[vec![1; 129]]).unwrap_err().to_string();
        assert!(e.contains("129 tokens") && e.contains("max_position_embeddings (128)"), "{e}");
        assert!(rm.score_ids(&[vec![]]).is_err());
    }

    #[test]
    fn conversation_without_chat_template_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let src = fixtures().join("models/qwen2-rm");
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap()).unwrap();
        let mut config = config.as_object().unwrap().clone();
        config.remove("chat_template");
        std::fs::write(dir.path().join("tokenizer_config.json"), Value::Object(config).to_string()).unwrap();
        let rm = RewardModel::load(dir.path(), &Device::Cpu).unwrap();
        let chat = Text::Conversation(vec![Message::new("user", "hi")]);
        let e = rm.score(&chat, &["hello".into()]).unwrap_err().to_string();
        assert!(e.contains("no chat template"), "{e}");
        assert!(rm.score(&Text::Plain("hi".into()), &["hello".into()]).is_ok());
    }
}
