//! One module per subcommand: argument struct + `run`.

pub mod apo;
pub mod bench;
pub mod demo;
pub mod generate;
pub mod init;
pub mod score;
pub mod simulate;
pub mod tasks;
pub mod train;

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
