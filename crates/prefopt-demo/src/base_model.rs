//! The shipped base model: a 0.8M-parameter Llama with a character-level tokenizer, trained
//! from scratch with `prefopt sft` on the `compare` task by `scripts/make_base_model.sh`
//! (deterministic; the SFT data imitates a sloppy annotator, 40% wrong and 20% off-format
//! answers, so the model is right about half the time and sometimes answers malformed). Its files are compiled into the binary, so `prefopt demo` needs no
//! download and no repository checkout.

use std::path::Path;

use crate::DemoError;

/// (file name, contents) of the model folder.
pub const FILES: [(&str, &[u8]); 5] = [
    ("config.json", include_bytes!("../../../assets/base-model/config.json")),
    ("generation_config.json", include_bytes!("../../../assets/base-model/generation_config.json")),
    ("model.safetensors", include_bytes!("../../../assets/base-model/model.safetensors")),
    ("tokenizer.json", include_bytes!("../../../assets/base-model/tokenizer.json")),
    ("tokenizer_config.json", include_bytes!("../../../assets/base-model/tokenizer_config.json")),
];

/// Writes the shipped model folder at `dir` (atomically), unless an identical copy is there.
pub fn write_base_model(dir: &Path) -> Result<(), DemoError> {
    let same = FILES.iter().all(|(name, bytes)| std::fs::read(dir.join(name)).is_ok_and(|b| b == *bytes));
    if same {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| DemoError::io(parent, e))?;
    }
    prefopt_fs::write_dir_atomic(dir, |tmp| -> Result<(), DemoError> {
        for (name, bytes) in FILES {
            std::fs::write(tmp.join(name), bytes).map_err(|e| DemoError::io(&tmp.join(name), e))?;
        }
        Ok(())
    })
}
