//! QEMU as the hypervisor: the `microvm` machine with virtio-mmio devices, the guest
//! agent's channel on a virtio-serial port backed by a unix socket, host directories
//! shared over 9p, and QMP for run state and shutdown.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use kuasar_sandbox::reaper::{self, ExitReceiver};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::qmp::Qmp;
use super::{Accelerator, BootError, Hypervisor, ReadyProbe, VmSpec};

/// Name of the guest agent's virtio-serial port.
pub const AGENT_PORT: &str = "agent.0";

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

/// How much of the console log an error quotes.
const CONSOLE_TAIL: usize = 2000;

/// A VM run by a QEMU process.
pub struct Qemu {
    spec: VmSpec,
    binary: PathBuf,
    pid: Option<u32>,
    exit: Option<ExitReceiver>,
    exit_code: Option<i32>,
}

impl Qemu {
    /// A VM of `spec` to be run by the QEMU binary `binary`.
    pub fn new(spec: VmSpec, binary: PathBuf) -> Self {
        Self {
            spec,
            binary,
            pid: None,
            exit: None,
            exit_code: None,
        }
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

    /// What QEMU and the guest's console said last, for an error message.
    fn output_tail(&self) -> String {
        [self.qemu_log(), self.console_log()]
            .iter()
            .map(|path| tail(&std::fs::read_to_string(path).unwrap_or_default()))
            .filter(|text| !text.is_empty())
            .collect::<Vec<_>>()
            .join(" | ")
    }

    /// Waits for the exit of a started QEMU, at most `limit`; `None` on timeout.
    async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        if let Some(code) = self.exit_code {
            return Some(code);
        }
        let exit = self.exit.as_mut()?;
        let code = match tokio::time::timeout(limit, exit).await {
            Ok(Ok(status)) => status.code,
            Ok(Err(_)) => 255,
            Err(_) => return None,
        };
        self.exit = None;
        self.exit_code = Some(code);
        Some(code)
    }

    /// Stops a VM whose boot failed, logging what could not be undone.
    async fn abandon(&mut self) {
        if let Err(err) = self.stop(Duration::from_secs(1)).await {
            tracing::warn!(vm = %self.spec.id, error = format!("{err:#}"), "cannot stop a VM that failed to boot");
        }
    }
}

/// The last [`CONSOLE_TAIL`] bytes of `text`, trimmed.
fn tail(text: &str) -> String {
    let start = text.len().saturating_sub(CONSOLE_TAIL);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].trim().to_string()
}

/// QEMU's command line for `spec`.
pub fn command_line(spec: &VmSpec) -> Vec<String> {
    let run = |name: &str| spec.run_dir.join(name).display().to_string();
    let (accel, cpu) = match spec.accelerator {
        Accelerator::Kvm => ("kvm", "host"),
        Accelerator::Tcg | Accelerator::Auto => ("tcg", "max"),
    };
    let mut args: Vec<String> = [
        "-name",
        &format!("kuasar-{}", spec.id),
        "-machine",
        "microvm",
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

#[async_trait]
impl Hypervisor for Qemu {
    async fn start(&mut self) -> anyhow::Result<()> {
        if self.spec.accelerator == Accelerator::Auto {
            anyhow::bail!(
                "VM {:?}: resolve the accelerator before starting",
                self.spec.id
            );
        }
        let log = std::fs::File::create(self.qemu_log())
            .with_context(|| format!("create {}", self.qemu_log().display()))?;
        let mut command = Command::new(&self.binary);
        command
            .args(command_line(&self.spec))
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicate the QEMU log")?)
            .stderr(log);
        let (child, exit) = reaper::spawn(&mut command)
            .with_context(|| format!("start {}", self.binary.display()))?;
        self.pid = Some(child.id());
        self.exit = Some(exit);
        tracing::info!(vm = %self.spec.id, pid = child.id(), accelerator = ?self.spec.accelerator, "hypervisor started");
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
                        return Err(BootError::Exited { id, code, output: self.output_tail() });
                    }
                    break BootError::Control { id, source };
                }
                _ = tokio::time::sleep(STATUS_INTERVAL) => {}
            }
            if let Some(code) = self.wait_exit(Duration::ZERO).await {
                return Err(BootError::Exited {
                    id,
                    code,
                    output: self.output_tail(),
                });
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
        self.pid
    }

    async fn stop(&mut self, grace: Duration) -> anyhow::Result<()> {
        let Some(pid) = self.pid else {
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
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            if self
                .wait_exit(grace.max(Duration::from_secs(5)))
                .await
                .is_none()
            {
                anyhow::bail!(
                    "QEMU {pid} of VM {:?} did not exit after SIGKILL",
                    self.spec.id
                );
            }
        }
        tracing::info!(vm = %self.spec.id, pid, "hypervisor stopped");
        Ok(())
    }

    async fn wait(&mut self) -> anyhow::Result<i32> {
        if self.pid.is_none() {
            anyhow::bail!("VM {:?} was never started", self.spec.id);
        }
        loop {
            if let Some(code) = self.wait_exit(Duration::from_secs(3600)).await {
                return Ok(code);
            }
        }
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
        }
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
    fn kvm_uses_the_host_cpu() {
        let args = command_line(&spec(Accelerator::Kvm));
        assert_eq!(value_of(&args, "-accel"), ["kvm"]);
        assert_eq!(value_of(&args, "-cpu"), ["host"]);
    }
}
