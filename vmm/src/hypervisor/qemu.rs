//! QEMU as the hypervisor: the `microvm` machine with virtio-mmio devices, the guest
//! agent's channel on a virtio-serial port backed by a unix socket, host directories
//! shared over 9p, hybrid vsock through a `vhost-device-vsock` process, and QMP for run
//! state and shutdown.
//!
//! The vsock device is a vhost-user device: QEMU hands its queues and the guest's memory
//! (hence a shared memfd memory backend) to `vhost-device-vsock`, which QEMU reaches on
//! [`VHOST_VSOCK_SOCKET`] and which serves the host side on [`VSOCK_SOCKET`] (see
//! [`crate::vsock`]). That process is started before QEMU and ended after it.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use kuasar_sandbox::process::ProcessId;
use kuasar_sandbox::reaper::{self, ExitReceiver};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::qmp::Qmp;
use super::{Accelerator, BootError, Hypervisor, ReadyProbe, VmSpec, VsockSpec};

/// Name of the guest agent's virtio-serial port.
pub const AGENT_PORT: &str = "agent.0";

/// The vhost-user socket between QEMU and `vhost-device-vsock`, in the VM's run directory.
pub const VHOST_VSOCK_SOCKET: &str = "vhost-vsock.sock";

/// The host side of the hybrid vsock, in the VM's run directory.
pub const VSOCK_SOCKET: &str = "vsock.sock";

/// The id of the guest memory backend, which vhost-user devices need shared.
const MEMORY_ID: &str = "mem";

/// The id of the vhost-user chardev of the vsock device.
const VSOCK_CHARDEV: &str = "vsock";

/// QEMU's id of the network card's backend.
const NET_ID: &str = "net0";

/// Where `vhost-device-vsock`'s output goes, in the VM's run directory.
const VSOCK_LOG: &str = "vhost-vsock.log";

/// How long `vhost-device-vsock` may take to create its sockets.
const VSOCK_START_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a starting `vhost-device-vsock` is checked.
const VSOCK_START_INTERVAL: Duration = Duration::from_millis(10);

/// How long `vhost-device-vsock` may take to exit on SIGTERM before it is killed.
const HELPER_GRACE: Duration = Duration::from_secs(1);

/// How long a process may take to be reaped after SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// How often the VM's run state is checked while its guest boots.
const STATUS_INTERVAL: Duration = Duration::from_millis(200);

/// Run states in which a guest can never become ready: the VM stopped running.
const FAILED_STATES: [&str; 6] = [
    "internal-error",
    "guest-panicked",
    "shutdown",
    "io-error",
    "paused",
    "watchdog",
];

/// How long a QEMU whose guest channel broke may take to exit.
const EXIT_GRACE: Duration = Duration::from_millis(500);

/// How much of a log an error quotes.
const CONSOLE_TAIL: usize = 2000;

/// A VM run by a QEMU process, with a `vhost-device-vsock` process beside it when the VM
/// has a vsock device.
pub struct Qemu {
    spec: VmSpec,
    binary: PathBuf,
    qemu: Option<Process>,
    vsock: Option<Process>,
}

/// A process of the VM: a child whose exit the sandboxer's reaper delivers, or one
/// started by an earlier run of the sandboxer, found again by its recorded identity.
struct Process {
    pid: u32,
    exit: Option<ExitReceiver>,
    code: Option<i32>,
    /// Set for an adopted process: its pid is signalled only while it is still the one
    /// recorded.
    adopted: Option<ProcessId>,
}

impl Process {
    /// Starts `command` as a watched child.
    ///
    /// Like every child of the sandboxer it stays in the sandboxer's process group and
    /// session: it outlives the sandboxer's own exit, and is ended by the VM's stop.
    fn spawn(command: &mut Command) -> std::io::Result<Self> {
        let (child, exit) = reaper::spawn(command)?;
        Ok(Self {
            pid: child.id(),
            exit: Some(exit),
            code: None,
            adopted: None,
        })
    }

    /// Takes over a process a former run of the sandboxer started.
    fn adopt(id: ProcessId) -> anyhow::Result<Self> {
        if !id.is_alive() {
            anyhow::bail!("process {} has ended", id.pid);
        }
        Ok(Self {
            pid: id.pid,
            exit: Some(kuasar_sandbox::process::watch_end(id.pid)?),
            code: None,
            adopted: Some(id),
        })
    }

    /// Waits for the process's exit, at most `limit`; `None` on timeout.
    async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        if let Some(code) = self.code {
            return Some(code);
        }
        let exit = self.exit.as_mut()?;
        let code = match tokio::time::timeout(limit, exit).await {
            Ok(Ok(status)) => status.code,
            Ok(Err(_)) => 255,
            Err(_) => return None,
        };
        self.exit = None;
        self.code = Some(code);
        Some(code)
    }

    /// Sends `signal` unless the process has been reaped (so its pid cannot belong to
    /// another process yet).
    fn signal(&self, signal: Signal) {
        if self.code.is_some() {
            return;
        }
        match self.adopted {
            Some(id) => id.signal(signal),
            None => {
                let _ = kill(Pid::from_raw(self.pid as i32), signal);
            }
        }
    }

    /// Kills the process with SIGKILL and waits until it is reaped.
    async fn kill(&mut self) -> Option<i32> {
        self.signal(Signal::SIGKILL);
        self.wait_exit(KILL_GRACE).await
    }
}

impl Qemu {
    /// A VM of `spec` to be run by the QEMU binary `binary`.
    pub fn new(spec: VmSpec, binary: PathBuf) -> Self {
        Self {
            spec,
            binary,
            qemu: None,
            vsock: None,
        }
    }

    /// A VM started by an earlier run of the sandboxer from `spec`, whose QEMU and vsock
    /// backend still run as recorded.
    pub fn adopt(
        spec: VmSpec,
        binary: PathBuf,
        qemu: ProcessId,
        vsock: Option<ProcessId>,
    ) -> anyhow::Result<Self> {
        let id = spec.id.clone();
        let qemu = Process::adopt(qemu).with_context(|| format!("QEMU of VM {id:?}"))?;
        let vsock = vsock
            .map(Process::adopt)
            .transpose()
            .with_context(|| format!("vsock backend of VM {id:?}"))?;
        Ok(Self {
            spec,
            binary,
            qemu: Some(qemu),
            vsock,
        })
    }

    /// What to record to find this VM again: its spec, QEMU and the vsock backend.
    pub fn record(&self) -> anyhow::Result<(VmSpec, ProcessId, Option<ProcessId>)> {
        let qemu = self.qemu.as_ref().context("QEMU was never started")?;
        let vsock = self
            .vsock
            .as_ref()
            .map(|vsock| ProcessId::of(vsock.pid))
            .transpose()?;
        Ok((self.spec.clone(), ProcessId::of(qemu.pid)?, vsock))
    }

    fn qmp_socket(&self) -> PathBuf {
        self.spec.run_dir.join("qmp.sock")
    }

    fn console_log(&self) -> PathBuf {
        self.spec.run_dir.join("console.log")
    }

    fn qemu_log(&self) -> PathBuf {
        self.spec.run_dir.join("qemu.log")
    }

    fn vsock_log(&self) -> PathBuf {
        self.spec.run_dir.join(VSOCK_LOG)
    }

    /// The sockets `vhost-device-vsock` creates: QEMU's, then the host side's.
    fn vsock_sockets(&self) -> [PathBuf; 2] {
        [
            self.spec.run_dir.join(VHOST_VSOCK_SOCKET),
            self.spec.run_dir.join(VSOCK_SOCKET),
        ]
    }

    /// What QEMU, the guest's console and the vsock backend said last, for an error
    /// message.
    fn output_tail(&self) -> String {
        [self.qemu_log(), self.console_log(), self.vsock_log()]
            .iter()
            .map(|path| read_tail(path))
            .filter(|text| !text.is_empty())
            .collect::<Vec<_>>()
            .join(" | ")
    }

    /// Waits for the exit of a started QEMU, at most `limit`; `None` on timeout or when
    /// QEMU was never started.
    async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        self.qemu.as_mut()?.wait_exit(limit).await
    }

    /// Starts `vhost-device-vsock` for `vsock` and waits until it serves both sockets;
    /// one that fails to is ended before the error is returned.
    async fn start_vsock(&mut self, vsock: &VsockSpec) -> anyhow::Result<()> {
        let sockets = self.vsock_sockets();
        for socket in &sockets {
            remove_if_present(socket)?;
        }
        let log_path = self.vsock_log();
        let log =
            File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
        let mut command = Command::new(&vsock.backend);
        command
            .args(vsock_command_line(&self.spec.run_dir, vsock))
            // Its log level follows RUST_LOG, which is meant for the sandboxer: unset, it
            // logs errors only.
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .context("duplicate the vsock backend's log")?,
            )
            .stderr(log);
        let process = Process::spawn(&mut command)
            .with_context(|| format!("start {}", vsock.backend.display()))?;
        let pid = process.pid;
        self.vsock = Some(process);

        if let Err(err) = self.wait_vsock_sockets(vsock, &sockets).await {
            if let Err(stop) = self.stop_vsock().await {
                tracing::warn!(vm = %self.spec.id, error = format!("{stop:#}"), "cannot end a vsock backend that failed to start");
            }
            return Err(err);
        }
        tracing::info!(vm = %self.spec.id, pid, guest_cid = vsock.guest_cid, "vsock backend started");
        Ok(())
    }

    /// Waits until every one of `sockets` exists, failing when the vsock backend exits,
    /// reports an error or takes longer than [`VSOCK_START_TIMEOUT`].
    async fn wait_vsock_sockets(
        &mut self,
        vsock: &VsockSpec,
        sockets: &[PathBuf],
    ) -> anyhow::Result<()> {
        let name = vsock.backend.display().to_string();
        let deadline = tokio::time::Instant::now() + VSOCK_START_TIMEOUT;
        loop {
            // A socket file appears at bind, and listen follows at once: far sooner than
            // QEMU, started after this, can connect.
            let missing: Vec<&PathBuf> = sockets.iter().filter(|s| !is_socket(s)).collect();
            if missing.is_empty() {
                return Ok(());
            }
            let process = self
                .vsock
                .as_mut()
                .context("the vsock backend is not running")?;
            if let Some(code) = process.wait_exit(VSOCK_START_INTERVAL).await {
                anyhow::bail!(
                    "{name} of VM {:?} exited with code {code} before creating its sockets: {}",
                    self.spec.id,
                    output_or_none(&self.vsock_log())
                );
            }
            // On a fatal error it does not exit: it logs the error and tries again, for
            // ever. Any error it logs while starting is therefore its failure.
            let output = read_tail(&self.vsock_log());
            if output.contains("ERROR") {
                anyhow::bail!("{name} of VM {:?} failed to start: {output}", self.spec.id);
            }
            if tokio::time::Instant::now() >= deadline {
                let missing: Vec<String> =
                    missing.iter().map(|s| s.display().to_string()).collect();
                anyhow::bail!(
                    "{name} of VM {:?} did not create {} within {VSOCK_START_TIMEOUT:?}: {}",
                    self.spec.id,
                    missing.join(" and "),
                    output_or_none(&self.vsock_log())
                );
            }
        }
    }

    /// Ends `vhost-device-vsock` (SIGTERM, then SIGKILL after [`HELPER_GRACE`]), waits
    /// until it is reaped and removes its sockets.
    async fn stop_vsock(&mut self) -> anyhow::Result<()> {
        let Some(mut process) = self.vsock.take() else {
            return Ok(());
        };
        let pid = process.pid;
        if process.wait_exit(Duration::ZERO).await.is_none() {
            process.signal(Signal::SIGTERM);
            if process.wait_exit(HELPER_GRACE).await.is_none() && process.kill().await.is_none() {
                self.vsock = Some(process);
                anyhow::bail!(
                    "vsock backend {pid} of VM {:?} did not exit after SIGKILL",
                    self.spec.id
                );
            }
        }
        for socket in self.vsock_sockets() {
            remove_if_present(&socket)?;
        }
        tracing::info!(vm = %self.spec.id, pid, "vsock backend stopped");
        Ok(())
    }

    /// Stops QEMU: QMP `quit`, SIGKILL after `grace`.
    async fn stop_qemu(&mut self, grace: Duration) -> anyhow::Result<()> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        if self.wait_exit(Duration::ZERO).await.is_some() {
            return Ok(());
        }
        let asked = async {
            let mut qmp = Qmp::connect(&self.qmp_socket()).await?;
            qmp.execute("quit").await.map(drop)
        }
        .await;
        if asked.is_err() || self.wait_exit(grace).await.is_none() {
            let qemu = self.qemu.as_mut().context("QEMU was never started")?;
            qemu.signal(Signal::SIGKILL);
            if qemu.wait_exit(grace.max(KILL_GRACE)).await.is_none() {
                anyhow::bail!(
                    "QEMU {pid} of VM {:?} did not exit after SIGKILL",
                    self.spec.id
                );
            }
        }
        tracing::info!(vm = %self.spec.id, pid, "hypervisor stopped");
        Ok(())
    }

    /// Stops a VM whose boot failed, logging what could not be undone.
    async fn abandon(&mut self) {
        if let Err(err) = self.stop(Duration::from_secs(1)).await {
            tracing::warn!(vm = %self.spec.id, error = format!("{err:#}"), "cannot stop a VM that failed to boot");
        }
    }
}

/// The last [`CONSOLE_TAIL`] bytes of the file at `path`, trimmed; empty if it cannot
/// be read. Only the end is read: a log can be large.
fn read_tail(path: &Path) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let length = file.metadata().map_or(0, |m| m.len());
    let start = length.saturating_sub(CONSOLE_TAIL as u64);
    let mut bytes = Vec::with_capacity(CONSOLE_TAIL);
    if file.seek(SeekFrom::Start(start)).is_err()
        || file
            .take(CONSOLE_TAIL as u64)
            .read_to_end(&mut bytes)
            .is_err()
    {
        return String::new();
    }
    // The cut may fall inside a character; from the next one on the text is whole.
    let text = String::from_utf8_lossy(&bytes);
    text.trim_start_matches(char::REPLACEMENT_CHARACTER)
        .trim()
        .to_string()
}

/// [`read_tail`] of `path`, or a note that there is nothing.
fn output_or_none(path: &Path) -> String {
    let output = read_tail(path);
    if output.is_empty() {
        format!("no output in {}", path.display())
    } else {
        output
    }
}

/// Whether `path` is a unix socket.
fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;

    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Removes the file at `path` if there is one.
fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Makes `command` run in the network namespace at `netns`, where QEMU creates its tap.
fn enter_netns_on_exec(command: &mut Command, netns: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;

    let namespace =
        File::open(netns).with_context(|| format!("open network namespace {}", netns.display()))?;
    // SAFETY: between fork and exec the closure only calls setns(2), which is
    // async-signal-safe, on a descriptor the closure owns; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// QEMU's command line for `spec`.
pub fn command_line(spec: &VmSpec) -> Vec<String> {
    let run = |name: &str| spec.run_dir.join(name).display().to_string();
    let (accel, cpu) = match spec.accelerator {
        Accelerator::Kvm => ("kvm", "host"),
        Accelerator::Tcg | Accelerator::Auto => ("tcg", "max"),
    };
    // A vhost-user backend reads and writes the guest's memory itself: the memory has to
    // be a file it can map.
    let shared_memory = spec.vsock.is_some();
    let machine = if shared_memory {
        format!("microvm,memory-backend={MEMORY_ID}")
    } else {
        "microvm".to_string()
    };
    let mut args: Vec<String> = [
        "-name",
        &format!("kuasar-{}", spec.id),
        "-machine",
        &machine,
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-m",
        &format!("{}M", spec.memory_mib),
        "-smp",
        &spec.vcpus.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-kernel",
        &spec.kernel.display().to_string(),
        "-initrd",
        &spec.initrd.display().to_string(),
        "-append",
        &spec.cmdline,
        "-serial",
        &format!("file:{}", run("console.log")),
        "-qmp",
        &format!("unix:{},server=on,wait=off", run("qmp.sock")),
        "-device",
        "virtio-serial-device",
        "-chardev",
        &format!(
            "socket,id=agent,path={},server=on,wait=off",
            run("agent.sock")
        ),
        "-device",
        &format!("virtserialport,chardev=agent,name={AGENT_PORT}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if shared_memory {
        args.extend([
            "-object".to_string(),
            format!(
                "memory-backend-memfd,id={MEMORY_ID},size={}M,share=on",
                spec.memory_mib
            ),
        ]);
    }
    if spec.vsock.is_some() {
        args.extend([
            "-chardev".to_string(),
            format!("socket,id={VSOCK_CHARDEV},path={}", run(VHOST_VSOCK_SOCKET)),
            "-device".to_string(),
            format!("vhost-user-vsock-device,chardev={VSOCK_CHARDEV}"),
        ]);
    }
    if let Some(network) = &spec.network {
        args.extend([
            "-netdev".to_string(),
            format!(
                "tap,id={NET_ID},ifname={},script=no,downscript=no",
                network.tap
            ),
            "-device".to_string(),
            format!("virtio-net-device,netdev={NET_ID},mac={}", network.mac),
        ]);
    }
    for (n, share) in spec.shares.iter().enumerate() {
        args.extend([
            "-fsdev".to_string(),
            format!(
                "local,id=fs{n},path={},security_model=none",
                share.path.display()
            ),
            "-device".to_string(),
            format!("virtio-9p-device,fsdev=fs{n},mount_tag={}", share.tag),
        ]);
    }
    args
}

/// `vhost-device-vsock`'s command line for the VM whose run directory is `run_dir`.
pub fn vsock_command_line(run_dir: &Path, vsock: &VsockSpec) -> Vec<String> {
    vec![
        "--guest-cid".to_string(),
        vsock.guest_cid.to_string(),
        "--socket".to_string(),
        run_dir.join(VHOST_VSOCK_SOCKET).display().to_string(),
        "--uds-path".to_string(),
        run_dir.join(VSOCK_SOCKET).display().to_string(),
    ]
}

#[async_trait]
impl Hypervisor for Qemu {
    async fn start(&mut self) -> anyhow::Result<()> {
        if self.spec.accelerator == Accelerator::Auto {
            anyhow::bail!(
                "VM {:?}: resolve the accelerator before starting",
                self.spec.id
            );
        }
        if self.qemu.is_some() {
            anyhow::bail!("VM {:?} was started already", self.spec.id);
        }

        if let Some(vsock) = self.spec.vsock.clone() {
            self.start_vsock(&vsock).await?;
        }

        let spawned = File::create(self.qemu_log())
            .with_context(|| format!("create {}", self.qemu_log().display()))
            .and_then(|log| {
                let mut command = Command::new(&self.binary);
                command
                    .args(command_line(&self.spec))
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().context("duplicate the QEMU log")?)
                    .stderr(log);
                if let Some(network) = &self.spec.network {
                    enter_netns_on_exec(&mut command, &network.netns)?;
                }
                Process::spawn(&mut command)
                    .with_context(|| format!("start {}", self.binary.display()))
            });
        let qemu = match spawned {
            Ok(qemu) => qemu,
            Err(err) => {
                if let Err(stop) = self.stop_vsock().await {
                    tracing::warn!(vm = %self.spec.id, error = format!("{stop:#}"), "cannot end the vsock backend of a VM that failed to start");
                }
                return Err(err);
            }
        };
        tracing::info!(vm = %self.spec.id, pid = qemu.pid, accelerator = ?self.spec.accelerator, "hypervisor started");
        self.qemu = Some(qemu);
        Ok(())
    }

    async fn wait_ready(
        &mut self,
        mut ready: ReadyProbe<'_>,
        timeout: Duration,
    ) -> Result<(), BootError> {
        let id = self.spec.id.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut status = String::from("unknown");
        // One QMP connection for the whole boot; QEMU serves one client at a time, so it is
        // closed before the VM is stopped.
        let mut qmp: Option<Qmp> = None;
        let failure = loop {
            tokio::select! {
                answered = &mut ready => {
                    let Err(source) = answered else {
                        return Ok(());
                    };
                    // A probe fails when its channel breaks, most often because QEMU died.
                    if let Some(code) = self.wait_exit(EXIT_GRACE).await {
                        break BootError::Exited { id, code, output: self.output_tail() };
                    }
                    break BootError::Control { id, source };
                }
                _ = tokio::time::sleep(STATUS_INTERVAL) => {}
            }
            // The VM's other processes (the vsock backend) still have to go.
            if let Some(code) = self.wait_exit(Duration::ZERO).await {
                break BootError::Exited {
                    id,
                    code,
                    output: self.output_tail(),
                };
            }
            // The socket appears a moment after QEMU starts; until then the state is unknown.
            if qmp.is_none() {
                qmp = Qmp::connect(&self.qmp_socket()).await.ok();
            }
            if let Some(connection) = qmp.as_mut() {
                match connection.status().await {
                    Ok(now) => status = now,
                    Err(_) => qmp = None,
                }
            }
            if FAILED_STATES.contains(&status.as_str()) {
                break BootError::Stopped { id, status };
            }
            if tokio::time::Instant::now() >= deadline {
                break BootError::TimedOut {
                    id,
                    timeout,
                    status,
                    output: self.output_tail(),
                };
            }
        };
        drop(qmp);
        self.abandon().await;
        Err(failure)
    }

    fn agent_address(&self) -> PathBuf {
        self.spec.run_dir.join("agent.sock")
    }

    fn pid(&self) -> Option<u32> {
        self.qemu.as_ref().map(|qemu| qemu.pid)
    }

    fn helper_pids(&self) -> Vec<u32> {
        self.vsock.iter().map(|vsock| vsock.pid).collect()
    }

    fn vsock_uds(&self) -> Option<PathBuf> {
        self.spec
            .vsock
            .as_ref()
            .map(|_| self.spec.run_dir.join(VSOCK_SOCKET))
    }

    async fn stop(&mut self, grace: Duration) -> anyhow::Result<()> {
        // The backend goes second: QEMU would otherwise see its device vanish.
        let stopped = self.stop_qemu(grace).await;
        let helpers = self.stop_vsock().await;
        stopped.and(helpers)
    }

    async fn wait(&mut self) -> anyhow::Result<i32> {
        if self.qemu.is_none() {
            anyhow::bail!("VM {:?} was never started", self.spec.id);
        }
        let code = loop {
            if let Some(code) = self.wait_exit(Duration::from_secs(3600)).await {
                break code;
            }
        };
        self.stop_vsock().await?;
        Ok(code)
    }
}

/// Whether `path` is a usable QEMU binary (it answers `--version`).
pub fn is_usable(path: &Path) -> bool {
    Command::new(path)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::Share;

    fn spec(accelerator: Accelerator) -> VmSpec {
        VmSpec {
            id: "pod1".into(),
            kernel: "/g/vmlinux".into(),
            initrd: "/g/initrd".into(),
            cmdline: "console=ttyS0 quiet".into(),
            memory_mib: 256,
            vcpus: 1,
            accelerator,
            run_dir: "/run/vm/pod1".into(),
            shares: vec![Share {
                tag: "rootfs".into(),
                path: "/run/vm/pod1/share".into(),
            }],
            vsock: None,
            network: None,
        }
    }

    fn with_vsock(mut spec: VmSpec) -> VmSpec {
        spec.vsock = Some(VsockSpec::new("/usr/bin/vhost-device-vsock".into()));
        spec
    }

    fn value_of<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn command_line_names_every_part() {
        let args = command_line(&spec(Accelerator::Tcg));
        assert_eq!(value_of(&args, "-accel"), ["tcg"]);
        assert_eq!(value_of(&args, "-kernel"), ["/g/vmlinux"]);
        assert_eq!(value_of(&args, "-initrd"), ["/g/initrd"]);
        assert_eq!(value_of(&args, "-append"), ["console=ttyS0 quiet"]);
        assert_eq!(value_of(&args, "-m"), ["256M"]);
        assert_eq!(
            value_of(&args, "-qmp"),
            ["unix:/run/vm/pod1/qmp.sock,server=on,wait=off"]
        );
        assert!(value_of(&args, "-chardev")
            .contains(&"socket,id=agent,path=/run/vm/pod1/agent.sock,server=on,wait=off"));
        assert!(value_of(&args, "-device").contains(&"virtio-9p-device,fsdev=fs0,mount_tag=rootfs"));
        assert!(args.iter().any(|a| a == "-nodefaults"));
    }

    #[test]
    fn without_vsock_memory_is_private_and_there_is_no_vsock_device() {
        let args = command_line(&spec(Accelerator::Tcg));
        assert_eq!(value_of(&args, "-machine"), ["microvm"]);
        assert!(value_of(&args, "-object").is_empty());
        assert!(!args.iter().any(|a| a.contains("vhost-user")));
        assert_eq!(
            Qemu::new(spec(Accelerator::Tcg), "qemu".into()).vsock_uds(),
            None
        );
    }

    #[test]
    fn vsock_adds_shared_memory_and_a_vhost_user_device() {
        let args = command_line(&with_vsock(spec(Accelerator::Tcg)));
        assert_eq!(value_of(&args, "-machine"), ["microvm,memory-backend=mem"]);
        assert_eq!(
            value_of(&args, "-object"),
            ["memory-backend-memfd,id=mem,size=256M,share=on"]
        );
        let chardevs = value_of(&args, "-chardev");
        assert!(chardevs.contains(&"socket,id=vsock,path=/run/vm/pod1/vhost-vsock.sock"));
        let devices = value_of(&args, "-device");
        assert!(devices.contains(&"vhost-user-vsock-device,chardev=vsock"));

        // The virtio-serial channel stays.
        assert!(devices.contains(&"virtio-serial-device"));
        assert!(devices.contains(&"virtserialport,chardev=agent,name=agent.0"));
        assert!(
            chardevs.contains(&"socket,id=agent,path=/run/vm/pod1/agent.sock,server=on,wait=off")
        );
    }

    #[test]
    fn vsock_backend_serves_the_run_directory() {
        let mut vsock = VsockSpec::new("/usr/bin/vhost-device-vsock".into());
        vsock.guest_cid = 7;
        assert_eq!(
            vsock_command_line(Path::new("/run/vm/pod1"), &vsock),
            [
                "--guest-cid",
                "7",
                "--socket",
                "/run/vm/pod1/vhost-vsock.sock",
                "--uds-path",
                "/run/vm/pod1/vsock.sock"
            ]
        );
        let vm = Qemu::new(with_vsock(spec(Accelerator::Tcg)), "qemu".into());
        assert_eq!(vm.vsock_uds(), Some("/run/vm/pod1/vsock.sock".into()));
        assert!(vm.helper_pids().is_empty());
    }

    #[test]
    fn read_tail_reads_only_the_end() {
        let dir = scratch_dir("tail");
        let path = dir.join("log");
        let text = format!("{}é{}", "a".repeat(5000), "b".repeat(CONSOLE_TAIL - 1));
        std::fs::write(&path, &text).unwrap();
        assert_eq!(read_tail(&path), "b".repeat(CONSOLE_TAIL - 1));
        assert_eq!(read_tail(&dir.join("absent")), "");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A fresh directory for one test.
    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kuasar-qemu-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A VM whose vsock backend is the shell script `script`, in a fresh run directory.
    fn vm_with_backend(name: &str, script: &str) -> Qemu {
        use std::os::unix::fs::PermissionsExt;

        let dir = scratch_dir(name);
        let backend = dir.join("backend");
        std::fs::write(&backend, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&backend, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut spec = spec(Accelerator::Tcg);
        spec.run_dir = dir;
        spec.vsock = Some(VsockSpec::new(backend));
        Qemu::new(spec, "/nonexistent/qemu".into())
    }

    fn is_alive(pid: u32) -> bool {
        kill(Pid::from_raw(pid as i32), None).is_ok()
    }

    #[tokio::test]
    async fn a_vsock_backend_that_exits_is_reported_with_its_output() {
        reaper::start().unwrap();
        let mut vm = vm_with_backend("exits", "echo 'no such device' >&2; exit 3");
        let err = vm.start().await.unwrap_err();
        let message = format!("{err:#}");
        assert!(message.contains("exited with code 3"), "{message}");
        assert!(message.contains("no such device"), "{message}");
        assert!(vm.helper_pids().is_empty());
        assert_eq!(vm.pid(), None);
        std::fs::remove_dir_all(&vm.spec.run_dir).unwrap();
    }

    #[tokio::test]
    async fn a_vsock_backend_that_logs_an_error_is_ended() {
        reaper::start().unwrap();
        // What vhost-device-vsock does on a fatal error: log it, again and again.
        let mut vm = vm_with_backend(
            "error",
            "echo $$ > \"$(dirname \"$0\")/pid\"\n\
             while :; do echo '[t ERROR vhost_device_vsock] Fatal error: socket error' >&2; sleep 0.05; done",
        );
        let err = vm.start().await.unwrap_err();
        let message = format!("{err:#}");
        assert!(message.contains("failed to start"), "{message}");
        assert!(message.contains("Fatal error: socket error"), "{message}");
        let pid: u32 = std::fs::read_to_string(vm.spec.run_dir.join("pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(!is_alive(pid), "backend {pid} still runs");
        assert!(vm.helper_pids().is_empty());
        std::fs::remove_dir_all(&vm.spec.run_dir).unwrap();
    }

    /// The vhost-device-vsock that `scripts/setup.sh` unpacks, if it has been run.
    fn vhost_device_vsock() -> Option<PathBuf> {
        let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache");
        let found = std::fs::read_dir(&cache)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| {
                entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with("vhost-device-vsock-")
            })
            .map(|entry| entry.path().join("usr/bin/vhost-device-vsock"))
            .find(|binary| binary.is_file());
        if found.is_none() {
            eprintln!(
                "no vhost-device-vsock under {} (scripts/setup.sh): skipped",
                cache.display()
            );
        }
        found
    }

    /// A VM whose vsock backend is the real vhost-device-vsock, in a fresh run directory.
    fn vm_with_vhost_device_vsock(name: &str, backend: PathBuf) -> Qemu {
        let mut spec = spec(Accelerator::Tcg);
        spec.run_dir = scratch_dir(name);
        spec.vsock = Some(VsockSpec::new(backend));
        Qemu::new(spec, "/nonexistent/qemu".into())
    }

    #[tokio::test]
    async fn the_vsock_backend_serves_until_the_vm_stops() {
        let Some(backend) = vhost_device_vsock() else {
            return;
        };
        reaper::start().unwrap();
        let mut vm = vm_with_vhost_device_vsock("serves", backend);
        let vsock = vm.spec.vsock.clone().unwrap();
        vm.start_vsock(&vsock).await.unwrap();
        let pids = vm.helper_pids();
        assert_eq!(pids.len(), 1);
        assert!(is_alive(pids[0]));
        for socket in vm.vsock_sockets() {
            assert!(is_socket(&socket), "no socket {}", socket.display());
        }

        vm.stop(Duration::from_secs(1)).await.unwrap();
        assert!(!is_alive(pids[0]), "backend {} still runs", pids[0]);
        assert!(vm.helper_pids().is_empty());
        for socket in vm.vsock_sockets() {
            assert!(!socket.exists(), "{} left behind", socket.display());
        }
        std::fs::remove_dir_all(&vm.spec.run_dir).unwrap();
    }

    #[tokio::test]
    async fn a_failed_qemu_start_ends_the_vsock_backend() {
        let Some(backend) = vhost_device_vsock() else {
            return;
        };
        reaper::start().unwrap();
        let mut vm = vm_with_vhost_device_vsock("qemu-missing", backend);
        let err = vm.start().await.unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/qemu"), "{err:#}");
        assert!(vm.helper_pids().is_empty());
        let run_dir = vm.spec.run_dir.display().to_string();
        let left: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
            .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
            .filter(|cmdline| cmdline.contains(&run_dir))
            .collect();
        assert!(left.is_empty(), "left running: {left:?}");
        for socket in vm.vsock_sockets() {
            assert!(!socket.exists(), "{} left behind", socket.display());
        }
        std::fs::remove_dir_all(&vm.spec.run_dir).unwrap();
    }

    #[test]
    fn kvm_uses_the_host_cpu() {
        let args = command_line(&spec(Accelerator::Kvm));
        assert_eq!(value_of(&args, "-accel"), ["kvm"]);
        assert_eq!(value_of(&args, "-cpu"), ["host"]);
    }
}
