//! Pods inside an application kernel: one kernel sandbox per pod, every container of the
//! pod added to it.
//!
//! The engine's multi-container model decides the shape. A pod's sandbox starts with a
//! root container whose id is the sandbox id and whose only process is this binary's
//! `pause` command; containerd's containers carry the CRI annotations naming their
//! sandbox, so the engine adds each to that pod's kernel. The root container's file
//! system is an empty directory of the sandboxer's own plus the host's library
//! directories and this binary, read-only: nothing else of the host reaches the kernel.

use std::path::{Path, PathBuf};

use anyhow::Context;
use async_trait::async_trait;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use kuasar_sandbox::error::{Error, Result};
use kuasar_sandbox::io::Console;
use kuasar_sandbox::oci::OciRuntime;
use kuasar_sandbox::reaper::{self, ExitReceiver};
use kuasar_sandbox::task::{
    ContainerRuntime, CreateContainer, ExecProcess, KillTarget, PodContext, Spawned,
};
use serde_json::json;

/// Hidden command running the root container's process.
pub const PAUSE_COMMAND: &str = "pause";

/// Where this binary appears inside the root container.
const PAUSE_PATH: &str = "/pause";

/// Host directories the pause process needs to load (its shared libraries); each is
/// bind-mounted read-only, or recreated as the same symlink where the host has one.
const LIBRARY_DIRS: [&str; 3] = ["/usr", "/lib", "/lib64"];

/// Runs pods in application-kernel sandboxes and their containers inside them.
pub struct QuarkRuntime {
    oci: OciRuntime,
    /// Bundles of the pods' root containers, one directory per sandbox id.
    pods_dir: PathBuf,
    /// This binary, the root containers' process.
    pause_binary: PathBuf,
}

impl QuarkRuntime {
    /// Containers run by `oci`; root container bundles under `pods_dir`.
    pub fn new(oci: OciRuntime, pods_dir: PathBuf) -> anyhow::Result<Self> {
        let pause_binary = std::env::current_exe().context("locate this binary")?;
        std::fs::create_dir_all(&pods_dir)
            .with_context(|| format!("create {}", pods_dir.display()))?;
        Ok(Self {
            oci,
            pods_dir,
            pause_binary,
        })
    }

    /// The root container's bundle of sandbox `id`; ids are validated as path-safe by
    /// the Sandbox API before they get here.
    fn bundle(&self, id: &str) -> PathBuf {
        self.pods_dir.join(id)
    }

    /// Writes the root container's bundle: `config.json` and an empty `rootfs` with the
    /// mount points the spec needs.
    fn write_bundle(&self, pod: &PodContext, bundle: &Path) -> anyhow::Result<()> {
        let rootfs = bundle.join("rootfs");
        std::fs::create_dir_all(&rootfs).with_context(|| format!("create {}", rootfs.display()))?;
        let mut mounts = vec![json!({
            "destination": "/proc",
            "type": "proc",
            "source": "proc",
        })];
        for dir in LIBRARY_DIRS {
            let host = Path::new(dir);
            let inside = rootfs.join(dir.trim_start_matches('/'));
            match std::fs::read_link(host) {
                Ok(target) => std::os::unix::fs::symlink(&target, &inside)
                    .with_context(|| format!("create {}", inside.display()))?,
                Err(_) if host.is_dir() => {
                    std::fs::create_dir_all(&inside)
                        .with_context(|| format!("create {}", inside.display()))?;
                    mounts.push(json!({
                        "destination": dir,
                        "type": "bind",
                        "source": dir,
                        "options": ["rbind", "ro", "nosuid", "nodev"],
                    }));
                }
                Err(_) => {}
            }
        }
        let pause = rootfs.join(PAUSE_PATH.trim_start_matches('/'));
        std::fs::write(&pause, b"").with_context(|| format!("create {}", pause.display()))?;
        mounts.push(json!({
            "destination": PAUSE_PATH,
            "type": "bind",
            "source": self.pause_binary,
            "options": ["bind", "ro", "nosuid", "nodev"],
        }));

        // The kernel puts a container into an existing PID namespace when the path in its
        // spec is that of a container already there. containerd gives the containers of a
        // pod with a pod-wide PID namespace the holder's; the root container claims it, so
        // they join the root's namespace, with the pause process as its PID 1, not the
        // first container's.
        let pid_namespace = format!("/proc/{}/ns/pid", pod.holder_pid);
        let mut namespaces = vec![
            json!({"type": "pid", "path": pid_namespace}),
            json!({"type": "ipc"}),
            json!({"type": "uts"}),
            json!({"type": "mount"}),
        ];
        if let Some(netns) = &pod.netns {
            namespaces.push(json!({"type": "network", "path": netns}));
        }
        let mut linux = json!({ "namespaces": namespaces });
        if let Some(cgroup) = &pod.cgroup_path {
            linux["cgroupsPath"] = json!(cgroup);
        }
        let spec = json!({
            "ociVersion": "1.0.2",
            "hostname": pod.hostname,
            "process": {
                "args": [PAUSE_PATH, PAUSE_COMMAND],
                "cwd": "/",
                "env": ["PATH=/usr/bin:/bin"],
                "user": {"uid": 65534, "gid": 65534},
                "noNewPrivileges": true,
            },
            "root": {"path": "rootfs", "readonly": true},
            "mounts": mounts,
            "annotations": {
                "io.kubernetes.cri.container-type": "sandbox",
                "io.kubernetes.cri.sandbox-id": pod.id,
            },
            "linux": linux,
        });
        let config = bundle.join("config.json");
        std::fs::write(&config, serde_json::to_vec_pretty(&spec)?)
            .with_context(|| format!("write {}", config.display()))
    }

    /// Removes state files runsc left of the containers of sandbox `id` once the sandbox
    /// is deleted: deletes of two containers of one sandbox that overlap can leave the
    /// first one's lock file re-created by the second.
    fn remove_stale_state(&self, id: &str) {
        let root = &self.oci.engine().root;
        let Ok(entries) = std::fs::read_dir(root) else {
            return;
        };
        let marker = format!("_sandbox:{id}.");
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let stale = name.contains(&marker)
                && (name.ends_with(".lock") || name.ends_with(".state"))
                && entry.file_type().is_ok_and(|t| t.is_file());
            if stale {
                tracing::debug!(sandbox_id = %id, file = %name, "removing stale runsc state");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn remove_bundle(&self, id: &str) -> anyhow::Result<()> {
        let bundle = self.bundle(id);
        if bundle.parent() != Some(self.pods_dir.as_path()) {
            anyhow::bail!("refusing to remove {}: not a pod bundle", bundle.display());
        }
        match std::fs::remove_dir_all(&bundle) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                Err(err).with_context(|| format!("remove {}", bundle.display()))
            }
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl ContainerRuntime for QuarkRuntime {
    async fn create(&self, container: &CreateContainer) -> Result<Spawned> {
        self.oci.create(container).await
    }

    async fn start(&self, id: &str) -> Result<Option<Console>> {
        self.oci.start(id).await
    }

    async fn exec(&self, process: &ExecProcess) -> Result<Spawned> {
        self.oci.exec(process).await
    }

    async fn kill(&self, id: &str, target: KillTarget, signal: u32) -> Result<()> {
        self.oci.kill(id, target, signal).await
    }

    async fn delete(&self, id: &str) -> Result<()> {
        self.oci.delete(id).await
    }

    async fn pause(&self, id: &str) -> Result<()> {
        self.oci.pause(id).await
    }

    async fn resume(&self, id: &str) -> Result<()> {
        self.oci.resume(id).await
    }

    async fn update(&self, id: &str, resources: &[u8]) -> Result<()> {
        self.oci.update(id, resources).await
    }

    async fn stats(&self, id: &str) -> Result<Any> {
        self.oci.stats(id).await
    }

    async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        self.oci.pids(id).await
    }

    async fn start_pod(&self, pod: &PodContext) -> Result<Option<ExitReceiver>> {
        let engine = self.oci.engine();
        engine.check_binary().map_err(|err| {
            Error::internal(format!("{err:#} (set [quark] binary in the config)"))
        })?;
        let bundle = self.bundle(&pod.id);
        // A bundle left by a sandboxer that died is stale: the pod is being started anew.
        self.remove_bundle(&pod.id)?;
        self.write_bundle(pod, &bundle)
            .with_context(|| format!("prepare the kernel sandbox of pod {:?}", pod.id))?;
        let flags = if pod.netns.is_none() {
            vec!["--network=host".to_string()]
        } else {
            Vec::new()
        };
        let pid = self
            .oci
            .run_detached(&pod.id, &bundle, &flags)
            .await
            .map_err(explain_root_netns)?;
        tracing::info!(sandbox_id = %pod.id, pid, engine = %engine.name, "application kernel started");
        Ok(Some(reaper::watch(pid)))
    }

    async fn stop_pod(&self, id: &str) -> Result<()> {
        if self.oci.engine().check_binary().is_err() {
            // Without the binary no kernel was started: only the bundle may be left.
            return self.remove_bundle(id).map_err(Error::Internal);
        }
        let deleted = match self.oci.run("delete", id, &["delete", "--force", id]).await {
            Ok(_) | Err(Error::NotFound(_)) => {
                self.remove_stale_state(id);
                Ok(())
            }
            Err(err) => Err(err),
        };
        // The bundle goes whatever the engine said: a kernel that never started leaves
        // nothing else, and a retried pod gets a new id.
        self.remove_bundle(id).map_err(Error::Internal)?;
        deleted
    }
}

/// What runsc says when it believes the pod's network namespace is the host's.
const ROOT_NETNS_MESSAGE: &str = "cannot run with network enabled in root network namespace";

/// Adds the likely cause to runsc's root-network-namespace refusal: runsc releases before
/// August 2024 take any namespace for the host's on Linux 6.11 and later.
fn explain_root_netns(err: Error) -> Error {
    match err {
        Error::Internal(cause) if format!("{cause:#}").contains(ROOT_NETNS_MESSAGE) => {
            Error::Internal(cause.context(
                "the application kernel refused the pod's network namespace: runsc releases \
                 before 2024-08 mistake every network namespace for the host's on Linux 6.11 \
                 and later; use a newer runsc or set [quark] network = \"host\"",
            ))
        }
        other => other,
    }
}

/// The root container's process: sleeps until the kernel ends it.
pub fn pause() -> ! {
    loop {
        nix::unistd::pause();
    }
}
