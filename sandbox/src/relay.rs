//! The task relay: a small process per pod that holds containerd's Task API connections
//! while the sandboxer restarts.
//!
//! containerd gives up on a task connection that closes: every call then fails and its
//! pending `Wait`s report the container as exited. So for families whose containers
//! outlive the sandboxer (a microVM's), containerd dials the relay instead, and the relay
//! forwards ttrpc frames to the sandbox's task socket in the sandboxer. When that
//! connection breaks, the relay reconnects once the sandboxer serves the socket again;
//! requests that read state or wait (`Wait`, `State`, `Pids`, `Stats`, `Connect`) are
//! sent again, and any other request that was in flight is answered `UNAVAILABLE`, since
//! it may or may not have been carried out.
//!
//! The relay also keeps containerd's output FIFOs open. containerd stops reading a
//! container's stdout once no writer holds it, so a sandboxer that dies while copying a
//! stream into it would end the container's log for good. The sandboxer asks the relay
//! to hold each output FIFO it copies into (`hold <path>` on the relay's FIFO socket) and
//! to let it go (`release <path>`) once the stream has ended.
//!
//! It is the sandboxer's own binary, re-executed with the hidden `relay-tasks` command;
//! it uses plain threads, no async runtime.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use protobuf::Message;

use crate::process::ProcessId;
use crate::reaper;

/// Name of the hidden command that turns this binary into a relay.
pub const COMMAND: &str = "relay-tasks";

/// What the relay prints once it listens.
const READY_LINE: &str = "relaying";

/// How long a relay may take to listen.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests carried out again on a new connection: they only read state or wait.
const REPLAYABLE: [&str; 5] = ["Wait", "State", "Pids", "Stats", "Connect"];

/// How long a request that cannot be replayed waits for the sandboxer to come back.
const UNAVAILABLE_AFTER: Duration = Duration::from_secs(30);

/// Pause between connection attempts, doubled up to [`RECONNECT_MAX`].
const RECONNECT_FIRST: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// ttrpc framing: a 10-byte header (length, stream id, type, flags), then the payload.
const HEADER_LEN: usize = 10;
const MAX_PAYLOAD: usize = 4 << 20;
const TYPE_REQUEST: u8 = 1;
const TYPE_RESPONSE: u8 = 2;

/// The sockets of one pod's relay.
#[derive(Debug, Clone)]
pub struct RelaySockets {
    /// Where containerd dials the pod's Task API.
    pub tasks: PathBuf,
    /// Where the sandboxer asks for output FIFOs to be held.
    pub fifos: PathBuf,
}

/// Starts a relay listening on `sockets` and forwarding task connections to `upstream`;
/// returns once it listens.
pub async fn spawn(sockets: &RelaySockets, upstream: &Path) -> anyhow::Result<ProcessId> {
    let mut command = crate::process::own_binary();
    command
        .arg(COMMAND)
        .arg(&sockets.tasks)
        .arg(upstream)
        .arg(&sockets.fifos)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (mut child, _exit) = reaper::spawn(&mut command).context("start the task relay")?;
    let pid = child.id();
    let line = match crate::process::read_report(&mut child, READY_TIMEOUT, "task relay").await {
        Ok(line) => line,
        Err(err) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(err);
        }
    };
    if line.trim() != READY_LINE {
        bail!(
            "the task relay failed: {}",
            crate::process::failure_output(&mut child).await
        );
    }
    ProcessId::of(pid)
}

/// Runs the relay and exits when this process was started as one; returns otherwise.
///
/// Call first thing in `main`, before any thread or runtime exists.
pub fn run_if_requested() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some(COMMAND) {
        return;
    }
    let result = match &args[2..] {
        [listen, upstream, fifos] => {
            serve(Path::new(listen), Path::new(upstream), Path::new(fifos))
        }
        _ => Err(anyhow::anyhow!(
            "usage: {COMMAND} <listen socket> <upstream socket> <fifo socket>"
        )),
    };
    match result {
        Ok(()) => std::process::exit(0),
        Err(err) => {
            eprintln!("{err:#}");
            std::process::exit(1);
        }
    }
}

/// Binds a unix socket at `path`, replacing a stale one.
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("remove {}", path.display())),
    }
    UnixListener::bind(path).with_context(|| format!("listen on {}", path.display()))
}

fn serve(listen: &Path, upstream: &Path, fifos: &Path) -> anyhow::Result<()> {
    let listener = bind(listen)?;
    let fifo_listener = bind(fifos)?;
    std::thread::Builder::new()
        .name("fifos".into())
        .spawn(move || keep_fifos(fifo_listener))
        .context("start the FIFO keeper")?;
    println!("{READY_LINE}");
    crate::process::detach_stdio()?;
    for downstream in listener.incoming() {
        let Ok(downstream) = downstream else {
            continue;
        };
        let upstream = upstream.to_path_buf();
        let _ = std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || relay(downstream, upstream));
    }
    Ok(())
}

/// Serves `hold <path>` and `release <path>` requests, one per connection, answered
/// `ok` or `error <reason>`.
fn keep_fifos(listener: UnixListener) {
    let mut held: HashMap<PathBuf, File> = HashMap::new();
    for connection in listener.incoming() {
        let Ok(mut connection) = connection else {
            continue;
        };
        let mut line = String::new();
        if BufReader::new(&connection).read_line(&mut line).is_err() {
            continue;
        }
        let answer = match line.trim_end().split_once(' ') {
            Some(("hold", path)) => hold(&mut held, Path::new(path)),
            Some(("release", path)) => {
                held.remove(Path::new(path));
                Ok(())
            }
            _ => Err(anyhow::anyhow!("unknown request {:?}", line.trim_end())),
        };
        let reply = match answer {
            Ok(()) => "ok\n".to_string(),
            Err(err) => format!("error {err:#}\n"),
        };
        let _ = connection.write_all(reply.as_bytes());
    }
}

/// Opens the FIFO at `path` for writing, unless it is held already.
fn hold(held: &mut HashMap<PathBuf, File>, path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    if held.contains_key(path) {
        return Ok(());
    }
    let metadata =
        std::fs::symlink_metadata(path).with_context(|| format!("{}", path.display()))?;
    if !metadata.file_type().is_fifo() {
        bail!("{} is not a FIFO", path.display());
    }
    // Non-blocking: containerd holds the reading end already; the descriptor only has to
    // exist, nothing is written through it.
    let fifo = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    held.insert(path.to_path_buf(), fifo);
    Ok(())
}

/// Asks the relay serving `socket` to hold (`hold == true`) or let go of the output FIFO
/// at `fifo`.
pub fn keep_fifo(socket: &Path, fifo: &Path, hold: bool) -> anyhow::Result<()> {
    let mut connection = UnixStream::connect(socket)
        .with_context(|| format!("connect to the FIFO keeper {}", socket.display()))?;
    connection.set_read_timeout(Some(READY_TIMEOUT))?;
    let verb = if hold { "hold" } else { "release" };
    writeln!(connection, "{verb} {}", fifo.display())?;
    let mut answer = String::new();
    BufReader::new(&connection).read_line(&mut answer)?;
    match answer.trim_end() {
        "ok" => Ok(()),
        other => bail!(
            "the FIFO keeper refused to {verb} {}: {}",
            fifo.display(),
            other.strip_prefix("error ").unwrap_or(other)
        ),
    }
}

/// One ttrpc frame, header included.
struct Frame {
    bytes: Vec<u8>,
}

impl Frame {
    fn stream_id(&self) -> u32 {
        u32::from_be_bytes([self.bytes[4], self.bytes[5], self.bytes[6], self.bytes[7]])
    }

    fn kind(&self) -> u8 {
        self.bytes[8]
    }

    fn payload(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }

    /// Reads one frame; `None` at the end of the stream.
    fn read(from: &mut impl Read) -> std::io::Result<Option<Self>> {
        let mut header = [0u8; HEADER_LEN];
        match from.read_exact(&mut header) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(err) => return Err(err),
        }
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("ttrpc frame of {len} bytes exceeds {MAX_PAYLOAD}"),
            ));
        }
        let mut bytes = Vec::with_capacity(HEADER_LEN + len);
        bytes.extend_from_slice(&header);
        bytes.resize(HEADER_LEN + len, 0);
        from.read_exact(&mut bytes[HEADER_LEN..])?;
        Ok(Some(Self { bytes }))
    }

    /// An `UNAVAILABLE` response to request `stream_id`.
    fn unavailable(stream_id: u32, message: &str) -> Self {
        let mut response = ttrpc::Response::new();
        response.set_status(ttrpc::get_status(ttrpc::Code::UNAVAILABLE, message));
        Self::response(stream_id, &response)
    }

    fn response(stream_id: u32, response: &ttrpc::Response) -> Self {
        let payload = response.write_to_bytes().unwrap_or_default();
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
        bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&stream_id.to_be_bytes());
        bytes.push(TYPE_RESPONSE);
        bytes.push(0);
        bytes.extend_from_slice(&payload);
        Self { bytes }
    }
}

/// Whether a request frame may be carried out twice.
fn replayable(request: &Frame) -> bool {
    ttrpc::Request::parse_from_bytes(request.payload())
        .is_ok_and(|r| REPLAYABLE.contains(&r.method.as_str()))
}

/// A request containerd is waiting on.
struct Pending {
    frame: Frame,
    replayable: bool,
    /// Written to the current or a former upstream connection.
    sent: bool,
    since: Instant,
}

/// The upstream side of one containerd connection.
#[derive(Default)]
struct Upstream {
    writer: Option<UnixStream>,
    pending: BTreeMap<u32, Pending>,
}

struct Link {
    upstream_path: PathBuf,
    upstream: Mutex<Upstream>,
    downstream: Mutex<UnixStream>,
    closed: AtomicBool,
}

impl Link {
    fn upstream(&self) -> MutexGuard<'_, Upstream> {
        self.upstream
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn to_downstream(&self, frame: &Frame) -> bool {
        let mut downstream = self
            .downstream
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        downstream.write_all(&frame.bytes).is_ok()
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(writer) = self.upstream().writer.take() {
            let _ = writer.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Answers `UNAVAILABLE` to requests that cannot be sent again: those that reached a
    /// connection now lost (`lost`), and those that waited too long for one.
    fn fail_unreplayable(&self, upstream: &mut Upstream, lost: bool) {
        let failed: Vec<u32> = upstream
            .pending
            .iter()
            .filter(|(_, p)| {
                !p.replayable && ((p.sent && lost) || p.since.elapsed() >= UNAVAILABLE_AFTER)
            })
            .map(|(id, _)| *id)
            .collect();
        for stream_id in failed {
            upstream.pending.remove(&stream_id);
            let message = format!(
                "the sandboxer behind {} restarted or is unreachable: the request may not \
                 have been carried out",
                self.upstream_path.display()
            );
            self.to_downstream(&Frame::unavailable(stream_id, &message));
        }
    }
}

/// Relays one containerd connection until containerd closes it.
fn relay(downstream: UnixStream, upstream_path: PathBuf) {
    let Ok(writer) = downstream.try_clone() else {
        return;
    };
    let link = Arc::new(Link {
        upstream_path,
        upstream: Mutex::default(),
        downstream: Mutex::new(writer),
        closed: AtomicBool::new(false),
    });
    let upstream_link = link.clone();
    let upstream = std::thread::Builder::new()
        .name("relay-up".into())
        .spawn(move || keep_upstream(&upstream_link));
    let mut reader = downstream;
    while let Ok(Some(frame)) = Frame::read(&mut reader) {
        let mut upstream = link.upstream();
        if frame.kind() == TYPE_REQUEST {
            let stream_id = frame.stream_id();
            let replayable = replayable(&frame);
            let sent = write_upstream(&mut upstream, &frame);
            upstream.pending.insert(
                stream_id,
                Pending {
                    frame,
                    replayable,
                    sent,
                    since: Instant::now(),
                },
            );
        } else {
            write_upstream(&mut upstream, &frame);
        }
    }
    link.close();
    if let Ok(upstream) = upstream {
        let _ = upstream.join();
    }
}

/// Writes `frame` to the upstream connection, dropping the connection if that fails.
fn write_upstream(upstream: &mut Upstream, frame: &Frame) -> bool {
    let Some(writer) = upstream.writer.as_mut() else {
        return false;
    };
    if writer.write_all(&frame.bytes).is_ok() {
        return true;
    }
    if let Some(writer) = upstream.writer.take() {
        let _ = writer.shutdown(std::net::Shutdown::Both);
    }
    false
}

/// Connects upstream, replays what is pending, and forwards responses, reconnecting
/// whenever the connection breaks, until containerd's side closes.
fn keep_upstream(link: &Link) {
    let mut pause = RECONNECT_FIRST;
    while !link.closed.load(Ordering::SeqCst) {
        let stream = match UnixStream::connect(&link.upstream_path) {
            Ok(stream) => stream,
            Err(_) => {
                let mut upstream = link.upstream();
                link.fail_unreplayable(&mut upstream, false);
                drop(upstream);
                std::thread::sleep(pause);
                pause = (pause * 2).min(RECONNECT_MAX);
                continue;
            }
        };
        pause = RECONNECT_FIRST;
        let Ok(mut reader) = stream.try_clone() else {
            continue;
        };
        {
            let mut upstream = link.upstream();
            upstream.writer = Some(stream);
            let frames: Vec<u32> = upstream.pending.keys().copied().collect();
            for stream_id in frames {
                let Some(pending) = upstream.pending.remove(&stream_id) else {
                    continue;
                };
                if pending.sent && !pending.replayable {
                    upstream.pending.insert(stream_id, pending);
                    continue;
                }
                let sent = write_upstream(&mut upstream, &pending.frame);
                upstream
                    .pending
                    .insert(stream_id, Pending { sent, ..pending });
            }
            if link.closed.load(Ordering::SeqCst) {
                return;
            }
        }
        while let Ok(Some(frame)) = Frame::read(&mut reader) {
            if frame.kind() == TYPE_RESPONSE {
                link.upstream().pending.remove(&frame.stream_id());
            }
            if !link.to_downstream(&frame) {
                link.close();
                return;
            }
        }
        let mut upstream = link.upstream();
        upstream.writer = None;
        link.fail_unreplayable(&mut upstream, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    fn request(stream_id: u32, method: &str) -> Frame {
        let mut request = ttrpc::Request::new();
        request.service = "containerd.task.v3.Task".into();
        request.method = method.into();
        let payload = request.write_to_bytes().unwrap();
        let mut bytes = (payload.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&stream_id.to_be_bytes());
        bytes.extend_from_slice(&[TYPE_REQUEST, 0]);
        bytes.extend_from_slice(&payload);
        Frame { bytes }
    }

    #[test]
    fn frames_round_trip() {
        let frame = request(7, "Wait");
        let read = Frame::read(&mut frame.bytes.as_slice()).unwrap().unwrap();
        assert_eq!(read.stream_id(), 7);
        assert_eq!(read.kind(), TYPE_REQUEST);
        assert!(replayable(&read));
        assert!(!replayable(&request(9, "Kill")));
        assert!(Frame::read(&mut [].as_slice()).unwrap().is_none());
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut bytes = ((MAX_PAYLOAD + 1) as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0, 0, 0, 1, TYPE_REQUEST, 0]);
        assert!(Frame::read(&mut bytes.as_slice()).is_err());
    }

    #[test]
    fn fifo_keeper_holds_only_fifos_and_lets_them_go() {
        let dir = std::env::temp_dir().join(format!("kuasar-keeper-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("fifos.sock");
        let listener = bind(&socket).unwrap();
        std::thread::spawn(move || keep_fifos(listener));

        let fifo = dir.join("stdout");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        keep_fifo(&socket, &fifo, true).unwrap();
        keep_fifo(&socket, &fifo, true).unwrap();
        // While held, the reader sees no end of file: a read would block.
        let mut buffer = [0u8; 8];
        let err = (&reader).read(&mut buffer).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
        keep_fifo(&socket, &fifo, false).unwrap();
        assert_eq!(
            (&reader).read(&mut buffer).unwrap(),
            0,
            "no end of file after release"
        );

        let plain = dir.join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let err = keep_fifo(&socket, &plain, true).unwrap_err();
        assert!(format!("{err:#}").contains("is not a FIFO"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unavailable_answers_carry_the_code() {
        let frame = Frame::unavailable(3, "gone");
        assert_eq!(frame.stream_id(), 3);
        assert_eq!(frame.kind(), TYPE_RESPONSE);
        let response = ttrpc::Response::parse_from_bytes(frame.payload()).unwrap();
        assert_eq!(response.status().code(), ttrpc::Code::UNAVAILABLE);
        assert_eq!(response.status().message(), "gone");
    }

    /// A fake upstream answering every request with an empty response, dropping the
    /// connection after `answers` answers.
    fn fake_upstream(path: &Path, answers: usize) -> std::thread::JoinHandle<Vec<String>> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut seen = Vec::new();
            for _ in 0..answers {
                let Some(frame) = Frame::read(&mut conn).unwrap() else {
                    break;
                };
                let request = ttrpc::Request::parse_from_bytes(frame.payload()).unwrap();
                seen.push(request.method.clone());
                let answer = Frame::response(frame.stream_id(), &ttrpc::Response::new());
                conn.write_all(&answer.bytes).unwrap();
            }
            seen
        })
    }

    #[test]
    fn waits_survive_an_upstream_restart_and_other_requests_fail_cleanly() {
        let dir = std::env::temp_dir().join(format!("kuasar-relay-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let up = dir.join("up.sock");

        // The first upstream answers nothing and goes away: a Wait and a Kill are in
        // flight when it does.
        let first = {
            let listener = UnixListener::bind(&up).unwrap();
            std::thread::spawn(move || {
                let (mut conn, _) = listener.accept().unwrap();
                let a = Frame::read(&mut conn).unwrap().unwrap();
                let b = Frame::read(&mut conn).unwrap().unwrap();
                (a.stream_id(), b.stream_id())
            })
        };
        let (containerd, relay_end) = UnixStream::pair().unwrap();
        let relay_thread = {
            let up = up.clone();
            std::thread::spawn(move || relay(relay_end, up))
        };
        let mut containerd_writer = containerd.try_clone().unwrap();
        containerd_writer
            .write_all(&request(1, "Wait").bytes)
            .unwrap();
        containerd_writer
            .write_all(&request(3, "Kill").bytes)
            .unwrap();
        assert_eq!(first.join().unwrap(), (1, 3));
        std::fs::remove_file(&up).unwrap();

        // The second upstream gets the Wait again and answers it.
        let second = fake_upstream(&up, 1);
        let mut reader = containerd.try_clone().unwrap();
        let mut answers = BTreeMap::new();
        for _ in 0..2 {
            let frame = Frame::read(&mut reader).unwrap().unwrap();
            let response = ttrpc::Response::parse_from_bytes(frame.payload()).unwrap();
            answers.insert(frame.stream_id(), response.status().code());
        }
        assert_eq!(answers.get(&1), Some(&ttrpc::Code::OK), "{answers:?}");
        assert_eq!(
            answers.get(&3),
            Some(&ttrpc::Code::UNAVAILABLE),
            "{answers:?}"
        );
        assert_eq!(second.join().unwrap(), vec!["Wait".to_string()]);

        drop(containerd_writer);
        containerd.shutdown(std::net::Shutdown::Both).unwrap();
        relay_thread.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
