//! The parts of a Kubernetes pod that a sandboxer provides on the host, whatever the
//! family: the files CRI mounts into every container (`/etc/hostname`, `/etc/hosts`,
//! `/etc/resolv.conf`), the pod's shared `/dev/shm`, and the namespaces it asks for.

use std::path::{Path, PathBuf};

use anyhow::Context;
use k8s_cri::v1::{NamespaceMode, PodSandboxConfig};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Size of a pod's shared `/dev/shm`, as containerd gives its own pods.
const SHM_SIZE: &str = "size=65536k";

/// Which namespaces a pod gets of its own, from its CRI security context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodNamespaces {
    /// The pod shares the host's network (and so its UTS namespace).
    pub host_network: bool,
    /// The pod shares the host's IPC namespace.
    pub host_ipc: bool,
    /// All containers of the pod share one PID namespace.
    pub shared_pid: bool,
    /// The pod shares the host's PID namespace.
    pub host_pid: bool,
}

impl PodNamespaces {
    /// Reads the namespace options of `config`; a missing config means private ones.
    pub fn of(config: Option<&PodSandboxConfig>) -> Self {
        let options = config
            .and_then(|c| c.linux.as_ref())
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.as_ref());
        // Absent options mean CRI's defaults: every namespace at pod level.
        let options = options.cloned().unwrap_or_default();
        let mode = |m: i32| NamespaceMode::try_from(m).unwrap_or(NamespaceMode::Pod);
        Self {
            host_network: mode(options.network) == NamespaceMode::Node,
            host_ipc: mode(options.ipc) == NamespaceMode::Node,
            shared_pid: mode(options.pid) == NamespaceMode::Pod,
            host_pid: mode(options.pid) == NamespaceMode::Node,
        }
    }
}

/// The host-side files of one pod, where CRI looks for them.
#[derive(Debug, Clone)]
pub struct PodFiles {
    /// `<cri_root_dir>/sandboxes/<id>`: hostname, hosts, resolv.conf.
    pub root: PathBuf,
    /// `<cri_state_dir>/sandboxes/<id>`: the shm mount point's parent.
    pub state: PathBuf,
}

impl PodFiles {
    /// Locates the files of sandbox `id` (a validated id) under CRI's directories.
    pub fn new(cri_root_dir: &Path, cri_state_dir: &Path, id: &str) -> Self {
        Self {
            root: cri_root_dir.join("sandboxes").join(id),
            state: cri_state_dir.join("sandboxes").join(id),
        }
    }

    /// Path of the pod's shared `/dev/shm`.
    pub fn shm(&self) -> PathBuf {
        self.state.join("shm")
    }

    /// Writes hostname, hosts and resolv.conf, and mounts the pod's `/dev/shm` unless the
    /// pod uses the host's IPC namespace.
    pub fn create(&self, config: Option<&PodSandboxConfig>, hostname: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("create {}", self.root.display()))?;
        write(&self.root.join("hostname"), &format!("{hostname}\n"))?;
        write(&self.root.join("hosts"), &hosts_file(hostname))?;
        write(&self.root.join("resolv.conf"), &resolv_conf(config)?)?;

        if !PodNamespaces::of(config).host_ipc {
            let shm = self.shm();
            std::fs::create_dir_all(&shm).with_context(|| format!("create {}", shm.display()))?;
            mount(
                Some("shm"),
                &shm,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some(format!("mode=1777,{SHM_SIZE}").as_str()),
            )
            .with_context(|| format!("mount pod shm at {}", shm.display()))?;
        }
        Ok(())
    }

    /// Unmounts the shm and removes both directories; safe to call twice.
    pub fn remove(&self) -> anyhow::Result<()> {
        let shm = self.shm();
        // Every mount stacked there goes: in pod-sandbox mode CRI mounts its own shm at the
        // same place, and may not have unmounted it yet when a lost shim's clean-up ends
        // the pod.
        for _ in 0..MAX_STACKED_MOUNTS {
            if !shm.exists() {
                break;
            }
            match umount2(&shm, MntFlags::MNT_DETACH) {
                Ok(()) => {}
                Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => break,
                Err(err) => return Err(err).with_context(|| format!("unmount {}", shm.display())),
            }
        }
        for dir in [&self.state, &self.root] {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(err).with_context(|| format!("remove {}", dir.display())),
            }
        }
        Ok(())
    }
}

/// More shm mounts on one pod than there are parties that mount one (CRI and us).
const MAX_STACKED_MOUNTS: usize = 4;

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

fn hosts_file(hostname: &str) -> String {
    let mut hosts = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\n\
         fe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    if !hostname.is_empty() {
        hosts.push_str(&format!("127.0.1.1\t{hostname}\n"));
    }
    hosts
}

/// The pod's resolv.conf: its DNS config, or the host's file when it has none.
fn resolv_conf(config: Option<&PodSandboxConfig>) -> anyhow::Result<String> {
    let Some(dns) = config.and_then(|c| c.dns_config.as_ref()) else {
        return match std::fs::read_to_string("/etc/resolv.conf") {
            Ok(text) => Ok(text),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(err) => Err(err).context("read the host's /etc/resolv.conf"),
        };
    };
    let mut text = String::new();
    if !dns.searches.is_empty() {
        text.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    for server in &dns.servers {
        text.push_str(&format!("nameserver {server}\n"));
    }
    if !dns.options.is_empty() {
        text.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::{
        DnsConfig, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceOption,
    };

    #[test]
    fn resolv_conf_follows_the_pod_dns_config() {
        let config = PodSandboxConfig {
            dns_config: Some(DnsConfig {
                servers: vec!["10.96.0.10".into()],
                searches: vec![
                    "default.svc.cluster.local".into(),
                    "svc.cluster.local".into(),
                ],
                options: vec!["ndots:5".into()],
            }),
            ..Default::default()
        };
        assert_eq!(
            resolv_conf(Some(&config)).unwrap(),
            "search default.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
        );
    }

    #[test]
    fn namespace_modes_come_from_the_security_context() {
        let config = PodSandboxConfig {
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Node as i32,
                        pid: NamespaceMode::Pod as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let ns = PodNamespaces::of(Some(&config));
        assert!(ns.host_network && ns.shared_pid && !ns.host_ipc && !ns.host_pid);
        assert_eq!(
            PodNamespaces::of(None),
            PodNamespaces {
                host_network: false,
                host_ipc: false,
                shared_pid: true,
                host_pid: false
            }
        );
    }

    #[test]
    fn hosts_name_the_pod() {
        assert!(hosts_file("web-0").ends_with("127.0.1.1\tweb-0\n"));
        assert!(hosts_file("").starts_with("127.0.0.1\tlocalhost\n"));
    }
}
