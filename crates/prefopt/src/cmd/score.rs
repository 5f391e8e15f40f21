//! `prefopt score`: placeholder, being written.

#[derive(clap::Args)]
pub struct ScoreArgs {}

pub fn run(_args: ScoreArgs) -> anyhow::Result<()> {
    anyhow::bail!("score is not implemented yet")
}
