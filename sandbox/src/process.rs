//! Processes a sandboxer finds again after a restart: they are no longer its children,
//! so their exits come from a pidfd, and a pid is trusted only together with the start
//! time it had when it was recorded (a pid alone may have been reused since).

use std::os::fd::{FromRawFd, OwnedFd};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::reaper::{ExitReceiver, ExitStatus};

/// Exit code reported for a process whose status cannot be known (not our child).
pub const UNKNOWN_EXIT: i32 = 255;

/// A process as recorded: its pid and when it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    /// Host pid.
    pub pid: u32,
    /// Start time in clock ticks after boot (`/proc/<pid>/stat`, field 22).
    pub start_time: u64,
}

impl ProcessId {
    /// Identifies the running process `pid`.
    pub fn of(pid: u32) -> anyhow::Result<Self> {
        let start_time =
            start_time(pid).with_context(|| format!("process {pid} is not running"))?;
        Ok(Self { pid, start_time })
    }

    /// Whether the recorded process still runs (and its pid was not reused).
    pub fn is_alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time)
    }

    /// Waits until the process is gone, at most `limit`; whether it is.
    pub async fn wait_gone(&self, limit: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.is_alive() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        true
    }

    /// Signals the process if it is still the recorded one.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if self.is_alive() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), signal);
        }
    }
}

/// A command running this process's own binary (the namespace holder, the task relay,
/// a wasm worker). It executes `/proc/self/exe`, which still names the binary this
/// process runs after a package upgrade replaced the file on disk; `argv[0]` keeps the
/// binary's name for `ps`.
pub fn own_binary() -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new("/proc/self/exe");
    if let Ok(path) = std::env::current_exe() {
        command.arg0(path);
    }
    command
}

/// Reads the first line a helper started from [`own_binary`] writes on its stdout (its
/// report that it is ready), at most `timeout`; `what` names the helper in errors.
pub async fn read_report(
    child: &mut std::process::Child,
    timeout: std::time::Duration,
    what: &str,
) -> anyhow::Result<String> {
    use tokio::io::AsyncBufReadExt;
    let stdout = child
        .stdout
        .take()
        .with_context(|| format!("{what}'s stdout"))?;
    let report = async {
        let stdout = tokio::net::unix::pipe::Receiver::from_owned_fd(stdout.into())?;
        let mut line = String::new();
        tokio::io::BufReader::new(stdout)
            .read_line(&mut line)
            .await?;
        Ok::<_, std::io::Error>(line)
    };
    tokio::time::timeout(timeout, report)
        .await
        .with_context(|| format!("{what} did not report within {timeout:?}"))?
        .with_context(|| format!("read the report of the {what}"))
}

/// What a helper that failed wrote on its stderr (read for at most two seconds).
pub async fn failure_output(child: &mut std::process::Child) -> String {
    let Some(stderr) = child.stderr.take() else {
        return String::new();
    };
    let Ok(stderr) = tokio::net::unix::pipe::Receiver::from_owned_fd(stderr.into()) else {
        return String::new();
    };
    let mut message = String::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        tokio::io::AsyncReadExt::read_to_string(
            &mut tokio::io::BufReader::new(stderr),
            &mut message,
        ),
    )
    .await;
    message.trim().to_string()
}

/// Points this process's stdin, stdout and stderr at `/dev/null`: a helper does so once
/// it has reported, so that it holds no pipe of the sandboxer that started it.
pub fn detach_stdio() -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("open /dev/null")?;
    for fd in 0..=2 {
        // SAFETY: dup2 onto the standard descriptors of this process, from a descriptor
        // that stays open for the call.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(std::io::Error::last_os_error()).context("redirect stdio to /dev/null");
        }
    }
    Ok(())
}

/// The pids in `/proc`, this process's own left out.
fn other_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id())
        .collect()
}

/// The processes with an argument containing `text` (a path of the sandboxer's own state,
/// which names the processes a sandboxer started for one pod).
pub fn naming(text: &str) -> Vec<ProcessId> {
    other_pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|raw| {
                raw.split(|b| *b == 0)
                    .any(|arg| String::from_utf8_lossy(arg).contains(text))
            })
        })
        .filter_map(|pid| ProcessId::of(pid).ok())
        .collect()
}

/// The processes in a cgroup named `name` (the last component of its path), with that
/// cgroup's path as the first hierarchy in `/proc/<pid>/cgroup` lists it.
pub fn in_cgroup_named(name: &str) -> Vec<(ProcessId, String)> {
    let suffix = format!("/{name}");
    other_pids()
        .into_iter()
        .filter_map(|pid| {
            let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
            let path = cgroups
                .lines()
                .filter_map(|line| line.splitn(3, ':').nth(2))
                .find(|path| path.ends_with(&suffix))?
                .to_string();
            Some((ProcessId::of(pid).ok()?, path))
        })
        .collect()
}

/// Start time of process `pid` in clock ticks after boot; `None` when it is gone (a
/// zombie counts as gone).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is parenthesised and may hold spaces and parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // fields[0] is field 3 (the state), so field 22 is fields[19].
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Resolves when process `pid` ends, whoever reaps it. The status is unknown (a process
/// that is not our child cannot be waited for): it is reported as [`UNKNOWN_EXIT`].
pub fn watch_end(pid: u32) -> anyhow::Result<ExitReceiver> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no
    // memory of ours is involved.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("pidfd_open {pid}"));
    }
    // SAFETY: the descriptor was just returned to us and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open, and always the same
    // descriptor, until the AsyncFd is dropped.
    let fd = unsafe { tokio::io::unix::AsyncFd::register(fd) }
        .map_err(|err| anyhow::anyhow!("watch the pidfd of {pid}: {err}"))?;
    let (sender, receiver) = oneshot::channel();
    tokio::spawn(async move {
        // A pidfd becomes readable when its process terminates.
        let _ = fd.readable().await;
        let _ = sender.send(ExitStatus::now(UNKNOWN_EXIT));
    });
    Ok(receiver)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_identified_and_alive() {
        let me = ProcessId::of(std::process::id()).unwrap();
        assert!(me.is_alive());
        let reused = ProcessId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(
            !reused.is_alive(),
            "a pid with another start time is not ours"
        );
    }

    // The tests of this crate share one process whose reaper collects every child, so
    // children here are started and awaited through it, never waited for directly.

    #[tokio::test]
    async fn processes_are_found_by_their_arguments() {
        use std::os::unix::process::CommandExt;
        crate::reaper::start().unwrap();
        let marker = format!("kuasar-process-test-{}", std::process::id());
        let (mut child, exit) =
            crate::reaper::spawn(std::process::Command::new("sleep").arg0(&marker).arg("5"))
                .unwrap();
        // Until the child has exec'd, its command line is still ours: look again for a
        // while rather than once.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut found = naming(&marker);
        while found.is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            found = naming(&marker);
        }
        child.kill().unwrap();
        exit.await.unwrap();
        assert_eq!(
            found.iter().map(|p| p.pid).collect::<Vec<_>>(),
            vec![child.id()]
        );
        assert!(naming("kuasar-no-such-argument-anywhere-0").is_empty());
    }

    #[tokio::test]
    async fn end_of_a_process_is_seen() {
        crate::reaper::start().unwrap();
        let (child, exit) =
            crate::reaper::spawn(std::process::Command::new("sleep").arg("0.2")).unwrap();
        let id = ProcessId::of(child.id()).unwrap();
        let end = watch_end(child.id()).unwrap();
        let status = tokio::time::timeout(std::time::Duration::from_secs(5), end)
            .await
            .expect("the end of the process was not seen")
            .unwrap();
        assert_eq!(status.code, UNKNOWN_EXIT);
        assert_eq!(exit.await.unwrap().code, 0);
        assert!(!id.is_alive());
    }
}
