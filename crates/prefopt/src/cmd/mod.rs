//! One module per subcommand: argument struct + `run`.

pub mod apo;
pub mod bench;
pub mod demo;
pub mod generate;
pub mod init;
pub mod merge;
pub mod score;
pub mod simulate;
pub mod tasks;
pub mod train;
pub mod workload;

/// `--adapter`: a PEFT LoRA adapter applied on top of `--model`.
#[derive(clap::Args)]
pub struct AdapterArg {
    /// A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) to apply
    /// on top of --model, as `PeftModel.from_pretrained(model, adapter)` does.
    /// A folder, or `org/name[@revision]` in the local Hugging Face cache.
    #[arg(long, value_parser = model_dir)]
    pub adapter: Option<std::path::PathBuf>,
}

impl AdapterArg {
    /// The policy at `model` (a model folder or an adapter stack folder) with the adapter, if
    /// any, on top, as a network for inference.
    pub fn network(
        &self,
        model: &std::path::Path,
        device: &candle_core::Device,
    ) -> anyhow::Result<prefopt_model::Llama> {
        use prefopt_model::{Mode, Policy, Precision};
        let mut policy = Policy::load(model, device)?;
        if let Some(dir) = &self.adapter {
            policy = policy.with_adapter(dir, 1.0, device)?;
        }
        Ok(policy.network(Mode::Infer, Precision::F32)?)
    }
}

/// `--device`, for the commands that run a model without a config file.
#[derive(clap::Args)]
pub struct DeviceArg {
    /// Where the tensors live: cpu, cuda or cuda:N (cuda needs a build with
    /// `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl DeviceArg {
    pub fn device(&self) -> anyhow::Result<candle_core::Device> {
        Ok(prefopt_model::parse_device(&self.device)?)
    }
}

/// `--padding-free` and `--share-prompt`, for the commands that score pairs without a config
/// file (the training keys of the same names; docs/train.md).
#[derive(clap::Args)]
pub struct LayoutArg {
    /// Pack each batch's sequences into one row without padding (`false`: right-pad them).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub padding_free: bool,
    /// Run each pair's prompt once for both completions (`false`: once per sequence).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub share_prompt: bool,
}

impl LayoutArg {
    pub fn layout(&self, pad_id: u32) -> prefopt_train::BatchLayout {
        prefopt_train::BatchLayout { pad_id, padding_free: self.padding_free, share_prompt: self.share_prompt }
    }
}

/// `--device` for the commands with a config file: it overrides the config's `device` key.
#[derive(clap::Args)]
pub struct DeviceOverride {
    /// Where the tensors live: cpu, cuda or cuda:N (cuda needs a build with
    /// `--features cuda`); overrides the config's `device` key (default cpu).
    #[arg(long)]
    pub device: Option<String>,
}

impl DeviceOverride {
    /// The `--set` overrides with `device=...` appended when `--device` was given.
    pub fn with_overrides(&self, overrides: &[String]) -> Vec<String> {
        let mut all = overrides.to_vec();
        if let Some(device) = &self.device {
            all.push(format!("device=\"{device}\""));
        }
        all
    }
}

/// Writes `text` to stdout; a closed stdout (`prefopt bench ... | head -c 10`) is an error
/// that says so, not a panic as `print!` would raise.
pub fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(|e| anyhow::anyhow!("writing to stdout: {e}"))
}

/// `--model`: a folder, or `org/name[@revision]` resolved in the local Hugging Face cache.
pub fn model_dir(spec: &str) -> Result<std::path::PathBuf, String> {
    prefopt_model::resolve_model(std::path::Path::new(spec)).map_err(|e| e.to_string())
}
