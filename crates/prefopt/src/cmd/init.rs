//! `prefopt init`: a freshly initialized model folder from an architecture `config.json` and
//! a tokenizer, the starting point of training from scratch (as transformers' `from_config`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use prefopt_data::{printable_ascii, write_char_tokenizer, HfTokenizer};
use prefopt_model::{init_params, save_model_dir, LlamaConfig};

#[derive(clap::Args)]
pub struct InitArgs {
    /// Architecture: a Hugging Face `config.json` of a supported model type (llama, mistral, qwen2).
    #[arg(long)]
    arch: PathBuf,
    /// Tokenizer folder whose files (tokenizer.json, tokenizer_config.json, chat template) are copied.
    #[arg(long, conflicts_with = "char_tokenizer", required_unless_present = "char_tokenizer")]
    tokenizer: Option<PathBuf>,
    /// Instead of --tokenizer: a character-level tokenizer over printable ASCII and newline.
    #[arg(long)]
    char_tokenizer: bool,
    /// Seeds the weights: N(0, initializer_range^2) for matrices, 1 for norms, 0 for biases.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output model folder; must not exist yet.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: InitArgs) -> Result<()> {
    if args.out.exists() {
        bail!("{}: already exists; `prefopt init` does not overwrite a folder", args.out.display());
    }
    let (config, raw) = LlamaConfig::from_file(&args.arch)?;
    let std = raw.get("initializer_range").and_then(|v| v.as_f64()).unwrap_or(0.02);

    // The tokenizer files go to a staging folder beside the output, copied in by the save.
    let staging = args.out.with_extension("tokenizer-staging");
    let _cleanup = RemoveOnDrop(staging.clone());
    std::fs::create_dir_all(&staging).with_context(|| staging.display().to_string())?;
    match &args.tokenizer {
        Some(dir) => copy_tokenizer_files(dir, &staging)?,
        None => {
            write_char_tokenizer(&staging, &printable_ascii())?;
        }
    }
    let tokenizer = HfTokenizer::from_dir(&staging)?;
    let tokens = tokenizer.inner().get_vocab_size(true);
    if tokens > config.vocab_size {
        bail!(
            "{}: vocab_size {} is smaller than the tokenizer's {tokens} tokens",
            args.arch.display(),
            config.vocab_size
        );
    }
    let eos = tokenizer.eos_token_ids();
    if !staging.join("generation_config.json").exists() {
        let mut gen = serde_json::json!({ "eos_token_id": eos.first() });
        if let Some(pad) = tokenizer.pad_token_id() {
            gen["pad_token_id"] = pad.into();
        }
        std::fs::write(staging.join("generation_config.json"), serde_json::to_string_pretty(&gen)?)?;
    }

    let params = init_params(&config, std, args.seed, &Device::Cpu)?;
    save_model_dir(&args.out, &raw, &params, Some(&staging))?;
    eprintln!(
        "initialized {} ({} parameters, {} layers, hidden {}, vocab {}; seed {}) -> {}",
        config.model_type,
        params.num_elements(),
        config.num_hidden_layers,
        config.hidden_size,
        config.vocab_size,
        args.seed,
        args.out.display()
    );
    Ok(())
}

/// The tokenizer's files of a model folder (not its weights or config).
fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<()> {
    let names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"];
    if !from.join("tokenizer.json").is_file() {
        bail!("{}: no tokenizer.json in this folder", from.display());
    }
    for name in names.iter().filter(|n| from.join(n).is_file()) {
        std::fs::copy(from.join(name), to.join(name)).with_context(|| from.join(name).display().to_string())?;
    }
    Ok(())
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
