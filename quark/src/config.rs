//! The application-kernel family's section of the configuration file.
//!
//! ```toml
//! [quark]
//! binary = "runsc"        # the kernel's OCI runtime; looked up in PATH unless absolute
//! platform = "systrap"    # how the kernel intercepts system calls: systrap or ptrace
//! flags = []              # further global flags, e.g. ["--overlay2=root:memory"]
//! # root = "/run/kuasar/quark/runsc"   # the runtime's --root; <state_dir>/runsc when unset
//! ```

use std::path::PathBuf;

use serde::Deserialize;

/// Settings of the application-kernel family.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct QuarkSettings {
    /// How to run the application kernel.
    pub quark: QuarkSection,
}

/// The `[quark]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuarkSection {
    /// The kernel's OCI runtime binary (runsc's command line).
    pub binary: PathBuf,
    /// Its state directory (`--root`).
    pub root: Option<PathBuf>,
    /// Its `--platform`.
    pub platform: String,
    /// Further global flags given to every invocation.
    pub flags: Vec<String>,
}

impl Default for QuarkSection {
    fn default() -> Self {
        Self {
            binary: "runsc".into(),
            root: None,
            platform: "systrap".into(),
            flags: Vec::new(),
        }
    }
}

impl QuarkSection {
    /// The global flags for every invocation: the platform, then `flags`.
    pub fn global_flags(&self) -> anyhow::Result<Vec<String>> {
        let platform = self.platform.trim();
        if platform.is_empty() || platform.contains(char::is_whitespace) {
            anyhow::bail!(
                "[quark] platform {:?} is not a platform name",
                self.platform
            );
        }
        if let Some(flag) = self.flags.iter().find(|f| !f.starts_with("--")) {
            anyhow::bail!("[quark] flags entry {flag:?} is not a flag (flags start with --)");
        }
        let mut flags = vec![format!("--platform={platform}")];
        flags.extend(self.flags.iter().cloned());
        Ok(flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_comes_first() {
        let section = QuarkSection {
            flags: vec!["--overlay2=root:memory".into()],
            ..Default::default()
        };
        assert_eq!(
            section.global_flags().unwrap(),
            ["--platform=systrap", "--overlay2=root:memory"]
        );
    }

    #[test]
    fn bad_flags_are_named() {
        let section = QuarkSection {
            flags: vec!["debug".into()],
            ..Default::default()
        };
        let err = section.global_flags().unwrap_err().to_string();
        assert!(err.contains("\"debug\""), "{err}");
        let section = QuarkSection {
            platform: "".into(),
            ..Default::default()
        };
        assert!(section.global_flags().is_err());
    }
}
