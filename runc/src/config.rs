//! The runc family's section of the configuration file.
//!
//! ```toml
//! [runc]
//! binary = "runc"            # looked up in PATH unless absolute
//! root = "/run/kuasar/runc/runc"   # runc's --root; <state_dir>/runc when unset
//! ```

use std::path::PathBuf;

use serde::Deserialize;

/// Settings of the runc family.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RuncSettings {
    /// How to run runc.
    pub runc: RuncSection,
}

/// The `[runc]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuncSection {
    /// The runc binary.
    pub binary: PathBuf,
    /// runc's state directory (`--root`).
    pub root: Option<PathBuf>,
}

impl Default for RuncSection {
    fn default() -> Self {
        Self {
            binary: "runc".into(),
            root: None,
        }
    }
}
