//! Container stdio inside the guest: each stream the host addresses as
//! `vsock://<cid>:<port>` becomes a FIFO the container runtime writes to or reads from,
//! and a thread copying between that FIFO and a vsock connection to the host.
//!
//! An output stream outlives its connection: when the host side closes it (the sandboxer
//! restarting), the agent keeps the FIFO open, so the process never sees a broken pipe,
//! and connects again; what the process writes meanwhile waits in the FIFO.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use kuasar_sandbox::io::{copy_until_closed, Console, Stdio};
use kuasar_sandbox::task::{ContainerRuntime, CreateContainer, ExecProcess, KillTarget, Spawned};
use kuasar_sandbox::{Error, Result};
use nix::sys::stat::Mode;
use vsock::{VsockAddr, VsockStream};

use crate::oom::OomEvents;

/// How many container and exec processes are started at once.
const CONCURRENT_STARTS: usize = 2;

/// Pause between attempts to reach the host again, doubled up to [`RECONNECT_MAX`].
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// A [`ContainerRuntime`] whose processes' stdio reaches the host over vsock.
pub struct GuestRuntime<R> {
    inner: R,
    /// OOM kills of the containers, for the host to wait on.
    ooms: Arc<OomEvents>,
    /// Bounds the runc invocations that start processes: each copies runc's 8 MB binary
    /// into memory to protect itself, which a small guest cannot afford many times over.
    starts: tokio::sync::Semaphore,
    /// Where the FIFOs of each container live, in a directory per container.
    io_dir: PathBuf,
}

/// Which way a stream flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// From the host into the process (stdin).
    In,
    /// From the process to the host (stdout, stderr).
    Out,
}

impl<R: ContainerRuntime> GuestRuntime<R> {
    /// Wraps `inner`, keeping FIFOs under `io_dir`.
    pub fn new(inner: R, io_dir: PathBuf, ooms: Arc<OomEvents>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&io_dir).with_context(|| format!("create {}", io_dir.display()))?;
        Ok(Self {
            inner,
            ooms,
            starts: tokio::sync::Semaphore::new(CONCURRENT_STARTS),
            io_dir,
        })
    }

    fn container_dir(&self, id: &str) -> PathBuf {
        self.io_dir.join(id)
    }

    /// Replaces each vsock address of `stdio` with a FIFO bridged to it. Connections are
    /// made before this returns, so a host that is not listening fails the request.
    async fn bridge(&self, container_id: &str, process: &str, stdio: &Stdio) -> Result<Stdio> {
        let dir = self.container_dir(container_id);
        let process = process.to_string();
        let stdio = stdio.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<Stdio> {
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            let mut bridged = stdio.clone();
            for (name, address, direction, slot) in [
                ("stdin", &stdio.stdin, Direction::In, &mut bridged.stdin),
                ("stdout", &stdio.stdout, Direction::Out, &mut bridged.stdout),
                ("stderr", &stdio.stderr, Direction::Out, &mut bridged.stderr),
            ] {
                if address.is_empty() {
                    continue;
                }
                let fifo = dir.join(format!("{process}-{name}"));
                bridge_stream(address, &fifo, direction)
                    .with_context(|| format!("{name} of {process} to {address}"))?;
                *slot = fifo.display().to_string();
            }
            Ok(bridged)
        })
        .await
        .map_err(|err| Error::Internal(anyhow::anyhow!("stdio bridge task: {err}")))?
        .map_err(Error::Internal)
    }

    /// Ends the copies still waiting for their process, then removes the container's FIFOs.
    fn remove_fifos(&self, id: &str) {
        let dir = self.container_dir(id);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            release(&entry.path());
        }
        if let Err(err) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(container_id = %id, error = %err, "cannot remove stdio FIFOs");
        }
    }
}

/// Creates `fifo` and starts copying between it and a new connection to `address`.
fn bridge_stream(address: &str, fifo: &Path, direction: Direction) -> anyhow::Result<()> {
    let (cid, port) = vmm_task::stdio::parse(address)
        .with_context(|| format!("{address:?} is not a vsock://<cid>:<port> address"))?;
    match nix::unistd::mkfifo(fifo, Mode::from_bits_truncate(0o600)) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(err) => return Err(err).with_context(|| format!("create FIFO {}", fifo.display())),
    }
    let stream = VsockStream::connect(&VsockAddr::new(cid, port))
        .with_context(|| format!("connect to vsock {cid}:{port}"))?;
    let fifo = fifo.to_path_buf();
    std::thread::Builder::new()
        .name(format!("stdio-{port}"))
        .spawn(move || {
            // Opening blocks until the runtime opens the other end.
            let result = match direction {
                Direction::Out => {
                    File::open(&fifo).map(|from| forward_output(&from, stream, cid, port))
                }
                Direction::In => OpenOptions::new().write(true).open(&fifo).map(|mut to| {
                    copy_until_closed(&mut &stream, &mut to);
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                }),
            };
            if let Err(err) = result {
                tracing::warn!(fifo = %fifo.display(), error = %err, "cannot open FIFO");
            }
        })
        .context("start stdio copy")?;
    Ok(())
}

/// Copies a process's output from `from` to the host until the process closes it,
/// connecting again to host port `port` whenever the host drops the connection.
fn forward_output(from: &File, mut stream: VsockStream, cid: u32, port: u32) {
    let mut buffer = [0u8; 32 * 1024];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: from.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            // The host never writes on an output stream: the connection turns readable
            // only when the host closes it.
            libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfd structs for the duration of the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if fds[1].revents != 0 {
            stream = reconnect(cid, port);
            continue;
        }
        if fds[0].revents == 0 {
            continue;
        }
        let read = match (&mut &*from).read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let mut written = 0;
        while written < read {
            match (&stream).write(&buffer[written..read]) {
                Ok(n) if n > 0 => written += n,
                _ => stream = reconnect(cid, port),
            }
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Connects to host port `port`, trying until the host listens again.
fn reconnect(cid: u32, port: u32) -> VsockStream {
    tracing::info!(port, "the host closed an output stream: connecting again");
    let mut pause = RECONNECT_FIRST;
    loop {
        match VsockStream::connect(&VsockAddr::new(cid, port)) {
            Ok(stream) => return stream,
            Err(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(RECONNECT_MAX);
            }
        }
    }
}

/// Unblocks a copy thread still waiting to open `fifo`: a non-blocking open of the other
/// end succeeds only while somebody waits, and closing it at once ends the copy.
fn release(fifo: &Path) {
    for write in [true, false] {
        let _ = OpenOptions::new()
            .read(!write)
            .write(write)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo);
    }
}

#[async_trait]
impl<R: ContainerRuntime> ContainerRuntime for GuestRuntime<R> {
    async fn create(&self, container: &CreateContainer) -> Result<Spawned> {
        let mut container = container.clone();
        container.stdio = self.bridge(&container.id, "init", &container.stdio).await?;
        let created = {
            let _start = self.starts.acquire().await;
            self.inner.create(&container).await
        };
        match created {
            Ok(mut spawned) => {
                // The host asks the agent for OOM kills; the guest's own events go nowhere.
                if let Some(oom) = spawned.oom.take() {
                    self.ooms.watch(&container.id, oom);
                }
                Ok(spawned)
            }
            Err(err) => {
                self.remove_fifos(&container.id);
                Err(err)
            }
        }
    }

    async fn start(&self, id: &str) -> Result<Option<Console>> {
        let _start = self.starts.acquire().await;
        self.inner.start(id).await
    }

    async fn exec(&self, process: &ExecProcess) -> Result<Spawned> {
        let mut process = process.clone();
        let name = format!("exec-{}", process.exec_id);
        process.stdio = self
            .bridge(&process.container_id, &name, &process.stdio)
            .await?;
        let _start = self.starts.acquire().await;
        self.inner.exec(&process).await
    }

    async fn kill(&self, id: &str, target: KillTarget, signal: u32) -> Result<()> {
        self.inner.kill(id, target, signal).await
    }

    async fn delete(&self, id: &str) -> Result<()> {
        self.inner.delete(id).await?;
        self.ooms.remove(id);
        self.remove_fifos(id);
        Ok(())
    }

    async fn pause(&self, id: &str) -> Result<()> {
        self.inner.pause(id).await
    }

    async fn resume(&self, id: &str) -> Result<()> {
        self.inner.resume(id).await
    }

    async fn update(&self, id: &str, resources: &[u8]) -> Result<()> {
        self.inner.update(id, resources).await
    }

    async fn stats(&self, id: &str) -> Result<Any> {
        self.inner.stats(id).await
    }

    async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        self.inner.pids(id).await
    }
}
