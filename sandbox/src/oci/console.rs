//! The console socket an OCI runtime hands a new terminal's master end through.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use tokio::net::UnixListener;

/// A listening unix socket for one `--console-socket`; removed when dropped.
pub struct ConsoleSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    /// Listens at `path`.
    pub fn bind(path: &Path) -> anyhow::Result<Self> {
        let listener =
            UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// The socket's path, for the engine's `--console-socket`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits up to `timeout` for the engine to connect and send the pty master.
    pub async fn receive(&self, timeout: Duration) -> anyhow::Result<OwnedFd> {
        let (stream, _) = tokio::time::timeout(timeout, self.listener.accept())
            .await
            .context("the OCI runtime did not connect to the console socket")?
            .context("accept on the console socket")?;
        let stream = stream.into_std().context("console connection")?;
        stream
            .set_nonblocking(false)
            .context("console connection")?;
        stream
            .set_read_timeout(Some(timeout))
            .context("console connection")?;
        tokio::task::spawn_blocking(move || receive_fd(stream.as_raw_fd()))
            .await
            .context("console task")?
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn receive_fd(socket: i32) -> anyhow::Result<OwnedFd> {
    let mut name = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let message = recvmsg::<()>(
        socket,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .context("receive the terminal")?;
    for cmsg in message.cmsgs().context("read control messages")? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(&fd) = fds.first() {
                for &extra in &fds[1..] {
                    // SAFETY: each received descriptor is new and owned by us alone.
                    drop(unsafe { OwnedFd::from_raw_fd(extra) });
                }
                // SAFETY: SCM_RIGHTS installed this descriptor in our table for us alone.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    bail!("the OCI runtime sent no terminal descriptor")
}
