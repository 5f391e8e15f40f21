//! Which device the tensors live on, from the `--device` flag or the `device` config key:
//! `cpu`, `cuda` (the first GPU) or `cuda:N`. One parser for every command, so the GPU path
//! only needs kernels, not plumbing.

use candle_core::Device;

use crate::error::{ModelError, Result};

/// The accepted spellings, for messages and `--help`.
pub const DEVICE_HELP: &str = "cpu, cuda or cuda:N";

/// Parses a device name. `cuda` needs a binary built with the `cuda` cargo feature; without
/// it the error says so rather than falling back to the CPU.
pub fn parse_device(spec: &str) -> Result<Device> {
    let bad = |message: String| ModelError::Device { spec: spec.to_string(), message };
    match spec.trim() {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                None => 0,
                Some(n) => {
                    n.parse::<usize>().map_err(|_| bad(format!("`{n}` is not a GPU number; expected {DEVICE_HELP}")))?
                }
            };
            cuda(ordinal).map_err(bad)
        }
        _ => Err(bad(format!("unknown device; expected {DEVICE_HELP}"))),
    }
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> std::result::Result<Device, String> {
    Device::new_cuda(ordinal).map_err(|e| format!("cannot open GPU {ordinal}: {e}"))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_ordinal: usize) -> std::result::Result<Device, String> {
    Err("this prefopt was built without the `cuda` cargo feature; rebuild with \
         `cargo build --release --features cuda` (scripts/build_cuda.sh) to run on a GPU"
        .into())
}

/// The name `parse_device` reads back (`cpu`, `cuda:0`), for logs and manifests.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_parses_and_unknown_names_are_refused_naming_the_choices() {
        assert!(matches!(parse_device("cpu").unwrap(), Device::Cpu));
        assert_eq!(device_name(&Device::Cpu), "cpu");
        let err = parse_device("gpu").unwrap_err().to_string();
        assert!(err.contains("`gpu`") && err.contains(DEVICE_HELP), "{err}");
        let err = parse_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("`x` is not a GPU number"), "{err}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_names_the_feature() {
        for spec in ["cuda", "cuda:1"] {
            let err = parse_device(spec).unwrap_err().to_string();
            assert!(err.contains("`cuda` cargo feature") && err.contains("--features cuda"), "{err}");
        }
    }
}
