//! containerd 1.6 and 1.7's default pod-sandbox mode: CRI runs every pod as a pause
//! container, so the pod's sandbox is described by that container's OCI spec alone.
//!
//! This module reads the spec back into the `PodSandboxConfig` a sandboxer expects from
//! the Sandbox API: CRI's annotations carry the pod's name, namespace, uid and log
//! directory, the spec its hostname, namespaces, cgroup parent and sysctls.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use k8s_cri::v1::{
    DnsConfig, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata,
};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

/// CRI's annotation of the kind of container: `sandbox` for a pod's pause container.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI's annotation naming the pod's sandbox id, on the pause container and every other.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
const SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
const SANDBOX_LOG_DIRECTORY: &str = "io.kubernetes.cri.sandbox-log-directory";

/// Type URL of the pod configuration in the Sandbox API's create options.
pub const POD_CONFIG_TYPE_URL: &str = "type.googleapis.com/runtime.v1.PodSandboxConfig";

/// The OCI spec containerd wrote into `bundle`.
pub fn read_spec(bundle: &Path) -> anyhow::Result<Spec> {
    let path = bundle.join("config.json");
    Spec::load(&path).with_context(|| format!("cannot read {}", path.display()))
}

/// The annotations of the spec in `bundle`, empty when it has none (or no spec).
pub fn annotations(bundle: &Path) -> HashMap<String, String> {
    read_spec(bundle)
        .ok()
        .and_then(|spec| spec.annotations().clone())
        .unwrap_or_default()
}

/// Whether `annotations` are those of a pod's pause container.
pub fn is_pause(annotations: &HashMap<String, String>) -> bool {
    annotations.get(CONTAINER_TYPE).map(String::as_str) == Some("sandbox")
}

/// The pod a pause container's spec stands for, and its network namespace path (empty for a
/// pod on the host's network).
pub fn pod_of(sandbox_id: &str, spec: &Spec) -> (PodSandboxConfig, String) {
    let annotations = spec.annotations().clone().unwrap_or_default();
    let get = |key: &str| annotations.get(key).cloned().unwrap_or_default();
    let linux = spec.linux().as_ref();
    let namespaces = linux
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    let namespace = |kind: LinuxNamespaceType| namespaces.iter().find(|n| n.typ() == kind);

    let netns_path = namespace(LinuxNamespaceType::Network)
        .and_then(|n| n.path().as_ref())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mode = |kind: LinuxNamespaceType| match namespace(kind) {
        Some(_) => NamespaceMode::Pod as i32,
        None => NamespaceMode::Node as i32,
    };
    let namespace_options = NamespaceOption {
        network: mode(LinuxNamespaceType::Network),
        pid: mode(LinuxNamespaceType::Pid),
        ipc: mode(LinuxNamespaceType::Ipc),
        ..Default::default()
    };
    // CRI puts the pause container at `<cgroup parent>/<sandbox id>` (cgroupfs).
    let cgroup_parent = linux
        .and_then(|l| l.cgroups_path().as_ref())
        .and_then(|p| {
            let p = p.to_string_lossy().into_owned();
            p.strip_suffix(&format!("/{sandbox_id}"))
                .map(str::to_string)
        })
        .unwrap_or_default();
    let sysctls = linux.and_then(|l| l.sysctl().clone()).unwrap_or_default();

    let dns_config = dns_of(spec);
    let config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: get(SANDBOX_NAME),
            uid: get(SANDBOX_UID),
            namespace: get(SANDBOX_NAMESPACE),
            attempt: 0,
        }),
        hostname: spec.hostname().clone().unwrap_or_default(),
        log_directory: get(SANDBOX_LOG_DIRECTORY),
        dns_config,
        annotations: annotations.clone(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent,
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(namespace_options),
                ..Default::default()
            }),
            sysctls,
            ..Default::default()
        }),
        ..Default::default()
    };
    (config, netns_path)
}

/// The pod's DNS settings, read back from the `resolv.conf` CRI wrote for the pod and
/// mounts into the pause container; none when CRI copied the host's (the pod has none).
fn dns_of(spec: &Spec) -> Option<DnsConfig> {
    let source = spec
        .mounts()
        .as_ref()?
        .iter()
        .find(|m| m.destination() == Path::new("/etc/resolv.conf"))?
        .source()
        .clone()?;
    let text = std::fs::read_to_string(source).ok()?;
    if std::fs::read_to_string("/etc/resolv.conf").is_ok_and(|host| host == text) {
        return None;
    }
    Some(parse_resolv_conf(&text))
}

/// The servers, search domains and options of a `resolv.conf`.
fn parse_resolv_conf(text: &str) -> DnsConfig {
    let mut dns = DnsConfig::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let list = match words.next() {
            Some("nameserver") => &mut dns.servers,
            Some("search") => &mut dns.searches,
            Some("options") => &mut dns.options,
            _ => continue,
        };
        list.extend(words.map(str::to_string));
    }
    dns
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAUSE_SPEC: &str = r#"{
        "ociVersion": "1.0.2",
        "hostname": "web-0",
        "process": {"cwd": "/", "args": ["/pause"], "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
        "annotations": {
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-id": "abc",
            "io.kubernetes.cri.sandbox-name": "web-0",
            "io.kubernetes.cri.sandbox-namespace": "default",
            "io.kubernetes.cri.sandbox-uid": "u-1",
            "io.kubernetes.cri.sandbox-log-directory": "/var/log/pods/x"
        },
        "linux": {
            "cgroupsPath": "/kubepods/abc",
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "network", "path": "/var/run/netns/cni-1"}
            ]
        }
    }"#;

    #[test]
    fn reads_the_pod_back_from_the_pause_spec() {
        let spec: Spec = serde_json::from_str(PAUSE_SPEC).unwrap();
        assert!(is_pause(&spec.annotations().clone().unwrap()));
        let (pod, netns) = pod_of("abc", &spec);
        assert_eq!(netns, "/var/run/netns/cni-1");
        assert_eq!(pod.hostname, "web-0");
        assert_eq!(pod.log_directory, "/var/log/pods/x");
        let metadata = pod.metadata.unwrap();
        assert_eq!(
            (
                metadata.name.as_str(),
                metadata.namespace.as_str(),
                metadata.uid.as_str()
            ),
            ("web-0", "default", "u-1")
        );
        let linux = pod.linux.unwrap();
        assert_eq!(linux.cgroup_parent, "/kubepods");
        let options = linux.security_context.unwrap().namespace_options.unwrap();
        assert_eq!(options.network, NamespaceMode::Pod as i32);
        assert_eq!(options.pid, NamespaceMode::Pod as i32);
    }

    #[test]
    fn reads_the_dns_settings_of_cris_resolv_conf() {
        let dns = parse_resolv_conf(
            "search default.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\n\
             nameserver 10.96.0.11\noptions ndots:5\n",
        );
        assert_eq!(
            dns.searches,
            ["default.svc.cluster.local", "svc.cluster.local"]
        );
        assert_eq!(dns.servers, ["10.96.0.10", "10.96.0.11"]);
        assert_eq!(dns.options, ["ndots:5"]);
    }

    #[test]
    fn a_pause_spec_without_a_network_namespace_is_a_host_network_pod() {
        let mut spec: Spec = serde_json::from_str(PAUSE_SPEC).unwrap();
        let mut linux = spec.linux().clone().unwrap();
        let namespaces: Vec<_> = linux
            .namespaces()
            .clone()
            .unwrap()
            .into_iter()
            .filter(|n| n.typ() != LinuxNamespaceType::Network)
            .collect();
        linux.set_namespaces(Some(namespaces));
        spec.set_linux(Some(linux));
        let (pod, netns) = pod_of("abc", &spec);
        assert!(netns.is_empty());
        let options = pod
            .linux
            .unwrap()
            .security_context
            .unwrap()
            .namespace_options
            .unwrap();
        assert_eq!(options.network, NamespaceMode::Node as i32);
    }
}
