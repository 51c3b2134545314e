//! Test support shared by the workspace's cross-crate tests and by `cargo xtask mutations`.

use std::path::PathBuf;

/// The folder holding the reference goldens and other fixtures.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}
