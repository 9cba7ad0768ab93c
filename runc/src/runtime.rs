//! Containers of a pod run by the `runc` binary.
//!
//! Each container is created from the bundle containerd wrote, with its root filesystem
//! mounted at `<bundle>/rootfs`; runc's detached init process is re-parented to the
//! sandboxer, which reaps it. Errors quote runc's own log.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio as ProcessStdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use kuasar_sandbox::error::{Error, Result};
use kuasar_sandbox::io::{ProcessFds, Stdio};
use kuasar_sandbox::reaper;
use kuasar_sandbox::task::{ContainerRuntime, CreateContainer, ExecProcess, KillTarget, Spawned};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use kuasar_sandbox::config::Config;

use crate::config::RuncSettings;
use crate::console::ConsoleSocket;
use crate::stats;

/// How long runc gets to hand over a terminal.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs containers with one runc binary and state root.
#[derive(Debug)]
pub struct RuncRuntime {
    binary: PathBuf,
    root: PathBuf,
    /// Scratch directory for pid files, exec specs and console sockets.
    work_dir: PathBuf,
    next: AtomicU64,
}

impl RuncRuntime {
    /// A runtime using `binary`, with runc's state under `root` and scratch files in
    /// `work_dir`.
    pub fn new(binary: PathBuf, root: PathBuf, work_dir: PathBuf) -> Self {
        Self {
            binary,
            root,
            work_dir,
            next: AtomicU64::new(0),
        }
    }

    /// The runtime `config` describes: runc's state under `[runc] root` or
    /// `<state_dir>/runc`, scratch files in `<state_dir>/work`, cleared here.
    pub fn for_config(config: &Config<RuncSettings>) -> anyhow::Result<Self> {
        let work_dir = config.state_dir.join("work");
        if work_dir.exists() {
            std::fs::remove_dir_all(&work_dir)
                .with_context(|| format!("clear {}", work_dir.display()))?;
        }
        std::fs::create_dir_all(&work_dir)
            .with_context(|| format!("create {}", work_dir.display()))?;
        let root = config
            .family
            .runc
            .root
            .clone()
            .unwrap_or_else(|| config.state_dir.join("runc"));
        Ok(Self::new(config.family.runc.binary.clone(), root, work_dir))
    }

    fn scratch(&self, name: &str) -> PathBuf {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.work_dir.join(format!("{n}-{name}"))
    }

    fn command(&self, log: &Path) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(log)
            .args(["--log-format", "json"]);
        command
    }

    /// Runs a runc subcommand that does not touch container stdio and returns its stdout.
    async fn run(&self, what: &str, id: &str, args: &[&str]) -> Result<Vec<u8>> {
        let log = self.scratch("runc.log");
        let mut command = self.command(&log);
        command.args(args).stdin(ProcessStdio::null());
        let output = reaper::output(&mut command)
            .await
            .map_err(|err| self.spawn_error(err))?;
        let message = runc_error(&log, &output.stderr);
        let _ = std::fs::remove_file(&log);
        if output.status.code != 0 {
            return Err(classify(what, id, message));
        }
        Ok(output.stdout)
    }

    /// Runs a runc subcommand whose child process inherits `fds` as its stdio.
    async fn run_with_stdio(
        &self,
        what: &str,
        id: &str,
        args: Vec<String>,
        fds: ProcessFds,
    ) -> Result<()> {
        let log = self.scratch("runc.log");
        let mut command = self.command(&log);
        command.args(&args);
        command
            .stdin(stdio(fds.stdin))
            .stdout(stdio(fds.stdout))
            .stderr(stdio(fds.stderr));
        let (child, exit) = reaper::spawn(&mut command).map_err(|err| self.spawn_error(err))?;
        // Our copies of the descriptors go with the command; the container keeps its own.
        drop(command);
        drop(child);
        let status = exit
            .await
            .map_err(|_| Error::internal("exit of runc was lost"))?;
        let message = runc_error(&log, &[]);
        let _ = std::fs::remove_file(&log);
        if status.code != 0 {
            return Err(classify(what, id, message));
        }
        Ok(())
    }

    fn spawn_error(&self, err: std::io::Error) -> Error {
        Error::Internal(anyhow::Error::new(err).context(format!("run {}", self.binary.display())))
    }

    async fn read_pid(path: &Path) -> Result<u32> {
        let text = tokio::fs::read_to_string(path)
            .await
            .with_context(|| format!("read pid file {}", path.display()))?;
        let _ = tokio::fs::remove_file(path).await;
        text.trim()
            .parse()
            .map_err(|_| Error::internal(format!("pid file {} holds {text:?}", path.display())))
    }
}

fn stdio(fd: Option<OwnedFd>) -> ProcessStdio {
    fd.map_or_else(ProcessStdio::null, ProcessStdio::from)
}

/// The error runc reported: the `msg` of its error-level log entries, else its stderr.
fn runc_error(log: &Path, stderr: &[u8]) -> String {
    let mut messages = Vec::new();
    if let Ok(text) = std::fs::read_to_string(log) {
        for line in text.lines() {
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if matches!(entry["level"].as_str(), Some("error" | "fatal")) {
                if let Some(msg) = entry["msg"].as_str() {
                    messages.push(msg.to_string());
                }
            }
        }
    }
    if messages.is_empty() {
        String::from_utf8_lossy(stderr).trim().to_string()
    } else {
        messages.join("; ")
    }
}

fn classify(what: &str, id: &str, message: String) -> Error {
    let text = format!("runc {what} of container {id:?} failed: {message}");
    if message.contains("does not exist")
        || message.contains("not running")
        || message.contains("no such process")
    {
        Error::NotFound(text)
    } else {
        Error::Internal(anyhow::anyhow!(text))
    }
}

/// Starts watching the memory cgroup named in the container's spec for OOM kills.
fn watch_oom(id: &str, bundle: &Path) -> Option<kuasar_sandbox::oom::OomReceiver> {
    let spec = oci_spec::runtime::Spec::load(bundle.join("config.json")).ok()?;
    let cgroups_path = spec
        .linux()
        .as_ref()?
        .cgroups_path()
        .as_ref()?
        .display()
        .to_string();
    let cgroup = kuasar_sandbox::oom::memory_cgroup(&cgroups_path)?;
    match kuasar_sandbox::oom::watch(&cgroup) {
        Ok(receiver) => Some(receiver),
        Err(err) => {
            tracing::warn!(container_id = %id, error = format!("{err:#}"), "no OOM notifications");
            None
        }
    }
}

fn unmount_rootfs(bundle: &Path) -> anyhow::Result<()> {
    kuasar_sandbox::mount::unmount_all(&bundle.join("rootfs"))
}

#[async_trait]
impl ContainerRuntime for RuncRuntime {
    async fn create(&self, container: &CreateContainer) -> Result<Spawned> {
        let id = &container.id;
        let bundle = &container.bundle;
        if !bundle.join("config.json").is_file() {
            return Err(Error::InvalidArgument(format!(
                "bundle {} of container {id:?} has no config.json",
                bundle.display()
            )));
        }
        kuasar_sandbox::mount::mount_rootfs(bundle, &container.rootfs).await?;

        let pid_file = bundle.join("init.pid");
        let mut args = vec![
            "create".to_string(),
            "--bundle".into(),
            bundle.display().to_string(),
        ];
        args.extend(["--pid-file".into(), pid_file.display().to_string()]);
        let mut result = self
            .start_process("create", id, args, &container.stdio, &pid_file)
            .await;
        if let Ok(spawned) = &mut result {
            spawned.oom = watch_oom(id, bundle);
        }
        if result.is_err() {
            let _ = self.run("delete", id, &["delete", "--force", id]).await;
            let _ = unmount_rootfs(bundle);
        }
        result
    }

    async fn start(&self, id: &str) -> Result<()> {
        self.run("start", id, &["start", id]).await.map(drop)
    }

    async fn exec(&self, process: &ExecProcess) -> Result<Spawned> {
        let id = &process.container_id;
        let spec_file = self.scratch("process.json");
        tokio::fs::write(&spec_file, &process.spec)
            .await
            .with_context(|| format!("write {}", spec_file.display()))?;
        let pid_file = self.scratch("exec.pid");
        let args = vec![
            "exec".to_string(),
            "--detach".into(),
            "--process".into(),
            spec_file.display().to_string(),
            "--pid-file".into(),
            pid_file.display().to_string(),
        ];
        let what = format!("exec {:?}", process.exec_id);
        let result = self
            .start_process(&what, id, args, &process.stdio, &pid_file)
            .await;
        let _ = tokio::fs::remove_file(&spec_file).await;
        result
    }

    async fn kill(&self, id: &str, target: KillTarget, signal: u32) -> Result<()> {
        match target {
            KillTarget::Init { all } => {
                let signal = signal.to_string();
                let mut args = vec!["kill"];
                if all {
                    args.push("--all");
                }
                args.extend([id, signal.as_str()]);
                self.run("kill", id, &args).await.map(drop)
            }
            KillTarget::Exec(pid) => {
                let signal = Signal::try_from(signal as i32)
                    .map_err(|_| Error::InvalidArgument(format!("unknown signal {signal}")))?;
                kill(Pid::from_raw(pid as i32), signal).map_err(|err| {
                    Error::NotFound(format!("exec process {pid} of container {id:?}: {err}"))
                })
            }
        }
    }

    async fn delete(&self, id: &str) -> Result<()> {
        let bundle = self.bundle_of(id).await;
        match self.run("delete", id, &["delete", "--force", id]).await {
            Ok(_) | Err(Error::NotFound(_)) => {}
            Err(err) => return Err(err),
        }
        if let Some(bundle) = bundle {
            unmount_rootfs(&bundle)?;
        }
        Ok(())
    }

    async fn pause(&self, id: &str) -> Result<()> {
        self.run("pause", id, &["pause", id]).await.map(drop)
    }

    async fn resume(&self, id: &str) -> Result<()> {
        self.run("resume", id, &["resume", id]).await.map(drop)
    }

    async fn update(&self, id: &str, resources: &[u8]) -> Result<()> {
        serde_json::from_slice::<oci_spec::runtime::LinuxResources>(resources).map_err(|err| {
            Error::InvalidArgument(format!(
                "resources of container {id:?} are not LinuxResources JSON: {err}"
            ))
        })?;
        let file = self.scratch("resources.json");
        tokio::fs::write(&file, resources)
            .await
            .with_context(|| format!("write {}", file.display()))?;
        let path = file.display().to_string();
        let result = self
            .run("update", id, &["update", "--resources", &path, id])
            .await;
        let _ = tokio::fs::remove_file(&file).await;
        result.map(drop)
    }

    async fn stats(&self, id: &str) -> Result<Any> {
        let output = self.run("events", id, &["events", "--stats", id]).await?;
        stats::to_metrics(&output, kuasar_sandbox::cgroup::is_unified())
            .with_context(|| format!("decode runc stats of container {id:?}"))
            .map_err(Error::from)
    }

    async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let output = self.run("ps", id, &["ps", "--format", "json", id]).await?;
        serde_json::from_slice(&output)
            .with_context(|| format!("decode runc ps of container {id:?}"))
            .map_err(Error::from)
    }
}

impl RuncRuntime {
    /// Runs `runc create` or `runc exec` for a process with `stdio` and returns it once
    /// its pid is known.
    async fn start_process(
        &self,
        what: &str,
        id: &str,
        mut args: Vec<String>,
        stdio: &Stdio,
        pid_file: &Path,
    ) -> Result<Spawned> {
        let (fds, console_socket) = if stdio.terminal {
            let socket = ConsoleSocket::bind(&self.scratch("console.sock"))
                .context("create console socket")?;
            args.extend([
                "--console-socket".into(),
                socket.path().display().to_string(),
            ]);
            (ProcessFds::default(), Some(socket))
        } else {
            (
                stdio
                    .open_direct()
                    .with_context(|| format!("open stdio of container {id:?}"))?,
                None,
            )
        };
        args.push(id.to_string());

        let console = match console_socket {
            None => {
                self.run_with_stdio(what, id, args, fds).await?;
                None
            }
            Some(socket) => {
                let receive = socket.receive(CONSOLE_TIMEOUT);
                let (ran, master) = tokio::join!(self.run_with_stdio(what, id, args, fds), receive);
                ran?;
                let master =
                    master.with_context(|| format!("receive terminal of container {id:?}"))?;
                Some(
                    stdio
                        .attach_console(master)
                        .with_context(|| format!("attach terminal of container {id:?}"))?,
                )
            }
        };
        let pid = Self::read_pid(pid_file).await?;
        Ok(Spawned {
            pid,
            exit: reaper::watch(pid),
            console,
            oom: None,
        })
    }

    async fn bundle_of(&self, id: &str) -> Option<PathBuf> {
        let output = self.run("state", id, &["state", id]).await.ok()?;
        let state: serde_json::Value = serde_json::from_slice(&output).ok()?;
        state["bundle"].as_str().map(PathBuf::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_errors_come_from_its_log() {
        let dir = std::env::temp_dir().join(format!("kuasar-runc-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log.json");
        std::fs::write(
            &log,
            "{\"level\":\"info\",\"msg\":\"starting\"}\n{\"level\":\"error\",\"msg\":\"exec: \\\"nope\\\": executable file not found in $PATH\"}\n",
        )
        .unwrap();
        assert_eq!(
            runc_error(&log, b"ignored"),
            "exec: \"nope\": executable file not found in $PATH"
        );
        assert_eq!(
            runc_error(&dir.join("missing"), b"plain failure\n"),
            "plain failure"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_containers_are_not_found() {
        let err = classify("kill", "c1", "container \"c1\" does not exist".into());
        assert!(matches!(err, Error::NotFound(_)), "{err}");
        let err = classify("create", "c1", "exec format error".into());
        assert!(matches!(err, Error::Internal(_)), "{err}");
        assert!(err
            .to_string()
            .contains("runc create of container \"c1\" failed: exec format error"));
    }
}
