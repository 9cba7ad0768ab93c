//! The application-kernel family's section of the configuration file.
//!
//! ```toml
//! [quark]
//! binary = "runsc"        # the kernel's OCI runtime; looked up in PATH unless absolute
//! platform = "systrap"    # how the kernel intercepts system calls: systrap, ptrace or kvm
//! network = "sandbox"     # "sandbox": the kernel's own network stack on the pod's
//!                         # interfaces; "host": the host kernel's stack, inside the pod's
//!                         # network namespace
//! flags = []              # further global flags, e.g. ["--overlay2=root:memory"]
//! # root = "/run/kuasar/quark/runsc"   # the runtime's --root; <state_dir>/runsc when unset
//! ```

use std::path::PathBuf;

use serde::Deserialize;

/// The ways runsc can intercept an application's system calls (its `--platform`).
const PLATFORMS: [&str; 3] = ["systrap", "ptrace", "kvm"];

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
    /// Whose network stack serves the pod's network namespace.
    pub network: Network,
    /// Further global flags given to every invocation.
    pub flags: Vec<String>,
}

/// Whose network stack serves a pod's network namespace (runsc's `--network`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// The application kernel's own stack on the namespace's interfaces: the pod's
    /// network traffic never reaches the host kernel's socket layer.
    Sandbox,
    /// The host kernel's stack, used from inside the pod's network namespace.
    Host,
}

impl Default for QuarkSection {
    fn default() -> Self {
        Self {
            binary: "runsc".into(),
            root: None,
            platform: "systrap".into(),
            network: Network::Sandbox,
            flags: Vec::new(),
        }
    }
}

impl QuarkSection {
    /// The global flags for every invocation: the platform, then `flags`.
    pub fn global_flags(&self) -> anyhow::Result<Vec<String>> {
        let platform = self.platform.trim();
        if !PLATFORMS.contains(&platform) {
            anyhow::bail!(
                "[quark] platform {:?} is not one of runsc's platforms {PLATFORMS:?}",
                self.platform
            );
        }
        if let Some(flag) = self.flags.iter().find(|f| !f.starts_with("--")) {
            anyhow::bail!("[quark] flags entry {flag:?} is not a flag (flags start with --)");
        }
        let mut flags = vec![format!("--platform={platform}")];
        if self.network == Network::Host {
            flags.push("--network=host".into());
        }
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
    fn host_network_is_a_flag() {
        let section: QuarkSettings = toml::from_str("[quark]\nnetwork = \"host\"\n").unwrap();
        assert_eq!(
            section.quark.global_flags().unwrap(),
            ["--platform=systrap", "--network=host"]
        );
        assert!(toml::from_str::<QuarkSettings>("[quark]\nnetwork = \"none\"\n").is_err());
    }

    #[test]
    fn bad_flags_are_named() {
        let section = QuarkSection {
            flags: vec!["debug".into()],
            ..Default::default()
        };
        let err = section.global_flags().unwrap_err().to_string();
        assert!(err.contains("\"debug\""), "{err}");
        for platform in ["", "bogus"] {
            let section = QuarkSection {
                platform: platform.into(),
                ..Default::default()
            };
            let err = section.global_flags().unwrap_err().to_string();
            assert!(err.contains("systrap"), "{err}");
        }
    }
}
