//! The shim's configuration: which sandboxer to forward to.
//!
//! containerd hands a shim its runtime options on stdin at `start`. For a runtime type it
//! does not know, CRI encodes the runtime's `options` table as `runtimeoptions.v1.Options`,
//! whose `ConfigPath` names a TOML file:
//!
//! ```toml
//! sandboxer_address = "/run/runc-sandboxer.sock"   # default: /run/<family>-sandboxer.sock
//! log_level = "info"
//! ```
//!
//! containerd 2.x, given no `ConfigPath`, passes the `options` table itself (`ConfigBody`),
//! so the same keys can stand in the runtime's `options` directly.
//!
//! containerd 2.x's CRI amends the options of a sandbox's containers as runc's, so a shim
//! handler there has no `options`; the shim then reads the file named by the environment
//! variable `KUASAR_<FAMILY>_SHIM_CONFIG` (containerd's environment is the shim's), if set.
//!
//! `start` records the outcome in the bundle (`kuasar-shim.json`), where the pod's shim and a
//! later `delete` read it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Name of the file `start` leaves in every bundle it handles.
pub const BUNDLE_FILE: &str = "kuasar-shim.json";

/// Type URL suffix of CRI's generic runtime options.
const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";

/// Settings of one shim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShimConfig {
    /// The family's sandboxer socket (its Sandbox API).
    pub sandboxer_address: PathBuf,
    /// `tracing` filter of the shim's log, which containerd copies into its own.
    pub log_level: String,
}

impl Default for ShimConfig {
    fn default() -> Self {
        Self {
            sandboxer_address: PathBuf::new(),
            log_level: "info".to_string(),
        }
    }
}

impl ShimConfig {
    /// The defaults of `family`: its sandboxer at `/run/<family>-sandboxer.sock`.
    pub fn defaults(family: &str) -> Self {
        Self {
            sandboxer_address: PathBuf::from(format!("/run/{family}-sandboxer.sock")),
            ..Self::default()
        }
    }

    /// Parses a TOML configuration file's text; absent keys keep `family`'s defaults.
    pub fn parse(family: &str, text: &str) -> anyhow::Result<Self> {
        let mut config: ShimConfig = toml::from_str(text)?;
        if config.sandboxer_address.as_os_str().is_empty() {
            config.sandboxer_address = Self::defaults(family).sandboxer_address;
        }
        // Checked here, so that `start` names the file rather than a shim failing to start.
        kuasar_sandbox::server::log_filter(&config.log_level)
            .with_context(|| format!("log_level {:?}", config.log_level))?;
        Ok(config)
    }

    /// The configuration named by the runtime options containerd wrote on stdin (the
    /// protobuf encoding of an `Any`), or `family`'s defaults without one.
    pub fn from_runtime_options(family: &str, stdin: &[u8]) -> anyhow::Result<Self> {
        let Some(options) = runtime_options(stdin)? else {
            return Self::from_env(family);
        };
        if !options.config_path.is_empty() {
            let path = PathBuf::from(&options.config_path);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read shim configuration {}", path.display()))?;
            return Self::parse(family, &text)
                .with_context(|| format!("invalid shim configuration {}", path.display()));
        }
        let body = String::from_utf8_lossy(&options.config_body);
        let mut table: toml::Table = body.parse().context("invalid runtime options table")?;
        // The options table also holds CRI's own keys.
        table.retain(|key, _| key == "sandboxer_address" || key == "log_level");
        Self::parse(family, &table.to_string()).context("invalid runtime options table")
    }

    /// The configuration in the file `KUASAR_<FAMILY>_SHIM_CONFIG` names, or `family`'s
    /// defaults.
    pub fn from_env(family: &str) -> anyhow::Result<Self> {
        let variable = config_env(family);
        match std::env::var_os(&variable) {
            Some(path) if !path.is_empty() => {
                let path = PathBuf::from(path);
                let text = std::fs::read_to_string(&path).with_context(|| {
                    format!(
                        "cannot read shim configuration {} ({variable})",
                        path.display()
                    )
                })?;
                Self::parse(family, &text)
                    .with_context(|| format!("invalid shim configuration {}", path.display()))
            }
            _ => Ok(Self::defaults(family)),
        }
    }

    /// Writes the configuration into `bundle`.
    pub fn save(&self, bundle: &Path) -> anyhow::Result<()> {
        let path = bundle.join(BUNDLE_FILE);
        let text = serde_json::to_string(self).expect("the configuration serializes");
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Reads the configuration `start` left in `bundle`.
    pub fn load(bundle: &Path) -> anyhow::Result<Self> {
        let path = bundle.join(BUNDLE_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("invalid {}", path.display()))
    }
}

/// The environment variable naming `family`'s shim configuration file.
pub fn config_env(family: &str) -> String {
    format!("KUASAR_{}_SHIM_CONFIG", family.to_uppercase())
}

/// `runtimeoptions.v1.Options`: CRI's options of a runtime type it does not know.
#[derive(Clone, PartialEq, prost::Message)]
struct RuntimeOptions {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(string, tag = "2")]
    config_path: String,
    #[prost(bytes = "vec", tag = "3")]
    config_body: Vec<u8>,
}

/// The runtime options in `stdin`, when they are CRI's generic ones.
fn runtime_options(stdin: &[u8]) -> anyhow::Result<Option<RuntimeOptions>> {
    if stdin.is_empty() {
        return Ok(None);
    }
    let any = <prost_types::Any as prost::Message>::decode(stdin)
        .context("runtime options on stdin are not a protobuf Any")?;
    if !any.type_url.ends_with(RUNTIME_OPTIONS_TYPE) {
        tracing::debug!(type_url = %any.type_url, "runtime options of another type ignored");
        return Ok(None);
    }
    let options = <RuntimeOptions as prost::Message>::decode(any.value.as_slice())
        .context("invalid runtimeoptions.v1.Options")?;
    Ok(Some(options))
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn defaults_name_the_familys_socket() {
        assert_eq!(
            ShimConfig::defaults("wasm").sandboxer_address,
            PathBuf::from("/run/wasm-sandboxer.sock")
        );
        let err = ShimConfig::parse("vmm", "log_level = \"[[[\"\n").unwrap_err();
        assert!(err.to_string().contains("log_level \"[[[\""), "{err}");
        let config = ShimConfig::parse("vmm", "log_level = \"debug\"\n").unwrap();
        assert_eq!(
            config.sandboxer_address,
            PathBuf::from("/run/vmm-sandboxer.sock")
        );
        assert_eq!(config.log_level, "debug");
        assert!(ShimConfig::parse("vmm", "nope = 1\n").is_err());
    }

    #[test]
    fn reads_the_config_path_of_cris_runtime_options() {
        let dir = std::env::temp_dir().join(format!("kuasar-shim-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("shim.toml");
        std::fs::write(&file, "sandboxer_address = \"/tmp/s.sock\"\n").unwrap();
        let options = RuntimeOptions {
            type_url: String::new(),
            config_path: file.to_string_lossy().into_owned(),
            config_body: Vec::new(),
        };
        let any = prost_types::Any {
            type_url: "type.googleapis.com/runtimeoptions.v1.Options".into(),
            value: options.encode_to_vec(),
        };
        let config = ShimConfig::from_runtime_options("runc", &any.encode_to_vec()).unwrap();
        assert_eq!(config.sandboxer_address, PathBuf::from("/tmp/s.sock"));
        assert_eq!(config_env("quark"), "KUASAR_QUARK_SHIM_CONFIG");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_the_options_table_containerd_2_passes_whole() {
        let options = RuntimeOptions {
            type_url: String::new(),
            config_path: String::new(),
            config_body: b"ConfigPath = \"\"\nsandboxer_address = \"/tmp/q.sock\"\n".to_vec(),
        };
        let any = prost_types::Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: options.encode_to_vec(),
        };
        let config = ShimConfig::from_runtime_options("quark", &any.encode_to_vec()).unwrap();
        assert_eq!(config.sandboxer_address, PathBuf::from("/tmp/q.sock"));
    }
}
