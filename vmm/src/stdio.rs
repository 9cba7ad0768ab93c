//! Container stdio on the host side of the VM boundary.
//!
//! For each stream of a process the host listens on a hybrid vsock port of the VM
//! (a unix socket `<uds>_<port>` that vhost-device-vsock connects guest connections to)
//! and tells the agent to connect there. Output is copied from the connection into
//! containerd's FIFO, input from containerd's FIFO into the connection; each copy ends
//! with its stream.
//!
//! Each output stream being copied is recorded in the VM's directory, so that a restarted
//! sandboxer listens again for the output streams of running processes: the agent keeps
//! their FIFOs open and reconnects. Input streams are not carried over a restart.

use std::fs::{File, OpenOptions};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context;
use kuasar_sandbox::io::{copy_until_closed, Stdio};
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;

/// How long the agent gets to connect a stream once asked to.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a restarted sandboxer waits for the agent to reconnect a recorded stream;
/// a stream whose process ended meanwhile never is.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// First hybrid vsock port handed out for stdio.
const FIRST_PORT: u32 = 10_000;

/// Hands out the VM's stdio ports and starts the copies.
#[derive(Debug)]
pub struct StdioPorts {
    uds: PathBuf,
    next: AtomicU32,
    /// One record per stream being copied, named by its port.
    records: PathBuf,
    /// The process holding containerd's output FIFOs open across a restart.
    fifo_keeper: Option<PathBuf>,
}

/// A stream being copied, as recorded for a restarted sandboxer.
#[derive(Debug, Serialize, Deserialize)]
struct StreamRecord {
    fifo: PathBuf,
    direction: Direction,
}

/// Which way a stream flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Direction {
    /// containerd's FIFO into the guest (stdin).
    In,
    /// The guest into containerd's FIFO (stdout, stderr).
    Out,
}

impl StdioPorts {
    /// Ports of the VM whose hybrid vsock socket is `uds`, recording streams in `records`.
    /// `fifo_keeper` is asked to hold each output FIFO while its stream is copied.
    pub fn new(
        uds: PathBuf,
        records: PathBuf,
        fifo_keeper: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&records)
            .with_context(|| format!("create {}", records.display()))?;
        Ok(Self {
            uds,
            next: AtomicU32::new(FIRST_PORT),
            records,
            fifo_keeper,
        })
    }

    /// The ports of a VM an earlier run of the sandboxer served: listens again for the
    /// recorded output streams, which the agent reconnects.
    pub fn recover(
        uds: PathBuf,
        records: PathBuf,
        fifo_keeper: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let ports = Self::new(uds, records, fifo_keeper)?;
        let entries = std::fs::read_dir(&ports.records)
            .with_context(|| format!("read {}", ports.records.display()))?;
        let mut next = FIRST_PORT;
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(port) = path
                .file_stem()
                .and_then(|stem| stem.to_str())
                .and_then(|stem| stem.parse::<u32>().ok())
            else {
                continue;
            };
            next = next.max(port + 1);
            let record: StreamRecord = match kuasar_sandbox::state::read_json(&path) {
                Ok(record) => record,
                Err(err) => {
                    // Its FIFO is unknown: the keeper holds it until the pod ends.
                    tracing::warn!(record = %path.display(), error = format!("{err:#}"), "unreadable stdio record: the stream's output is lost");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            };
            tracing::info!(port, fifo = %record.fifo.display(), "listening again for an output stream");
            ports.listen(port, record, RECONNECT_TIMEOUT)?;
        }
        ports.next.store(next, Ordering::Relaxed);
        Ok(ports)
    }

    fn record_path(&self, port: u32) -> PathBuf {
        self.records.join(format!("{port}.json"))
    }

    /// Listens on `port` and copies the stream once the guest connects.
    fn listen(&self, port: u32, record: StreamRecord, timeout: Duration) -> anyhow::Result<()> {
        let socket = crate::vsock::listener_path(&self.uds, port);
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .with_context(|| format!("listen for stdio on {}", socket.display()))?;
        let path = self.record_path(port);
        // Only output streams are carried over a restart.
        if record.direction == Direction::Out {
            kuasar_sandbox::state::write_json(&path, &record)?;
        }
        let keeper = self.fifo_keeper.clone();
        tokio::spawn(copy_when_connected(
            listener, socket, record, path, keeper, timeout,
        ));
        Ok(())
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
            let record = StreamRecord {
                fifo: PathBuf::from(fifo),
                direction,
            };
            self.listen(port, record, CONNECT_TIMEOUT)?;
            *slot = vmm_task::stdio::host_address(port);
        }
        Ok(guest)
    }
}

/// Copies the stream once the guest connects, then forgets its record.
async fn copy_when_connected(
    listener: UnixListener,
    socket: PathBuf,
    stream: StreamRecord,
    record: PathBuf,
    keeper: Option<PathBuf>,
    timeout: Duration,
) {
    let (fifo, direction) = (stream.fifo.clone(), stream.direction);
    copy_connection(listener, socket, stream, keeper.clone(), timeout).await;
    // However the copy ended (the stream's end, a guest that never connected, an error),
    // containerd's reader may see the end of the stream only once the keeper lets go.
    if direction == Direction::Out {
        let _ =
            tokio::task::spawn_blocking(move || keep_fifo(keeper.as_deref(), &fifo, false)).await;
    }
    let _ = std::fs::remove_file(&record);
}

async fn copy_connection(
    listener: UnixListener,
    socket: PathBuf,
    record: StreamRecord,
    keeper: Option<PathBuf>,
    timeout: Duration,
) {
    let StreamRecord { fifo, direction } = record;
    let accepted = tokio::time::timeout(timeout, listener.accept()).await;
    drop(listener);
    let _ = std::fs::remove_file(&socket);
    let stream = match accepted {
        Ok(Ok((stream, _))) => {
            tracing::debug!(socket = %socket.display(), "stdio stream connected");
            stream
        }
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
    let _ = tokio::task::spawn_blocking(move || {
        copy_stream(stream, &fifo, direction, keeper.as_deref())
    })
    .await;
}

/// Asks the keeper, if any, to hold or let go of `fifo`; a failure only costs the
/// stream's survival across a restart.
fn keep_fifo(keeper: Option<&Path>, fifo: &Path, hold: bool) {
    let Some(keeper) = keeper else {
        return;
    };
    if let Err(err) = kuasar_sandbox::relay::keep_fifo(keeper, fifo, hold) {
        tracing::warn!(fifo = %fifo.display(), error = format!("{err:#}"), "output FIFO not kept across a restart");
    }
}

fn copy_stream(
    mut stream: StdUnixStream,
    fifo: &Path,
    direction: Direction,
    keeper: Option<&Path>,
) {
    match direction {
        Direction::Out => {
            // Read-write: never blocks, and containerd's reader sees the end of the
            // stream when this copy closes its end (and the keeper lets go of its own).
            match OpenOptions::new().read(true).write(true).open(fifo) {
                Ok(mut to) => {
                    keep_fifo(keeper, fifo, true);
                    copy_until_closed(&mut stream, &mut to);
                }
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
