//! The hypervisor behind a small interface: start a VM from a [`VmSpec`], learn when its
//! guest is ready or has failed, stop it, wait for it, reach its hybrid vsock. QEMU
//! implements it here; another VMM (Cloud Hypervisor, Firecracker, StratoVirt) implements
//! the same trait and nothing else changes.

pub mod qemu;
mod qmp;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// How the guest's CPU is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// Software emulation (QEMU's TCG): slow, but runs anywhere.
    Tcg,
    /// KVM when a real guest boots with it, otherwise TCG with a warning.
    Auto,
}

/// A directory of the host shared into the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// The tag the guest mounts it by.
    pub tag: String,
    /// The host directory.
    pub path: PathBuf,
}

/// The VM's vsock device, served on the host as hybrid vsock: one unix socket through
/// which the host reaches guest ports, and a unix socket per host port the guest
/// connects to (see [`crate::vsock`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockSpec {
    /// The guest's context id (CID), its vsock address.
    pub guest_cid: u32,
    /// The program serving the device on the host; for QEMU, `vhost-device-vsock`.
    pub backend: PathBuf,
}

impl VsockSpec {
    /// The CID a guest gets unless told otherwise: the first one not reserved (0 for the
    /// hypervisor, 1 for local loopback, 2 for the host).
    pub const DEFAULT_GUEST_CID: u32 = 3;

    /// A vsock device with the default guest CID, served by the program `backend`.
    pub fn new(backend: PathBuf) -> Self {
        Self {
            guest_cid: Self::DEFAULT_GUEST_CID,
            backend,
        }
    }
}

/// The VM's network card: a tap device in the pod's network namespace, which the
/// hypervisor runs in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    /// The pod's network namespace (a path such as `/var/run/netns/cni-…`).
    pub netns: PathBuf,
    /// Name of the tap device the hypervisor creates there.
    pub tap: String,
    /// The card's MAC address as the guest sees it.
    pub mac: String,
}

/// What a VM is made of.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSpec {
    /// Names the VM in messages and on the hypervisor's command line.
    pub id: String,
    /// Uncompressed guest kernel.
    pub kernel: PathBuf,
    /// Initial ramdisk holding the guest agent.
    pub initrd: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Number of virtual CPUs.
    pub vcpus: u32,
    /// Hardware virtualisation or emulation; [`Accelerator::Auto`] is resolved before a
    /// VM starts.
    pub accelerator: Accelerator,
    /// Directory for the VM's sockets, pid file and console log; created by the caller.
    pub run_dir: PathBuf,
    /// Directories shared into the guest.
    pub shares: Vec<Share>,
    /// The vsock device, if the VM has one.
    pub vsock: Option<VsockSpec>,
    /// The network card, if the VM has one.
    pub network: Option<NetworkSpec>,
}

/// Why a guest never became ready.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The hypervisor process ended.
    #[error(
        "the hypervisor of VM {id:?} exited with code {code} before its guest was ready: {output}"
    )]
    Exited {
        /// The VM.
        id: String,
        /// Its exit code (128 + signal when killed).
        code: i32,
        /// The end of its output.
        output: String,
    },
    /// The VM stopped running: a KVM internal error, a guest panic, a shutdown.
    #[error("VM {id:?} stopped before its guest was ready: hypervisor status {status:?}")]
    Stopped {
        /// The VM.
        id: String,
        /// The hypervisor's run state.
        status: String,
    },
    /// Neither ready nor failed within the boot timeout.
    #[error(
        "the guest of VM {id:?} was not ready within {timeout:?} (hypervisor status {status:?}): {output}"
    )]
    TimedOut {
        /// The VM.
        id: String,
        /// The boot timeout.
        timeout: Duration,
        /// The hypervisor's run state at the timeout.
        status: String,
        /// The end of the hypervisor's output and of the guest console.
        output: String,
    },
    /// Talking to the hypervisor failed.
    #[error("VM {id:?}: {source:#}")]
    Control {
        /// The VM.
        id: String,
        /// What failed.
        source: anyhow::Error,
    },
}

/// A probe that resolves once the guest answers (the guest agent's health check).
pub type ReadyProbe<'a> = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>>;

/// A running (or starting) virtual machine.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Starts the VM; returns once the hypervisor runs, not once the guest has booted.
    async fn start(&mut self) -> anyhow::Result<()>;

    /// Waits until `ready` resolves, watching the VM meanwhile: a hypervisor that exits,
    /// a VM that stops running or a guest not ready within `timeout` is an error, and the
    /// VM is then stopped, so that nothing of it is left behind.
    async fn wait_ready(
        &mut self,
        ready: ReadyProbe<'_>,
        timeout: Duration,
    ) -> Result<(), BootError>;

    /// The host-side address of the guest agent's channel.
    fn agent_address(&self) -> PathBuf;

    /// Host pid of the hypervisor process, once started.
    fn pid(&self) -> Option<u32>;

    /// Host pids of the processes the VM runs besides the hypervisor (device backends
    /// such as the vsock's), from its start until it is stopped.
    fn helper_pids(&self) -> Vec<u32> {
        Vec::new()
    }

    /// The host side of the VM's hybrid vsock, when it has a vsock device: the unix
    /// socket through which [`crate::vsock::connect`] reaches a guest port. A guest's
    /// connection to host port P arrives at [`crate::vsock::listener_path`] of it.
    fn vsock_uds(&self) -> Option<PathBuf> {
        None
    }

    /// Stops the VM: asks the hypervisor to quit, kills it after `grace`, and waits for
    /// its exit; then ends the VM's helper processes.
    async fn stop(&mut self, grace: Duration) -> anyhow::Result<()>;

    /// Waits for the hypervisor to exit and returns its exit code; the VM's helper
    /// processes are ended then too.
    async fn wait(&mut self) -> anyhow::Result<i32>;
}
