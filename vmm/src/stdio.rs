//! Container stdio on the host side of the VM boundary.
//!
//! For each stream of a process the host listens on a hybrid vsock port of the VM
//! (a unix socket `<uds>_<port>` that vhost-device-vsock connects guest connections to)
//! and tells the agent to connect there. Output is copied from the connection into
//! containerd's FIFO, input from containerd's FIFO into the connection; each copy ends
//! with its stream.

use std::fs::{File, OpenOptions};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context;
use kuasar_sandbox::io::{copy_until_closed, Stdio};
use tokio::net::UnixListener;

/// How long the agent gets to connect a stream once asked to.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// First hybrid vsock port handed out for stdio.
const FIRST_PORT: u32 = 10_000;

/// Hands out the VM's stdio ports and starts the copies.
#[derive(Debug)]
pub struct StdioPorts {
    uds: PathBuf,
    next: AtomicU32,
}

/// Which way a stream flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// containerd's FIFO into the guest (stdin).
    In,
    /// The guest into containerd's FIFO (stdout, stderr).
    Out,
}

impl StdioPorts {
    /// Ports of the VM whose hybrid vsock socket is `uds`.
    pub fn new(uds: PathBuf) -> Self {
        Self {
            uds,
            next: AtomicU32::new(FIRST_PORT),
        }
    }

    /// Listens for each stream of `stdio` and returns the stdio to send to the agent:
    /// the same streams as vsock addresses. The copies run until their streams end; a
    /// stream the agent never connects is given up after a timeout.
    pub fn bridge(&self, stdio: &Stdio) -> anyhow::Result<Stdio> {
        let mut guest = stdio.clone();
        for (fifo, direction, slot) in [
            (&stdio.stdin, Direction::In, &mut guest.stdin),
            (&stdio.stdout, Direction::Out, &mut guest.stdout),
            (&stdio.stderr, Direction::Out, &mut guest.stderr),
        ] {
            if fifo.is_empty() {
                continue;
            }
            let port = self.next.fetch_add(1, Ordering::Relaxed);
            let socket = crate::vsock::listener_path(&self.uds, port);
            let _ = std::fs::remove_file(&socket);
            let listener = UnixListener::bind(&socket)
                .with_context(|| format!("listen for stdio on {}", socket.display()))?;
            tokio::spawn(copy_when_connected(
                listener,
                socket,
                PathBuf::from(fifo),
                direction,
            ));
            *slot = vmm_task::stdio::host_address(port);
        }
        Ok(guest)
    }
}

async fn copy_when_connected(
    listener: UnixListener,
    socket: PathBuf,
    fifo: PathBuf,
    direction: Direction,
) {
    let accepted = tokio::time::timeout(CONNECT_TIMEOUT, listener.accept()).await;
    drop(listener);
    let _ = std::fs::remove_file(&socket);
    let stream = match accepted {
        Ok(Ok((stream, _))) => stream,
        Ok(Err(err)) => {
            tracing::warn!(socket = %socket.display(), error = %err, "stdio connection failed");
            return;
        }
        Err(_) => {
            tracing::debug!(socket = %socket.display(), "the guest never connected this stream");
            return;
        }
    };
    let stream = match stream
        .into_std()
        .and_then(|s| s.set_nonblocking(false).map(|()| s))
    {
        Ok(stream) => stream,
        Err(err) => {
            tracing::warn!(error = %err, "cannot take over a stdio connection");
            return;
        }
    };
    // FIFOs block; each copy gets a thread of its own.
    let _ = tokio::task::spawn_blocking(move || copy_stream(stream, &fifo, direction)).await;
}

fn copy_stream(mut stream: StdUnixStream, fifo: &Path, direction: Direction) {
    match direction {
        Direction::Out => {
            // Read-write: never blocks, and containerd's reader sees the end of the
            // stream when this copy closes its end.
            match OpenOptions::new().read(true).write(true).open(fifo) {
                Ok(mut to) => copy_until_closed(&mut stream, &mut to),
                Err(err) => {
                    tracing::warn!(fifo = %fifo.display(), error = %err, "cannot open output FIFO")
                }
            }
        }
        Direction::In => {
            match File::open(fifo) {
                Ok(mut from) => copy_until_closed(&mut from, &mut stream),
                Err(err) => {
                    tracing::warn!(fifo = %fifo.display(), error = %err, "cannot open stdin FIFO")
                }
            }
            // The guest process sees the end of its input.
            let _ = stream.shutdown(std::net::Shutdown::Write);
        }
    }
}
