//! Standard IO of container processes, wired to the FIFOs containerd creates.
//!
//! Without a terminal, stdout and stderr FIFOs are handed to the process itself: its
//! output reaches containerd with no copy and no helper task. Stdin goes through a pipe
//! fed from the FIFO, so the process sees end-of-file when containerd closes its side.
//! With a terminal, the pty master is received from the runtime and copied both ways.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

/// The FIFO paths of one process, as containerd sends them; empty means not attached.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stdio {
    /// Path of the stdin FIFO.
    pub stdin: String,
    /// Path of the stdout FIFO.
    pub stdout: String,
    /// Path of the stderr FIFO.
    pub stderr: String,
    /// Whether the process runs on a terminal.
    pub terminal: bool,
}

/// Descriptors to hand to a process as its fds 0, 1 and 2 (`None`: `/dev/null`).
#[derive(Debug, Default)]
pub struct ProcessFds {
    /// The process's stdin.
    pub stdin: Option<OwnedFd>,
    /// The process's stdout.
    pub stdout: Option<OwnedFd>,
    /// The process's stderr.
    pub stderr: Option<OwnedFd>,
}

impl Stdio {
    /// Opens the FIFOs for a process that runs without a terminal.
    ///
    /// Output FIFOs are opened read-write, which never blocks and never fails for want
    /// of a reader; the process holds the only writer once our copy is dropped.
    pub fn open_direct(&self) -> anyhow::Result<ProcessFds> {
        let open_output = |path: &str| -> anyhow::Result<Option<OwnedFd>> {
            if path.is_empty() {
                return Ok(None);
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .with_context(|| format!("open output fifo {path}"))?;
            Ok(Some(file.into()))
        };
        let stdin = if self.stdin.is_empty() {
            None
        } else {
            Some(forward_stdin(PathBuf::from(&self.stdin))?)
        };
        Ok(ProcessFds {
            stdin,
            stdout: open_output(&self.stdout)?,
            stderr: open_output(&self.stderr)?,
        })
    }

    /// Starts copying between a process's pty `master` and the FIFOs.
    ///
    /// Returns once both copies are running; the output copy ends when the terminal's
    /// last slave closes, that is when the process and its children are gone.
    pub fn attach_console(&self, master: OwnedFd) -> anyhow::Result<Console> {
        let master = File::from(master);
        if !self.stdout.is_empty() {
            let mut reader = master.try_clone().context("duplicate pty master")?;
            let mut fifo = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.stdout)
                .with_context(|| format!("open output fifo {}", self.stdout))?;
            std::thread::Builder::new()
                .name("pty-out".into())
                .spawn(move || copy_until_closed(&mut reader, &mut fifo))
                .context("start pty output copy")?;
        }
        if !self.stdin.is_empty() {
            let mut writer = master.try_clone().context("duplicate pty master")?;
            let path = PathBuf::from(&self.stdin);
            std::thread::Builder::new()
                .name("pty-in".into())
                .spawn(move || match File::open(&path) {
                    Ok(mut fifo) => copy_until_closed(&mut fifo, &mut writer),
                    Err(err) => {
                        tracing::warn!(path = %path.display(), error = %err, "open stdin fifo")
                    }
                })
                .context("start pty input copy")?;
        }
        Ok(Console {
            master: Arc::new(master),
        })
    }
}

/// Feeds a pipe from the stdin FIFO at `path` and returns the pipe's read end.
///
/// The FIFO is opened blocking in a thread of its own, so the copy starts whenever
/// containerd opens its writer and ends when containerd closes it.
fn forward_stdin(path: PathBuf) -> anyhow::Result<OwnedFd> {
    let (reader, writer) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("create stdin pipe")?;
    let mut writer = File::from(writer);
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || match File::open(&path) {
            Ok(mut fifo) => copy_until_closed(&mut fifo, &mut writer),
            Err(err) => tracing::warn!(path = %path.display(), error = %err, "open stdin fifo"),
        })
        .context("start stdin copy")?;
    Ok(reader)
}

/// Copies `from` into `to` until either end closes or fails (EIO from a pty whose last
/// slave closed counts as the end).
pub fn copy_until_closed(from: &mut impl Read, to: &mut impl Write) {
    let mut buffer = [0u8; 32 * 1024];
    loop {
        match from.read(&mut buffer) {
            Ok(0) => return,
            Ok(n) => {
                if to.write_all(&buffer[..n]).is_err() {
                    return;
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            // EIO: the last slave of a pty closed.
            Err(_) => return,
        }
    }
}

/// Unblocks a thread still waiting in `open` on the stdin FIFO at `path`, once the
/// process it fed is gone and no writer will ever come.
pub fn release_stdin(path: &str) {
    if path.is_empty() || !Path::new(path).exists() {
        return;
    }
    // A non-blocking writer open succeeds only while a reader waits; closing it at once
    // gives that reader end-of-file.
    let _ = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
}

/// The pty master of a process running on a terminal.
#[derive(Debug, Clone)]
pub struct Console {
    master: Arc<File>,
}

impl Console {
    /// Sets the terminal's window size.
    pub fn resize(&self, width: u32, height: u32) -> anyhow::Result<()> {
        let size = libc::winsize {
            ws_row: u16::try_from(height).context("terminal height out of range")?,
            ws_col: u16::try_from(width).context("terminal width out of range")?,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize struct that lives for the whole call, on a
        // descriptor we own.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("set terminal size");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::stat::Mode;

    fn fifo(dir: &Path, name: &str) -> String {
        let path = dir.join(name);
        nix::unistd::mkfifo(&path, Mode::from_bits_truncate(0o600)).unwrap();
        path.display().to_string()
    }

    #[test]
    fn output_reaches_the_reader_and_ends_with_the_writer() {
        let dir = tempdir();
        let stdout = fifo(&dir, "out");
        let stdio = Stdio {
            stdout: stdout.clone(),
            ..Default::default()
        };

        // containerd opens its reading end before it asks for the process.
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&stdout)
            .unwrap();
        let fds = stdio.open_direct().unwrap();
        let mut out = File::from(fds.stdout.unwrap());
        out.write_all(b"hello\n").unwrap();
        drop(out);
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        assert_eq!(text, "hello\n");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn stdin_ends_when_the_writer_closes() {
        let dir = tempdir();
        let stdin = fifo(&dir, "in");
        let stdio = Stdio {
            stdin: stdin.clone(),
            ..Default::default()
        };
        let fds = stdio.open_direct().unwrap();

        let mut writer = OpenOptions::new().write(true).open(&stdin).unwrap();
        writer.write_all(b"typed").unwrap();
        drop(writer);

        let mut text = String::new();
        File::from(fds.stdin.unwrap())
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "typed");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kuasar-io-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
