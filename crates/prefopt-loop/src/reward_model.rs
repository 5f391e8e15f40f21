//! `rm:<model folder>`: a Hugging Face `*ForSequenceClassification` reward model of the
//! Llama family (`LlamaForSequenceClassification`, `MistralForSequenceClassification`,
//! `Qwen2ForSequenceClassification`; made by TRL's `RewardTrainer` or `prefopt reward`), run
//! on prefopt's own model code ([`prefopt_model::reward`]: where the reward is read).
//!
//! Prompt + completion become tokens as TRL's `RewardTrainer` makes them
//! ([`prefopt_data::reward`]), so a model trained there reads what it was trained on; a
//! conversation prompt gets the completion as one assistant message.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use prefopt_data::{HfTokenizer, Message, Text};
use prefopt_model::{pooled_rewards, reward_position, Llama, Mode, Precision, RewardWeights};

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
        if !dir.is_dir() {
            return Err(JudgeError::RewardModel { dir: dir.to_path_buf(), message: "folder not found".into() });
        }
        let weights = RewardWeights::load(dir, device)?;
        let cfg = &weights.model.config;
        let net = Llama::new(cfg, &weights.model.params, Mode::Infer, Precision::F32)?;
        let score = weights.score().as_detached_tensor().to_dtype(DType::F32)?;
        let tok = HfTokenizer::from_dir(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            net,
            score,
            tok,
            pad_token_id: cfg.pad_token_id,
            max_positions: cfg.max_position_embeddings,
            device: device.clone(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The token ids the model reads for `prompt` followed by `completion` (module doc).
    pub fn tokenize(&self, prompt: &Text, completion: &str) -> Result<Vec<u32>, JudgeError> {
        let completion = match prompt {
            Text::Plain(_) => Text::Plain(completion.to_string()),
            Text::Conversation(_) => Text::Conversation(vec![Message::new("assistant", completion)]),
        };
        Ok(prefopt_data::tokenize_scored(&self.tok, prompt, &completion)?)
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
            let rows: Vec<usize> =
                chunk.iter().enumerate().map(|(b, ids)| b * width + reward_position(ids, self.pad_token_id)).collect();
            let rewards = pooled_rewards(&h.to_dtype(DType::F32)?, &rows, &self.score)?;
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
