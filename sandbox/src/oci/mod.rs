//! Containers run by an OCI runtime binary with runc's command line: runc itself, gVisor's
//! runsc, Quark.
//!
//! Each container is created from the bundle containerd wrote, with its root filesystem
//! mounted at `<bundle>/rootfs`. Where its processes live decides how exits are learned:
//! runc's detached init is re-parented to the sandboxer, which reaps it; an application
//! kernel keeps its processes to itself and reports exits through `<binary> wait`.
//! Errors quote the engine's own log.

mod console;
mod stats;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio as ProcessStdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::oneshot;

pub use console::ConsoleSocket;

use crate::error::{Error, Result};
use crate::io::{ProcessFds, Stdio};
use crate::reaper::{self, ExitStatus};
use crate::task::{ContainerRuntime, CreateContainer, ExecProcess, KillTarget, Spawned};

/// How long the engine gets to hand over a terminal.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to wait before waiting again for a container whose waiter failed.
const REWAIT_DELAY: Duration = Duration::from_millis(200);

/// Exit code reported for a container whose exit the engine could not tell.
const UNKNOWN_EXIT: i32 = 255;

/// Where an engine's container processes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processes {
    /// On the host kernel, as descendants of the sandboxer (runc): exits are reaped and
    /// exec processes are signalled directly.
    Host,
    /// Inside the engine's own kernel (runsc): `<binary> wait` reports a container's exit
    /// once it runs, and exec processes are signalled through `<binary> kill --pid`.
    Kernel,
}

/// An OCI runtime binary and how to drive it.
#[derive(Debug, Clone)]
pub struct OciEngine {
    /// Name in messages, e.g. `runc` or `runsc`.
    pub name: String,
    /// The binary, looked up in `PATH` unless it has a directory part.
    pub binary: PathBuf,
    /// The engine's state directory (`--root`).
    pub root: PathBuf,
    /// Further global flags, placed before every subcommand.
    pub flags: Vec<String>,
    /// Further flags of `create`, e.g. runc's `--no-pivot` where the root is a RAM disk.
    pub create_flags: Vec<String>,
    /// Where container processes live.
    pub processes: Processes,
}

impl OciEngine {
    /// Fails, naming the binary, when it cannot be found.
    pub fn check_binary(&self) -> anyhow::Result<()> {
        let binary = &self.binary;
        let found = if binary.components().count() > 1 {
            binary.is_file()
        } else {
            std::env::var_os("PATH")
                .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(binary).is_file()))
                .unwrap_or(false)
        };
        if !found {
            anyhow::bail!(
                "{} binary {:?} not found",
                self.name,
                binary.display().to_string()
            );
        }
        Ok(())
    }
}

/// A container created in an application kernel and waiting for its start.
#[derive(Debug)]
struct PendingStart {
    /// Where its exit goes once `<binary> wait` reports it.
    exit: oneshot::Sender<ExitStatus>,
    /// Its stdio: the kernel wires a container to the stdio of `start`, not `create`.
    stdio: Stdio,
}

/// Runs the engine's binary: what the runtime and its background tasks (exit watchers)
/// share.
#[derive(Debug)]
struct Driver {
    engine: OciEngine,
    /// Scratch directory for logs, pid files, exec specs and console sockets.
    work_dir: PathBuf,
    next: AtomicU64,
}

impl Driver {
    fn scratch(&self, name: &str) -> PathBuf {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.work_dir.join(format!("{n}-{name}"))
    }

    fn command(&self, log: &Path, flags: &[String]) -> Command {
        let mut command = Command::new(&self.engine.binary);
        command
            .arg("--root")
            .arg(&self.engine.root)
            .arg("--log")
            .arg(log)
            .args(["--log-format", "json"])
            .args(&self.engine.flags)
            .args(flags);
        command
    }

    async fn run_with_flags(
        &self,
        what: &str,
        id: &str,
        flags: &[String],
        args: &[&str],
    ) -> Result<Vec<u8>> {
        let log = self.scratch("engine.log");
        let mut command = self.command(&log, flags);
        command.args(args).stdin(ProcessStdio::null());
        let output = reaper::output(&mut command)
            .await
            .map_err(|err| self.spawn_error(err))?;
        let message = engine_error(&log, &output.stderr);
        let _ = std::fs::remove_file(&log);
        if output.status.code != 0 {
            return Err(classify(&self.engine.name, what, id, message));
        }
        Ok(output.stdout)
    }

    async fn run(&self, what: &str, id: &str, args: &[&str]) -> Result<Vec<u8>> {
        self.run_with_flags(what, id, &[], args).await
    }

    fn spawn_error(&self, err: std::io::Error) -> Error {
        Error::Internal(
            anyhow::Error::new(err).context(format!("run {}", self.engine.binary.display())),
        )
    }

    /// The state the engine reports for container `id` (`created`, `running`, `paused`,
    /// `stopped`); `None` when it does not know the container or cannot say.
    async fn status(&self, id: &str) -> Option<String> {
        let output = self.run("state", id, &["state", id]).await.ok()?;
        let state: serde_json::Value = serde_json::from_slice(&output).ok()?;
        state["status"].as_str().map(str::to_string)
    }

    /// Reports the exit of container `id`, which runs in the engine's kernel, to `sender`:
    /// `<binary> wait <id>` until the engine tells an exit status. A waiter that ends
    /// without one (killed, say) while the kernel still runs the container is replaced.
    async fn watch_kernel_exit(self: Arc<Self>, id: String, sender: oneshot::Sender<ExitStatus>) {
        let name = &self.engine.name;
        loop {
            let log = self.scratch("wait.log");
            let mut command = self.command(&log, &[]);
            command.args(["wait", &id]).stdin(ProcessStdio::null());
            let message = match reaper::output(&mut command).await {
                Ok(output) => match wait_status(&output.stdout) {
                    Some(code) => {
                        let _ = std::fs::remove_file(&log);
                        let _ = sender.send(ExitStatus::now(code));
                        return;
                    }
                    None => engine_error(&log, &output.stderr),
                },
                Err(err) => err.to_string(),
            };
            let _ = std::fs::remove_file(&log);
            match self.status(&id).await.as_deref() {
                Some("running" | "paused") if !sender.is_closed() => {
                    tracing::warn!(container_id = %id, engine = %name, error = %message, "waiting for the container failed; waiting again");
                    tokio::time::sleep(REWAIT_DELAY).await;
                }
                _ => {
                    tracing::warn!(container_id = %id, engine = %name, error = %message, "container exit unknown");
                    let _ = sender.send(ExitStatus::now(UNKNOWN_EXIT));
                    return;
                }
            }
        }
    }
}

/// Runs containers with one [`OciEngine`].
#[derive(Debug)]
pub struct OciRuntime {
    driver: Arc<Driver>,
    /// Bundle directories of the containers created, whose rootfs mounts delete undoes.
    bundles: Mutex<HashMap<String, PathBuf>>,
    /// Created containers the kernel has not started yet ([`Processes::Kernel`] only).
    pending_starts: Mutex<HashMap<String, PendingStart>>,
    /// Exec processes by host pid: their container and pid inside the kernel
    /// ([`Processes::Kernel`] only).
    kernel_execs: Arc<Mutex<HashMap<u32, (String, u32)>>>,
}

impl OciRuntime {
    /// A runtime driving `engine`, with scratch files in `work_dir`, cleared here.
    pub fn new(engine: OciEngine, work_dir: PathBuf) -> anyhow::Result<Self> {
        if work_dir.exists() {
            std::fs::remove_dir_all(&work_dir)
                .with_context(|| format!("clear {}", work_dir.display()))?;
        }
        std::fs::create_dir_all(&work_dir)
            .with_context(|| format!("create {}", work_dir.display()))?;
        Ok(Self {
            driver: Arc::new(Driver {
                engine,
                work_dir,
                next: AtomicU64::new(0),
            }),
            bundles: Mutex::default(),
            pending_starts: Mutex::default(),
            kernel_execs: Arc::default(),
        })
    }

    /// The engine this runtime drives.
    pub fn engine(&self) -> &OciEngine {
        &self.driver.engine
    }

    /// A fresh path in the scratch directory ending in `name`.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.driver.scratch(name)
    }

    fn command(&self, log: &Path, flags: &[String]) -> Command {
        self.driver.command(log, flags)
    }

    /// Runs a subcommand that does not touch container stdio and returns its stdout.
    pub async fn run(&self, what: &str, id: &str, args: &[&str]) -> Result<Vec<u8>> {
        self.driver.run(what, id, args).await
    }

    /// Runs a subcommand with further global `flags` and returns its stdout.
    pub async fn run_with_flags(
        &self,
        what: &str,
        id: &str,
        flags: &[String],
        args: &[&str],
    ) -> Result<Vec<u8>> {
        self.driver.run_with_flags(what, id, flags, args).await
    }

    /// Creates and starts container `id` from `bundle`, a bundle of the sandboxer's own,
    /// with no stdio and further global `flags`; returns the pid the engine reports.
    pub async fn run_detached(&self, id: &str, bundle: &Path, flags: &[String]) -> Result<u32> {
        let pid_file = bundle.join("init.pid");
        let args = vec![
            "create".to_string(),
            "--bundle".into(),
            bundle.display().to_string(),
            "--pid-file".into(),
            pid_file.display().to_string(),
            id.to_string(),
        ];
        self.run_with_stdio("create", id, flags, args, ProcessFds::default())
            .await?;
        let pid = Self::read_pid(&pid_file).await?;
        self.run_with_flags("start", id, flags, &["start", id])
            .await?;
        Ok(pid)
    }

    /// Runs a subcommand whose child process inherits `fds` as its stdio.
    async fn run_with_stdio(
        &self,
        what: &str,
        id: &str,
        flags: &[String],
        args: Vec<String>,
        fds: ProcessFds,
    ) -> Result<()> {
        let log = self.scratch("engine.log");
        let mut command = self.command(&log, flags);
        command.args(&args);
        // Without a stderr of the process's own, the engine's goes to a file: what it says
        // before its log is set up (a bad flag, say) is the only reason there is. Not a
        // pipe: the engine hands its stderr on to the daemons it starts, so a pipe would
        // not reach end-of-file before they end.
        let stderr_file = match &fds.stderr {
            Some(_) => None,
            None => Some(self.scratch("engine.stderr")),
        };
        let stderr = match (fds.stderr, &stderr_file) {
            (Some(fd), _) => ProcessStdio::from(fd),
            (None, Some(path)) => std::fs::File::create(path)
                .map(ProcessStdio::from)
                .with_context(|| format!("create {}", path.display()))?,
            (None, None) => ProcessStdio::null(),
        };
        command
            .stdin(stdio(fds.stdin))
            .stdout(stdio(fds.stdout))
            .stderr(stderr);
        let (child, exit) =
            reaper::spawn(&mut command).map_err(|err| self.driver.spawn_error(err))?;
        // Our copies of the descriptors go with the command; the container keeps its own.
        drop(command);
        drop(child);
        let status = exit.await.map_err(|_| {
            Error::internal(format!("exit of {} was lost", self.driver.engine.name))
        })?;
        let stderr = stderr_file
            .as_ref()
            .and_then(|path| std::fs::read(path).ok())
            .unwrap_or_default();
        let message = engine_error(&log, &stderr);
        let _ = std::fs::remove_file(&log);
        if let Some(path) = &stderr_file {
            let _ = std::fs::remove_file(path);
        }
        if status.code != 0 {
            return Err(classify(&self.driver.engine.name, what, id, message));
        }
        Ok(())
    }

    /// Reads and removes a pid file the engine wrote.
    pub async fn read_pid(path: &Path) -> Result<u32> {
        let text = tokio::fs::read_to_string(path)
            .await
            .with_context(|| format!("read pid file {}", path.display()))?;
        let _ = tokio::fs::remove_file(path).await;
        text.trim()
            .parse()
            .map_err(|_| Error::internal(format!("pid file {} holds {text:?}", path.display())))
    }

    /// Runs a subcommand (`create`, `start` or `exec`) that wires a process to `stdio`,
    /// and returns the process's terminal once the engine has handed it over.
    async fn run_attached(
        &self,
        what: &str,
        id: &str,
        mut args: Vec<String>,
        stdio: &Stdio,
    ) -> Result<Option<crate::io::Console>> {
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

        let Some(socket) = console_socket else {
            self.run_with_stdio(what, id, &[], args, fds).await?;
            return Ok(None);
        };
        let receive = socket.receive(CONSOLE_TIMEOUT);
        let (ran, master) = tokio::join!(self.run_with_stdio(what, id, &[], args, fds), receive);
        ran?;
        let master = master.with_context(|| format!("receive terminal of container {id:?}"))?;
        let console = stdio
            .attach_console(master)
            .with_context(|| format!("attach terminal of container {id:?}"))?;
        Ok(Some(console))
    }

    fn bundles(&self) -> std::sync::MutexGuard<'_, HashMap<String, PathBuf>> {
        self.bundles
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn pending_starts(&self) -> std::sync::MutexGuard<'_, HashMap<String, PendingStart>> {
        self.pending_starts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn kernel_execs(&self) -> std::sync::MutexGuard<'_, HashMap<u32, (String, u32)>> {
        self.kernel_execs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn stdio(fd: Option<OwnedFd>) -> ProcessStdio {
    fd.map_or_else(ProcessStdio::null, ProcessStdio::from)
}

/// The exit code in the JSON `<binary> wait` prints: `{"id": …, "exitStatus": N}`.
fn wait_status(stdout: &[u8]) -> Option<i32> {
    let value: serde_json::Value = serde_json::from_slice(stdout).ok()?;
    value["exitStatus"]
        .as_i64()
        .and_then(|code| i32::try_from(code).ok())
}

/// The error the engine reported: the `msg` of its error-level log entries, else its
/// stderr.
fn engine_error(log: &Path, stderr: &[u8]) -> String {
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

fn classify(engine: &str, what: &str, id: &str, message: String) -> Error {
    let text = format!("{engine} {what} of container {id:?} failed: {message}");
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
fn watch_oom(id: &str, bundle: &Path) -> Option<crate::oom::OomReceiver> {
    let spec = oci_spec::runtime::Spec::load(bundle.join("config.json")).ok()?;
    let cgroups_path = spec
        .linux()
        .as_ref()?
        .cgroups_path()
        .as_ref()?
        .display()
        .to_string();
    let cgroup = crate::oom::memory_cgroup(&cgroups_path)?;
    match crate::oom::watch(&cgroup) {
        Ok(receiver) => Some(receiver),
        Err(err) => {
            tracing::warn!(container_id = %id, error = format!("{err:#}"), "no OOM notifications");
            None
        }
    }
}

/// Removes the cgroup named in the spec of a container whose create failed, if the engine
/// left it behind: runsc leaves a sub-container's cgroup when its sandbox goes away during
/// the create (a created container's cgroup goes with `<engine> delete`). A cgroup that
/// still has processes stays.
async fn remove_leftover_cgroup(id: &str, bundle: &Path) {
    let Ok(spec) = oci_spec::runtime::Spec::load(bundle.join("config.json")) else {
        return;
    };
    let Some(path) = spec
        .linux()
        .as_ref()
        .and_then(|linux| linux.cgroups_path().as_ref())
        .map(|path| path.display().to_string())
    else {
        return;
    };
    let removed = tokio::task::spawn_blocking(move || {
        crate::cgroup::Cgroup::existing(&path).and_then(|cgroup| cgroup.remove())
    })
    .await;
    match removed {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            tracing::warn!(container_id = %id, error = format!("{err:#}"), "container cgroup left behind")
        }
        Err(err) => tracing::warn!(container_id = %id, error = %err, "cgroup removal failed"),
    }
}

fn unmount_rootfs(bundle: &Path) -> anyhow::Result<()> {
    crate::mount::unmount_all(&bundle.join("rootfs"))
}

#[async_trait]
impl ContainerRuntime for OciRuntime {
    async fn create(&self, container: &CreateContainer) -> Result<Spawned> {
        let id = &container.id;
        let bundle = &container.bundle;
        if !bundle.join("config.json").is_file() {
            return Err(Error::InvalidArgument(format!(
                "bundle {} of container {id:?} has no config.json",
                bundle.display()
            )));
        }
        crate::mount::mount_rootfs(bundle, &container.rootfs).await?;

        let pid_file = bundle.join("init.pid");
        let mut args = vec![
            "create".to_string(),
            "--bundle".into(),
            bundle.display().to_string(),
            "--pid-file".into(),
            pid_file.display().to_string(),
        ];
        args.extend(self.driver.engine.create_flags.iter().cloned());
        let created = match self.driver.engine.processes {
            Processes::Host => {
                self.run_attached("create", id, args, &container.stdio)
                    .await
            }
            // The kernel wires the container to the stdio of `start`.
            Processes::Kernel => {
                args.push(id.clone());
                self.run_with_stdio("create", id, &[], args, ProcessFds::default())
                    .await
                    .map(|()| None)
            }
        };
        let created = match created {
            Ok(console) => Self::read_pid(&pid_file).await.map(|pid| (pid, console)),
            Err(err) => Err(err),
        };
        let (pid, console) = match created {
            Ok(created) => created,
            Err(err) => {
                let _ = self.run("delete", id, &["delete", "--force", id]).await;
                remove_leftover_cgroup(id, bundle).await;
                let _ = unmount_rootfs(bundle);
                return Err(err);
            }
        };
        self.bundles().insert(id.clone(), bundle.clone());
        let exit = match self.driver.engine.processes {
            Processes::Host => reaper::watch(pid),
            Processes::Kernel => {
                let (sender, receiver) = oneshot::channel();
                let pending = PendingStart {
                    exit: sender,
                    stdio: container.stdio.clone(),
                };
                self.pending_starts().insert(id.clone(), pending);
                receiver
            }
        };
        Ok(Spawned {
            pid,
            exit,
            console,
            oom: watch_oom(id, bundle),
        })
    }

    async fn start(&self, id: &str) -> Result<Option<crate::io::Console>> {
        if self.driver.engine.processes == Processes::Host {
            self.run("start", id, &["start", id]).await?;
            return Ok(None);
        }
        let pending = self.pending_starts().remove(id);
        let Some(pending) = pending else {
            return Err(Error::FailedPrecondition(format!(
                "container {id:?} is not waiting to start"
            )));
        };
        match self
            .run_attached("start", id, vec!["start".into()], &pending.stdio)
            .await
        {
            Ok(console) => {
                tokio::spawn(
                    self.driver
                        .clone()
                        .watch_kernel_exit(id.to_string(), pending.exit),
                );
                Ok(console)
            }
            Err(err) => {
                // A container that failed to start is over: out of the kernel at once (a
                // half-started container can upset the next one the kernel adds), and its
                // exit recorded, so that signals to it are answered as for any exited one.
                if let Err(delete) = self.run("delete", id, &["delete", "--force", id]).await {
                    tracing::warn!(container_id = %id, error = %delete, "cannot remove a container that failed to start");
                }
                let _ = pending.exit.send(ExitStatus::now(UNKNOWN_EXIT));
                Err(err)
            }
        }
    }

    async fn exec(&self, process: &ExecProcess) -> Result<Spawned> {
        let id = &process.container_id;
        let spec_file = self.scratch("process.json");
        tokio::fs::write(&spec_file, &process.spec)
            .await
            .with_context(|| format!("write {}", spec_file.display()))?;
        let pid_file = self.scratch("exec.pid");
        let internal_pid_file = self.scratch("exec-internal.pid");
        let mut args = vec![
            "exec".to_string(),
            "--detach".into(),
            "--process".into(),
            spec_file.display().to_string(),
            "--pid-file".into(),
            pid_file.display().to_string(),
        ];
        if self.driver.engine.processes == Processes::Kernel {
            args.extend([
                "--internal-pid-file".into(),
                internal_pid_file.display().to_string(),
            ]);
        }
        let what = format!("exec {:?}", process.exec_id);
        let result = self.run_attached(&what, id, args, &process.stdio).await;
        let _ = tokio::fs::remove_file(&spec_file).await;
        let console = result?;
        let pid = Self::read_pid(&pid_file).await?;
        // Registered before anything can reap it: an exit that came first is kept.
        let mut exit = reaper::watch(pid);
        if self.driver.engine.processes == Processes::Kernel {
            let internal = Self::read_pid(&internal_pid_file).await?;
            self.kernel_execs().insert(pid, (id.clone(), internal));
            // The host-side `exec` relays the process's exit status. Killed itself, it
            // leaves the process running in the kernel, out of anybody's reach: the process
            // goes with it. The exec's entry goes with its exit, so that probes exec'd
            // every few seconds into a long-running container do not pile up.
            let (forward, forwarded) = oneshot::channel();
            let execs = self.kernel_execs.clone();
            let driver = self.driver.clone();
            let container = id.clone();
            let reaped = std::mem::replace(&mut exit, forwarded);
            tokio::spawn(async move {
                let status = reaped.await;
                if status.as_ref().is_ok_and(|s| s.code > 128) {
                    let internal = internal.to_string();
                    let args = ["kill", "--pid", &internal, &container, "9"];
                    if let Err(err) = driver.run("kill", &container, &args).await {
                        tracing::debug!(container_id = %container, pid, error = %err, "exec process already gone");
                    }
                }
                execs
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .remove(&pid);
                if let Ok(status) = status {
                    let _ = forward.send(status);
                }
            });
        }
        Ok(Spawned {
            pid,
            exit,
            console,
            oom: None,
        })
    }

    async fn kill(&self, id: &str, target: KillTarget, signal: u32) -> Result<()> {
        match target {
            KillTarget::Init { all } => {
                if self.driver.engine.processes == Processes::Kernel {
                    // A container the kernel has not started cannot be signalled; it
                    // ends with its removal.
                    let pending = self.pending_starts().remove(id);
                    if let Some(pending) = pending {
                        self.run("delete", id, &["delete", "--force", id]).await?;
                        let _ = pending.exit.send(ExitStatus::now(128 + signal as i32));
                        return Ok(());
                    }
                }
                let signal = signal.to_string();
                let mut args = vec!["kill"];
                if all {
                    args.push("--all");
                }
                args.extend([id, signal.as_str()]);
                self.run("kill", id, &args).await.map(drop)
            }
            KillTarget::Exec(pid) => {
                if self.driver.engine.processes == Processes::Kernel {
                    let internal = self.kernel_execs().get(&pid).map(|(_, internal)| *internal);
                    if let Some(internal) = internal {
                        let internal = internal.to_string();
                        let signal = signal.to_string();
                        return self
                            .run("kill", id, &["kill", "--pid", &internal, id, &signal])
                            .await
                            .map(drop);
                    }
                }
                let signal = Signal::try_from(signal as i32)
                    .map_err(|_| Error::InvalidArgument(format!("unknown signal {signal}")))?;
                kill(Pid::from_raw(pid as i32), signal).map_err(|err| {
                    Error::NotFound(format!("exec process {pid} of container {id:?}: {err}"))
                })
            }
        }
    }

    async fn delete(&self, id: &str) -> Result<()> {
        match self.run("delete", id, &["delete", "--force", id]).await {
            Ok(_) | Err(Error::NotFound(_)) => {}
            Err(err) => return Err(err),
        }
        // A container that never ran has no exit to wait for: its removal is its end.
        self.pending_starts().remove(id);
        self.kernel_execs()
            .retain(|_, (container, _)| container != id);
        let bundle = self.bundles().get(id).cloned();
        if let Some(bundle) = bundle {
            unmount_rootfs(&bundle)?;
            self.bundles().remove(id);
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
        if self.driver.engine.processes == Processes::Kernel {
            return Err(Error::Unimplemented(format!(
                "updating the resources of container {id:?} in {}",
                self.driver.engine.name
            )));
        }
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
        stats::to_metrics(&output, crate::cgroup::is_unified())
            .with_context(|| {
                format!(
                    "decode {} stats of container {id:?}",
                    self.driver.engine.name
                )
            })
            .map_err(Error::from)
    }

    async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let output = self.run("ps", id, &["ps", "--format", "json", id]).await?;
        serde_json::from_slice(&output)
            .with_context(|| format!("decode {} ps of container {id:?}", self.driver.engine.name))
            .map_err(Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_come_from_its_log() {
        let dir = std::env::temp_dir().join(format!("kuasar-oci-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log.json");
        std::fs::write(
            &log,
            "{\"level\":\"info\",\"msg\":\"starting\"}\n{\"level\":\"error\",\"msg\":\"exec: \\\"nope\\\": executable file not found in $PATH\"}\n",
        )
        .unwrap();
        assert_eq!(
            engine_error(&log, b"ignored"),
            "exec: \"nope\": executable file not found in $PATH"
        );
        assert_eq!(
            engine_error(&dir.join("missing"), b"plain failure\n"),
            "plain failure"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_containers_are_not_found() {
        let err = classify(
            "runc",
            "kill",
            "c1",
            "container \"c1\" does not exist".into(),
        );
        assert!(matches!(err, Error::NotFound(_)), "{err}");
        let err = classify("runsc", "create", "c1", "exec format error".into());
        assert!(matches!(err, Error::Internal(_)), "{err}");
        assert!(err
            .to_string()
            .contains("runsc create of container \"c1\" failed: exec format error"));
    }

    #[test]
    fn wait_reports_the_exit_status() {
        assert_eq!(wait_status(br#"{"id":"c1","exitStatus":3}"#), Some(3));
        assert_eq!(wait_status(br#"{"id":"c1","exitStatus":137}"#), Some(137));
        assert_eq!(wait_status(b"waiting on container failed"), None);
        assert_eq!(wait_status(br#"{"id":"c1"}"#), None);
    }

    #[test]
    fn missing_binaries_are_named() {
        let engine = OciEngine {
            name: "runsc".into(),
            binary: "/nonexistent/runsc".into(),
            root: "/tmp".into(),
            flags: Vec::new(),
            create_flags: Vec::new(),
            processes: Processes::Kernel,
        };
        let err = engine.check_binary().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/runsc"), "{err}");
    }
}
