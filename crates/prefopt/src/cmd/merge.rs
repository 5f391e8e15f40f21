//! `prefopt merge`: LoRA folded into the base, `W + scale * B A` per adapted module, written
//! as a plain Hugging Face model folder that transformers loads without PEFT. The input is a
//! base model with a PEFT adapter, an adapter stack folder (the APO loop's iterates with
//! LoRA: `W + sum_k c_k scale_k B_k A_k`), or both (the adapter on top of the stack).

use std::path::PathBuf;

use anyhow::{bail, Result};
use prefopt_model::stack::{read_stack, save_concatenated_adapter};
use prefopt_model::{save_model_dir, Policy, StackEntry};

#[derive(clap::Args)]
pub struct MergeArgs {
    /// The base model folder the adapter was trained on (or `org/name[@revision]` in the
    /// local Hugging Face cache), or an adapter stack folder.
    #[arg(long, value_parser = super::model_dir)]
    model: PathBuf,
    /// The PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors).
    /// Optional when --model is an adapter stack. A folder, or `org/name[@revision]` in the
    /// local Hugging Face cache.
    #[arg(long, value_parser = super::model_dir)]
    adapter: Option<PathBuf>,
    /// Output model folder (written atomically; must not exist yet).
    #[arg(long)]
    out: PathBuf,
    /// Write one PEFT LoRA adapter over the base (the adapters concatenated, `lora_alpha =
    /// r` = the sum of their ranks, exactly the merged weights) instead of a model folder.
    #[arg(long)]
    as_adapter: bool,
}

pub fn run(args: MergeArgs) -> Result<()> {
    if args.out.exists() {
        bail!("{}: already exists; `prefopt merge` does not overwrite a folder", args.out.display());
    }
    let device = candle_core::Device::Cpu;
    if args.as_adapter {
        // The adapters alone: the base's weights are not needed to concatenate them.
        let (base, mut entries) = read_stack(&args.model)?;
        if let Some(dir) = &args.adapter {
            entries.push(StackEntry { adapter: dir.clone(), coefficient: 1.0 });
        }
        if entries.is_empty() {
            bail!("{}: a plain model folder and no --adapter: nothing to merge", args.model.display());
        }
        let rank = save_concatenated_adapter(&base, &entries, &args.out, &device)?;
        let summary: Vec<String> =
            entries.iter().map(|e| format!("{} x {}", e.coefficient, e.adapter.display())).collect();
        eprintln!(
            "concatenated {} into one adapter of rank {rank} over {} -> {}",
            summary.join(" + "),
            base.display(),
            args.out.display()
        );
        return Ok(());
    }
    let mut policy = Policy::load(&args.model, &device)?;
    if let Some(dir) = &args.adapter {
        policy = policy.with_adapter(dir, 1.0, &device)?;
    }
    if policy.adapters.is_empty() {
        bail!("{}: a plain model folder and no --adapter: nothing to merge", args.model.display());
    }
    let summary: Vec<String> = policy
        .adapters
        .iter()
        .zip(&policy.entries)
        .map(|((a, c), e)| format!("{} x {} (r {}, scale {})", c, e.adapter.display(), a.config.r, a.config.scale()))
        .collect();
    let merged = policy.merged()?;
    // The base's other files (tokenizer, generation config) beside the merged weights.
    save_model_dir(&args.out, &merged.raw_config, &merged.params, Some(&merged.dir))?;
    eprintln!("merged {} into {} -> {}", summary.join(" + "), merged.dir.display(), args.out.display());
    Ok(())
}
