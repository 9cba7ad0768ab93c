//! The command line containerd gives a shim v2 binary, and the family its name selects.
//!
//! containerd runs `<shim> -namespace NS -address ADDR -publish-binary BIN -id ID [-debug]
//! start` (working directory: the bundle, runtime options on stdin) and `<shim> -namespace NS
//! -address ADDR -publish-binary BIN -id ID -bundle DIR [-debug] delete`. Flags follow Go's
//! `flag` package: one or two dashes, the value as the next word or after `=`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The sandbox families a shim binary can forward to.
pub const FAMILIES: [&str; 4] = ["runc", "wasm", "quark", "vmm"];

/// What containerd asks the shim binary to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start (or find) the shim of the container's pod and print its address.
    Start,
    /// Clean up after a shim that is gone and print the container's exit.
    Delete,
    /// Run as the long-lived shim of one pod (started by `start`, never by containerd).
    Serve,
    /// Print the version.
    Version,
    /// Print how containerd runs the binary.
    Help,
}

/// The parsed command line.
#[derive(Debug, Clone)]
pub struct Args {
    /// Sandbox family: from the binary's name `containerd-shim-kuasar-<family>-v2`.
    pub family: String,
    pub action: Action,
    /// containerd namespace of the container.
    pub namespace: String,
    /// containerd's gRPC socket.
    pub address: String,
    /// Container id (for `serve`: the pod's sandbox id).
    pub id: String,
    /// Bundle directory; the working directory when not given.
    pub bundle: Option<PathBuf>,
    pub debug: bool,
}

impl Args {
    /// Parses `argv` (program name first).
    pub fn parse(argv: &[String]) -> anyhow::Result<Self> {
        let program = argv.first().map(String::as_str).unwrap_or_default();
        let mut family = family_of(Path::new(program));
        let mut args = Args {
            family: String::new(),
            action: Action::Version,
            namespace: String::new(),
            address: String::new(),
            id: String::new(),
            bundle: None,
            debug: false,
        };
        let mut action = None;
        let mut words = argv.iter().skip(1);
        while let Some(word) = words.next() {
            let Some(flag) = word.strip_prefix('-') else {
                if action.is_some() {
                    bail!("unexpected argument {word:?}");
                }
                action = Some(match word.as_str() {
                    "start" => Action::Start,
                    "delete" => Action::Delete,
                    "serve" => Action::Serve,
                    other => bail!("unknown action {other:?} (start, delete)"),
                });
                continue;
            };
            let flag = flag.strip_prefix('-').unwrap_or(flag);
            let (name, inline) = match flag.split_once('=') {
                Some((name, value)) => (name, Some(value.to_string())),
                None => (flag, None),
            };
            match name {
                "debug" => args.debug = inline.as_deref() != Some("false"),
                "v" | "version" => action = Some(Action::Version),
                "h" | "help" => action = Some(Action::Help),
                "namespace" | "address" | "publish-binary" | "id" | "bundle" | "socket"
                | "family" => {
                    let value = match inline {
                        Some(value) => value,
                        None => words
                            .next()
                            .cloned()
                            .with_context(|| format!("flag -{name} needs a value"))?,
                    };
                    match name {
                        "namespace" => args.namespace = value,
                        "address" => args.address = value,
                        "id" => args.id = value,
                        "bundle" => args.bundle = Some(PathBuf::from(value)),
                        "family" => family = Some(value),
                        _ => {}
                    }
                }
                other => bail!("unknown flag -{other}"),
            }
        }
        args.action = action.context("no action given (start, delete)")?;
        args.family = family.with_context(|| {
            format!(
                "cannot tell the sandbox family from the binary name {program:?}: expected \
                 containerd-shim-kuasar-<family>-v2 with a family of {FAMILIES:?}, or -family"
            )
        })?;
        if !FAMILIES.contains(&args.family.as_str()) {
            bail!(
                "unknown sandbox family {:?} (one of {FAMILIES:?})",
                args.family
            );
        }
        if matches!(args.action, Action::Start | Action::Delete | Action::Serve) {
            if args.id.is_empty() {
                bail!("flag -id is required");
            }
            if args.namespace.is_empty() {
                args.namespace = std::env::var("NAMESPACE").unwrap_or_default();
            }
            if args.namespace.is_empty() {
                bail!("flag -namespace is required");
            }
        }
        Ok(args)
    }

    /// The bundle directory: `-bundle`, else the working directory containerd started us in.
    pub fn bundle_dir(&self) -> anyhow::Result<PathBuf> {
        match &self.bundle {
            Some(bundle) => Ok(bundle.clone()),
            None => std::env::current_dir().context("cannot read the working directory"),
        }
    }
}

/// The family in a binary name `containerd-shim-kuasar-<family>-v2`.
pub fn family_of(program: &Path) -> Option<String> {
    let name = program.file_name()?.to_str()?;
    let family = name
        .strip_prefix("containerd-shim-kuasar-")?
        .strip_suffix("-v2")?;
    Some(family.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn parses_containerds_start_command() {
        let args = Args::parse(&argv(&[
            "/usr/local/bin/containerd-shim-kuasar-runc-v2",
            "-namespace",
            "k8s.io",
            "-address",
            "/run/containerd/containerd.sock",
            "-publish-binary",
            "/usr/bin/containerd",
            "-id",
            "abc",
            "-debug",
            "start",
        ]))
        .unwrap();
        assert_eq!(args.family, "runc");
        assert_eq!(args.action, Action::Start);
        assert_eq!(args.namespace, "k8s.io");
        assert_eq!(args.address, "/run/containerd/containerd.sock");
        assert_eq!(args.id, "abc");
        assert!(args.debug);
        assert_eq!(args.bundle, None);
    }

    #[test]
    fn parses_delete_with_bundle_and_inline_values() {
        let args = Args::parse(&argv(&[
            "containerd-shim-kuasar-quark-v2",
            "--namespace=default",
            "-id=x",
            "-bundle",
            "/b",
            "delete",
        ]))
        .unwrap();
        assert_eq!(args.family, "quark");
        assert_eq!(args.action, Action::Delete);
        assert_eq!(args.bundle, Some(PathBuf::from("/b")));
    }

    #[test]
    fn family_comes_from_the_name_or_the_flag() {
        assert_eq!(
            family_of(Path::new("/x/containerd-shim-kuasar-vmm-v2")).as_deref(),
            Some("vmm")
        );
        assert_eq!(family_of(Path::new("containerd-shim-runc-v2")), None);
        let help = Args::parse(&argv(&["containerd-shim-kuasar-runc-v2", "-h"])).unwrap();
        assert_eq!(help.action, Action::Help);
        let args = Args::parse(&argv(&["shim", "-family", "wasm", "-v"])).unwrap();
        assert_eq!(args.family, "wasm");
        assert!(Args::parse(&argv(&["shim", "-v"])).is_err());
        assert!(Args::parse(&argv(&["containerd-shim-kuasar-nope-v2", "-v"])).is_err());
    }
}
