//! Helpers shared by the test modules.

use std::path::{Path, PathBuf};

/// The repository's `fixtures/` folder.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The device under test, as a `device` config value: `PREFOPT_TEST_DEVICE`, default `cpu`.
pub fn device_name() -> String {
    std::env::var("PREFOPT_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())
}

/// The device under test.
pub fn device() -> candle_core::Device {
    prefopt_model::parse_device(&device_name()).unwrap_or_else(|e| panic!("PREFOPT_TEST_DEVICE: {e}"))
}
