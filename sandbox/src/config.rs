//! Configuration every sandboxer shares: where it listens, where it keeps state, how it
//! reaches containerd. A family adds its own section next to these keys.
//!
//! ```toml
//! listen = "/run/runc-sandboxer.sock"
//! state_dir = "/run/kuasar/runc"
//! log_level = "info"
//!
//! [containerd]
//! address = "/run/containerd/containerd.sock"
//! cri_root_dir = "/var/lib/containerd/io.containerd.grpc.v1.cri"
//! cri_state_dir = "/run/containerd/io.containerd.grpc.v1.cri"
//! ```

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// Top-level keys every sandboxer's configuration file may have.
const COMMON_KEYS: [&str; 4] = ["listen", "state_dir", "log_level", "containerd"];

/// Keys every sandboxer's configuration file has, plus the family's own section `F`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config<F> {
    /// Unix socket serving containerd's Sandbox API.
    pub listen: PathBuf,
    /// Directory for per-sandbox state: task sockets, bundles, pod files.
    pub state_dir: PathBuf,
    /// `tracing` filter: a level (`info`) or a directive list (`info,kuasar_sandbox=debug`).
    pub log_level: String,
    /// How to reach containerd.
    pub containerd: ContainerdConfig,
    /// The family's own settings.
    #[serde(flatten)]
    pub family: F,
}

/// Where containerd lives, for events and for the pod files CRI reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContainerdConfig {
    /// containerd's gRPC socket.
    pub address: PathBuf,
    /// containerd's ttrpc socket, where task events are published; `<address>.ttrpc`
    /// when unset.
    pub ttrpc_address: Option<PathBuf>,
    /// CRI's root directory: `/etc/hostname`, `/etc/hosts` and `/etc/resolv.conf` of a
    /// pod are written to `<cri_root_dir>/sandboxes/<id>/`, where CRI mounts them from.
    pub cri_root_dir: PathBuf,
    /// CRI's state directory: a pod's shared `/dev/shm` is mounted at
    /// `<cri_state_dir>/sandboxes/<id>/shm`.
    pub cri_state_dir: PathBuf,
}

impl Default for ContainerdConfig {
    fn default() -> Self {
        Self {
            address: "/run/containerd/containerd.sock".into(),
            ttrpc_address: None,
            cri_root_dir: "/var/lib/containerd/io.containerd.grpc.v1.cri".into(),
            cri_state_dir: "/run/containerd/io.containerd.grpc.v1.cri".into(),
        }
    }
}

impl ContainerdConfig {
    /// The ttrpc socket task events go to.
    pub fn events_address(&self) -> PathBuf {
        match &self.ttrpc_address {
            Some(address) => address.clone(),
            None => {
                let mut address = self.address.clone().into_os_string();
                address.push(".ttrpc");
                address.into()
            }
        }
    }
}

/// The configuration file `family`'s sandboxer reads when none is named.
pub fn default_path(family: &str) -> PathBuf {
    PathBuf::from(format!("/etc/kuasar/{family}-sandboxer.toml"))
}

impl<F: Default> Config<F> {
    /// Defaults of the family named `family`: socket `/run/<family>-sandboxer.sock` and
    /// state under `/run/kuasar/<family>`.
    pub fn defaults(family: &str) -> Self {
        Self {
            listen: format!("/run/{family}-sandboxer.sock").into(),
            state_dir: format!("/run/kuasar/{family}").into(),
            log_level: "info".into(),
            containerd: ContainerdConfig::default(),
            family: F::default(),
        }
    }
}

impl<F: Default> Default for Config<F> {
    fn default() -> Self {
        Self::defaults("runc")
    }
}

impl<F: DeserializeOwned + Default> Config<F> {
    /// Reads the configuration of `family`.
    ///
    /// An explicit `path` must exist; without one, `/etc/kuasar/<family>-sandboxer.toml`
    /// is read when present and the defaults are used otherwise. Keys missing from the
    /// file keep their defaults.
    pub fn load(family: &str, path: Option<&Path>) -> anyhow::Result<Self> {
        let default_path = default_path(family);
        let path = match path {
            Some(path) => path,
            None if default_path.exists() => &default_path,
            None => return Ok(Self::defaults(family)),
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read config file {}", path.display()))?;
        Self::parse(family, &text).with_context(|| format!("parse config file {}", path.display()))
    }

    /// Parses a configuration document, filling gaps with the family's defaults.
    pub fn parse(family: &str, text: &str) -> anyhow::Result<Self> {
        let mut value: toml::Table = toml::from_str(text)?;
        // Family settings are tables of their own, so a plain value under an unknown key
        // can only be a typo of a common key.
        if let Some((key, _)) = value
            .iter()
            .find(|(key, v)| !COMMON_KEYS.contains(&key.as_str()) && !v.is_table())
        {
            bail!("unknown key {key:?} (expected one of {COMMON_KEYS:?} or a section)");
        }
        // The sections are [containerd] and the family's own, named after it.
        if let Some((key, _)) = value
            .iter()
            .find(|(key, v)| v.is_table() && *key != "containerd" && *key != family)
        {
            bail!("unknown section [{key}] (expected [containerd] or [{family}])");
        }
        let defaults = Self::defaults(family);
        for (key, default) in [
            ("listen", defaults.listen.display().to_string()),
            ("state_dir", defaults.state_dir.display().to_string()),
        ] {
            value.entry(key).or_insert(toml::Value::String(default));
        }
        // The family's table is read on its own: through the flattened field, a wrong
        // value would be reported without the key it was under.
        let mut family_table = toml::Table::new();
        if let Some(section) = value.remove(family) {
            family_table.insert(family.to_string(), section);
        }
        let mut config: Self = value.try_into()?;
        config.family = toml::Value::Table(family_table).try_into()?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        for (key, path) in [("listen", &self.listen), ("state_dir", &self.state_dir)] {
            if !path.is_absolute() {
                bail!(
                    "{key} must be an absolute path, got {:?}",
                    path.display().to_string()
                );
            }
            if path
                .components()
                .any(|c| c == std::path::Component::ParentDir)
            {
                bail!(
                    "{key} must not contain '..', got {:?}",
                    path.display().to_string()
                );
            }
            if path.parent().is_none() {
                bail!("{key} must not be the root directory");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize)]
    #[serde(default)]
    struct Family {
        runc: EngineSection,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(default)]
    struct EngineSection {
        binary: String,
    }

    #[test]
    fn empty_file_gives_family_defaults() {
        let config = Config::<Family>::parse("wasm", "").unwrap();
        assert_eq!(config.listen, Path::new("/run/wasm-sandboxer.sock"));
        assert_eq!(config.state_dir, Path::new("/run/kuasar/wasm"));
        assert_eq!(
            config.containerd.events_address(),
            Path::new("/run/containerd/containerd.sock.ttrpc")
        );
    }

    #[test]
    fn reads_common_and_family_keys() {
        let config = Config::<Family>::parse(
            "runc",
            r#"
            listen = "/tmp/x.sock"
            [containerd]
            ttrpc_address = "/tmp/c.ttrpc"
            [runc]
            binary = "/usr/sbin/runc"
            "#,
        )
        .unwrap();
        assert_eq!(config.listen, Path::new("/tmp/x.sock"));
        assert_eq!(config.state_dir, Path::new("/run/kuasar/runc"));
        assert_eq!(
            config.containerd.events_address(),
            Path::new("/tmp/c.ttrpc")
        );
        assert_eq!(config.family.runc.binary, "/usr/sbin/runc");
    }

    #[test]
    fn rejects_relative_and_escaping_paths() {
        let err = Config::<Family>::parse("runc", "state_dir = \"run/x\"").unwrap_err();
        assert!(
            err.to_string()
                .contains("state_dir must be an absolute path"),
            "{err}"
        );
        let err = Config::<Family>::parse("runc", "state_dir = \"/run/../etc\"").unwrap_err();
        assert!(err.to_string().contains("'..'"), "{err}");
        let err = Config::<Family>::parse("runc", "listen = \"/\"").unwrap_err();
        assert!(err.to_string().contains("root directory"), "{err}");
    }

    #[test]
    fn rejects_misspelt_keys() {
        let err = Config::<Family>::parse("runc", "lisen = \"/x.sock\"").unwrap_err();
        assert!(err.to_string().contains("unknown key \"lisen\""), "{err}");
        let err = Config::<()>::parse("quark", "[quarkk]\nnetwork = \"host\"\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("unknown section [quarkk] (expected [containerd] or [quark])"),
            "{err}"
        );
        let err = Config::<Family>::parse("runc", "[containerd]\nadress = \"/x\"").unwrap_err();
        assert!(format!("{err:#}").contains("adress"), "{err:#}");
    }

    #[test]
    fn reports_type_errors() {
        let err = Config::<Family>::parse("runc", "listen = 5").unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
        let err = Config::<Family>::parse("runc", "[runc]\nbinary = 7").unwrap_err();
        let message = format!("{err:#}");
        assert!(
            message.contains("runc") && message.contains("binary"),
            "{message}"
        );
    }
}
