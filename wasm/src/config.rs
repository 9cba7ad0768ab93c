//! The wasm family's section of the configuration file.
//!
//! ```toml
//! [wasm]
//! cache_dir = "/var/lib/kuasar/wasm/modules"   # compiled modules; <state_dir>/modules when unset
//! ```

use std::path::PathBuf;

use serde::Deserialize;

/// Settings of the wasm family.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct WasmSettings {
    /// How modules are compiled and kept.
    pub wasm: WasmSection,
}

/// The `[wasm]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WasmSection {
    /// Directory of precompiled modules, keyed by module content and engine settings.
    pub cache_dir: Option<PathBuf>,
}
