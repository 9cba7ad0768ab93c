//! Process exits for the whole sandboxer.
//!
//! The sandboxer is a child subreaper: container processes that runc double-forks, and
//! the namespace holders of pods, are re-parented to it when their parent exits. One
//! SIGCHLD handler reaps every child and hands each exit to whoever watches that pid.
//!
//! Every child the sandboxer starts must go through [`spawn`]: it holds the reaper's lock
//! across fork and registration, so no exit can be reaped before anyone watches for it.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::process::{Child, Command};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How long an exit nobody watched for is kept, for a watcher that learns its pid late
/// (an exec'd process can exit before runc's pid file is read).
const UNCLAIMED_TTL: Duration = Duration::from_secs(60);

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, or 128 + signal number for a process killed by a signal.
    pub code: i32,
    /// When the exit was reaped.
    pub at: SystemTime,
}

impl ExitStatus {
    /// An exit that happened now with `code`.
    pub fn now(code: i32) -> Self {
        Self {
            code,
            at: SystemTime::now(),
        }
    }
}

/// Receives the exit of one watched process.
pub type ExitReceiver = oneshot::Receiver<ExitStatus>;

#[derive(Default)]
struct Exits {
    watchers: HashMap<i32, oneshot::Sender<ExitStatus>>,
    unclaimed: HashMap<i32, (ExitStatus, Instant)>,
}

fn exits() -> MutexGuard<'static, Exits> {
    static EXITS: OnceLock<Mutex<Exits>> = OnceLock::new();
    EXITS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Makes this process a child subreaper and starts reaping on SIGCHLD.
///
/// Call once, from within the tokio runtime, before starting any child.
pub fn start() -> std::io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }

    let mut sigchld = signal(SignalKind::child())?;
    tokio::spawn(async move {
        loop {
            reap_all();
            if sigchld.recv().await.is_none() {
                break;
            }
        }
    });
    Ok(())
}

/// Reaps every exited child and delivers the exits.
fn reap_all() {
    let mut exits = exits();
    loop {
        let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, code),
            Ok(WaitStatus::Signaled(pid, signal, _)) => (pid, 128 + signal as i32),
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(err) => {
                tracing::warn!(error = %err, "waitpid failed");
                break;
            }
        };
        let (pid, code) = (status.0.as_raw(), status.1);
        let exit = ExitStatus::now(code);
        tracing::debug!(pid, code, "reaped process");
        match exits.watchers.remove(&pid) {
            Some(watcher) => {
                let _ = watcher.send(exit);
            }
            None => {
                exits.unclaimed.insert(pid, (exit, Instant::now()));
            }
        }
    }
    exits
        .unclaimed
        .retain(|_, (_, reaped)| reaped.elapsed() < UNCLAIMED_TTL);
}

/// Watches the process `pid`, a child (or re-parented descendant) of the sandboxer.
///
/// If it exited shortly before, the exit is delivered at once.
pub fn watch(pid: u32) -> ExitReceiver {
    let (sender, receiver) = oneshot::channel();
    let pid = pid as i32;
    let mut exits = exits();
    match exits.unclaimed.remove(&pid) {
        Some((exit, _)) => {
            let _ = sender.send(exit);
        }
        None => {
            exits.watchers.insert(pid, sender);
        }
    }
    receiver
}

/// Starts `command` as a watched child.
///
/// The child is never waited for through [`Child`]; its exit arrives on the receiver.
pub fn spawn(command: &mut Command) -> std::io::Result<(Child, ExitReceiver)> {
    let (sender, receiver) = oneshot::channel();
    let mut exits = exits();
    let child = command.spawn()?;
    let pid = child.id() as i32;
    exits.unclaimed.remove(&pid);
    exits.watchers.insert(pid, sender);
    Ok((child, receiver))
}

/// Output of a command run to completion.
#[derive(Debug)]
pub struct Output {
    /// How the command exited.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
}

/// Runs `command` with piped stdout and stderr and collects both.
pub async fn output(command: &mut Command) -> std::io::Result<Output> {
    use std::process::Stdio;

    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    if command.get_program().is_empty() {
        return Err(std::io::Error::other("empty program"));
    }
    let (mut child, exit) = spawn(command)?;
    let stdout = child.stdout.take().map(OwnedFd::from);
    let stderr = child.stderr.take().map(OwnedFd::from);

    let (stdout, stderr) = tokio::try_join!(read_pipe(stdout), read_pipe(stderr))?;
    let status = exit
        .await
        .map_err(|_| std::io::Error::other("reaper dropped the exit of a command"))?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

async fn read_pipe(fd: Option<OwnedFd>) -> std::io::Result<Vec<u8>> {
    let mut buffer = Vec::new();
    if let Some(fd) = fd {
        let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?;
        pipe.read_to_end(&mut buffer).await?;
    }
    Ok(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_exit_codes_and_output() {
        start().unwrap();

        let out = output(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]))
            .await
            .unwrap();
        assert_eq!(out.status.code, 3);
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");

        let out = output(Command::new("sh").args(["-c", "kill -9 $$"]))
            .await
            .unwrap();
        assert_eq!(out.status.code, 128 + 9);

        // A grandchild whose parent exits is re-parented to us and still reported.
        let out = output(Command::new("sh").args(["-c", "sleep 0.2 & echo $!"]))
            .await
            .unwrap();
        let grandchild: u32 = String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(10), watch(grandchild))
            .await
            .expect("grandchild exit reported")
            .unwrap();
        assert_eq!(exit.code, 0);
    }

    #[tokio::test]
    async fn missing_binary_is_an_error_not_a_panic() {
        start().unwrap();
        let err = output(&mut Command::new("/nonexistent/kuasar-binary"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }
}
