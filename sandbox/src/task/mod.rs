//! The Task API (containerd.task.v3) for the containers of one sandbox.
//!
//! [`TaskService`] keeps the books every family needs (containers, their init and exec
//! processes, exit statuses, waiters, events) and leaves running the processes to a
//! [`ContainerRuntime`].

mod service;

use std::path::PathBuf;

use async_trait::async_trait;
use containerd_shim_protos::protobuf::well_known_types::any::Any;

pub use service::{TaskServer, TaskService};

use crate::error::Result;
use crate::io::{Console, Stdio};
use crate::reaper::ExitReceiver;

/// A pod whose namespaces are held, as a family's pod-wide process needs to know it.
#[derive(Debug, Clone)]
pub struct PodContext {
    /// Sandbox id.
    pub id: String,
    /// Host pid of the pod's namespace holder.
    pub holder_pid: u32,
    /// The network namespace CRI prepared; none for a pod on the host's network.
    pub netns: Option<PathBuf>,
    /// The pod's hostname.
    pub hostname: String,
    /// The pod's cgroup (a cgroupfs path), when it has a cgroup parent.
    pub cgroup_path: Option<String>,
    /// For pods that outlive the sandboxer: the socket of the process that holds
    /// containerd's output FIFOs open while the sandboxer restarts
    /// ([`crate::relay::keep_fifo`]).
    pub fifo_keeper: Option<PathBuf>,
}

/// A container to create, as containerd describes it.
#[derive(Debug, Clone)]
pub struct CreateContainer {
    /// Container id.
    pub id: String,
    /// Host directory holding `config.json`, written by containerd.
    pub bundle: PathBuf,
    /// Mounts that make up the root filesystem, to be mounted at `<bundle>/rootfs`.
    pub rootfs: Vec<Mount>,
    /// Standard IO of the init process.
    pub stdio: Stdio,
}

/// One mount as containerd sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Filesystem type, e.g. `overlay` or `bind`.
    pub fs_type: String,
    /// Mount source.
    pub source: String,
    /// fstab-style options.
    pub options: Vec<String>,
}

/// An additional process to run in a container.
#[derive(Debug, Clone)]
pub struct ExecProcess {
    /// Container id.
    pub container_id: String,
    /// Exec id, unique within the container.
    pub exec_id: String,
    /// The OCI process spec, as JSON.
    pub spec: Vec<u8>,
    /// Standard IO of the process.
    pub stdio: Stdio,
}

/// A process the runtime started.
#[derive(Debug)]
pub struct Spawned {
    /// Host pid of the process.
    pub pid: u32,
    /// Delivers the process's exit.
    pub exit: ExitReceiver,
    /// Its terminal, when it runs on one.
    pub console: Option<Console>,
    /// OOM kills in the container's memory cgroup (init processes only).
    pub oom: Option<crate::oom::OomReceiver>,
}

/// Where a process is in its life, short of its exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Created, waiting to be started.
    Created,
    /// Started.
    Running,
    /// Frozen.
    Paused,
}

/// A container to find again after the sandboxer restarted, as the sandboxer recorded it.
#[derive(Debug, Clone)]
pub struct RecoverContainer {
    /// Container id.
    pub id: String,
    /// Host directory holding its `config.json`.
    pub bundle: PathBuf,
    /// Ids of its exec processes that were started.
    pub execs: Vec<String>,
}

/// A process the runtime found again.
#[derive(Debug)]
pub struct RecoveredProcess {
    /// Its pid, as it was reported when it was created.
    pub pid: u32,
    /// Its state now.
    pub state: RunState,
    /// Delivers its exit (at once if it has exited).
    pub exit: ExitReceiver,
}

/// A container the runtime found again, with the exec processes it still knows.
#[derive(Debug)]
pub struct RecoveredContainer {
    /// The init process.
    pub init: RecoveredProcess,
    /// Exec processes by exec id; those the runtime no longer knows are left out.
    pub execs: Vec<(String, RecoveredProcess)>,
    /// OOM kills from now on.
    pub oom: Option<crate::oom::OomReceiver>,
}

/// Which process of a container a signal is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillTarget {
    /// The init process; with `all`, every process of the container.
    Init {
        /// Signal every process in the container.
        all: bool,
    },
    /// An exec process with this host pid.
    Exec(u32),
}

/// Runs the processes of containers; what differs between sandbox families.
#[async_trait]
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Creates a container whose init process waits to be started.
    async fn create(&self, container: &CreateContainer) -> Result<Spawned>;

    /// Starts the init process of a created container. Returns its terminal when the
    /// runtime sets that up only at start (an application kernel adding a container to a
    /// running sandbox); a terminal from [`ContainerRuntime::create`] stays as it is.
    async fn start(&self, id: &str) -> Result<Option<Console>>;

    /// Starts an additional process in a running container.
    async fn exec(&self, process: &ExecProcess) -> Result<Spawned>;

    /// Sends `signal` to a process of container `id`.
    async fn kill(&self, id: &str, target: KillTarget, signal: u32) -> Result<()>;

    /// Removes a container whose processes have exited, and its root filesystem mount.
    async fn delete(&self, id: &str) -> Result<()>;

    /// Freezes every process of a container.
    async fn pause(&self, id: &str) -> Result<()>;

    /// Thaws a paused container.
    async fn resume(&self, id: &str) -> Result<()>;

    /// Applies new resource limits (`LinuxResources`, as JSON).
    async fn update(&self, id: &str, resources: &[u8]) -> Result<()>;

    /// Resource usage of a container, as containerd's cgroup metrics.
    async fn stats(&self, id: &str) -> Result<Any>;

    /// Host pids of the processes in a container.
    async fn pids(&self, id: &str) -> Result<Vec<u32>>;

    /// Resizes the terminal of process `exec_id` (empty: the init) of container `id`,
    /// for runtimes that keep a process's terminal themselves rather than handing its
    /// [`Console`] over.
    async fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let _ = (exec_id, width, height);
        Err(crate::error::Error::FailedPrecondition(format!(
            "process of container {id:?} has no terminal"
        )))
    }

    /// Starts what the family runs for a whole pod once its namespaces are held (an
    /// application kernel, say), before any container. The receiver, if any, delivers
    /// that process's exit, which ends the pod. Families without one keep this default.
    async fn start_pod(&self, pod: &PodContext) -> Result<Option<ExitReceiver>> {
        let _ = pod;
        Ok(None)
    }

    /// Whether this runtime's pods and containers outlive the sandboxer, so that a
    /// restarted sandboxer finds them again ([`ContainerRuntime::recover_pod`],
    /// [`ContainerRuntime::recover_container`]). Runtimes whose containers are the
    /// sandboxer's children keep the default: their pods are not recorded.
    fn recoverable(&self) -> bool {
        false
    }

    /// Takes over the running pod-wide process of a pod started by an earlier run of the
    /// sandboxer; like [`ContainerRuntime::start_pod`], the receiver delivers its exit.
    async fn recover_pod(&self, pod: &PodContext) -> Result<Option<ExitReceiver>> {
        Err(crate::error::Error::Unimplemented(format!(
            "recovering pod {:?} after a restart",
            pod.id
        )))
    }

    /// Finds a container of a recovered pod again.
    async fn recover_container(&self, container: &RecoverContainer) -> Result<RecoveredContainer> {
        Err(crate::error::Error::Unimplemented(format!(
            "recovering container {:?} after a restart",
            container.id
        )))
    }

    /// Stops what [`ContainerRuntime::start_pod`] started. Called once the pod's
    /// containers are killed, possibly more than once, and for pods whose start failed.
    async fn stop_pod(&self, id: &str) -> Result<()> {
        let _ = id;
        Ok(())
    }
}
