//! The host side of hybrid vsock: a guest's vsock ports reached through unix sockets.
//!
//! The vsock backend (`vhost-device-vsock` for QEMU) listens on one unix socket, the
//! VM's *uds*. To reach guest port P the host connects there and writes `CONNECT P\n`;
//! the backend answers `OK <host port>\n` once the guest has accepted, and from then on
//! the stream is the guest connection. A guest that does not listen on P refuses, and
//! the backend closes the stream without an answer. The other way round, a guest's
//! connection to the host (CID 2) on port P arrives at the unix socket
//! [`listener_path`]`(uds, P)`, where the host has to listen.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How long to wait between attempts to reach a guest port that is not listening yet.
const RETRY_INTERVAL: Duration = Duration::from_millis(20);

/// How long one `CONNECT` may wait for its answer before it is tried again.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest answer to `CONNECT` that is read before it is called garbled.
const MAX_ANSWER: usize = 64;

/// Why a guest port could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The backend's socket could not be reached or the handshake broke off.
    // The cause is part of the message, not a source: `{:#}` would print it twice.
    #[error("hybrid vsock {uds}: cannot reach guest port {port}: {error}")]
    Io {
        /// The backend's socket.
        uds: PathBuf,
        /// The guest port.
        port: u32,
        /// What failed.
        error: std::io::Error,
    },
    /// The stream closed before an answer: the guest refused (nothing listens on the port).
    #[error(
        "hybrid vsock {uds}: guest port {port} refused the connection (closed without an answer{})",
        partial_answer(answer)
    )]
    Refused {
        /// The backend's socket.
        uds: PathBuf,
        /// The guest port.
        port: u32,
        /// What arrived before the stream closed.
        answer: String,
    },
    /// The answer was not `OK <port>`: the socket is not a hybrid vsock.
    #[error("hybrid vsock {uds}: guest port {port}: unexpected answer to CONNECT: {answer:?}")]
    Garbled {
        /// The backend's socket.
        uds: PathBuf,
        /// The guest port.
        port: u32,
        /// What came back.
        answer: String,
    },
    /// No connection within the time allowed.
    #[error("hybrid vsock {uds}: guest port {port} not reached within {timeout:?}: {last}")]
    TimedOut {
        /// The backend's socket.
        uds: PathBuf,
        /// The guest port.
        port: u32,
        /// The time allowed.
        timeout: Duration,
        /// Why the last attempt failed.
        last: String,
    },
}

impl ConnectError {
    /// Whether another attempt may succeed: the backend or the guest's listener may not
    /// be up yet. A garbled answer will not change.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Io { .. } | Self::Refused { .. })
    }
}

/// Connects to guest port `port` through the hybrid vsock socket `uds`.
///
/// The stream returned carries the guest connection and nothing of the handshake.
pub async fn connect(uds: &Path, port: u32) -> anyhow::Result<UnixStream> {
    Ok(handshake(uds, port).await?)
}

/// Connects to guest port `port` through `uds`, trying again while the backend or the
/// guest's listener is not up yet, until `timeout` has passed.
///
/// An attempt lasts until the backend answers, at most [`ATTEMPT_TIMEOUT`]: before the
/// guest's vsock driver is up the backend holds the request, and a request it lost
/// would otherwise hold the whole boot.
pub async fn connect_with_retry(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> anyhow::Result<UnixStream> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut attempts = 0u32;
    // The last attempt that failed with a reason: one cut short by the deadline has none.
    let mut last_reason: Option<String> = None;
    loop {
        attempts += 1;
        let attempt_deadline = deadline.min(tokio::time::Instant::now() + ATTEMPT_TIMEOUT);
        match tokio::time::timeout_at(attempt_deadline, handshake(uds, port)).await {
            Ok(Ok(stream)) => {
                tracing::debug!(uds = %uds.display(), port, attempts, "guest port reached");
                return Ok(stream);
            }
            Ok(Err(err)) if err.is_transient() => {
                tracing::trace!(uds = %uds.display(), port, attempts, error = %err, "guest port not reached yet");
                last_reason = Some(err.to_string());
            }
            Ok(Err(err)) => return Err(err.into()),
            Err(_) => {
                tracing::trace!(uds = %uds.display(), port, attempts, "no answer to CONNECT yet");
            }
        }
        if tokio::time::Instant::now() + RETRY_INTERVAL >= deadline {
            let last = last_reason
                .unwrap_or_else(|| format!("attempt {attempts} still waiting for an answer"));
            return Err(ConnectError::TimedOut {
                uds: uds.to_path_buf(),
                port,
                timeout,
                last,
            }
            .into());
        }
        tokio::time::sleep(RETRY_INTERVAL).await;
    }
}

/// The unix socket at which a guest's connections to host port `port` arrive, for the
/// hybrid vsock socket `uds`: `<uds>_<port>`.
pub fn listener_path(uds: &Path, port: u32) -> PathBuf {
    let mut path = uds.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// One attempt: connect, send `CONNECT`, read the answer line.
async fn handshake(uds: &Path, port: u32) -> Result<UnixStream, ConnectError> {
    let io = |error| ConnectError::Io {
        uds: uds.to_path_buf(),
        port,
        error,
    };
    let mut stream = UnixStream::connect(uds).await.map_err(io)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(io)?;

    // Byte by byte: whatever follows the line belongs to the guest connection.
    let mut answer = Vec::new();
    loop {
        let byte = match stream.read_u8().await {
            Ok(byte) => byte,
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                return Err(ConnectError::Refused {
                    uds: uds.to_path_buf(),
                    port,
                    answer: String::from_utf8_lossy(&answer).into_owned(),
                });
            }
            Err(err) => return Err(io(err)),
        };
        if byte == b'\n' {
            break;
        }
        answer.push(byte);
        if answer.len() > MAX_ANSWER {
            break;
        }
    }

    let answer = String::from_utf8_lossy(&answer).into_owned();
    let accepted = answer
        .strip_prefix("OK ")
        .is_some_and(|host_port| host_port.trim().parse::<u32>().is_ok());
    if !accepted {
        return Err(ConnectError::Garbled {
            uds: uds.to_path_buf(),
            port,
            answer,
        });
    }
    Ok(stream)
}

/// `; it sent "…"` for a non-empty partial answer, for [`ConnectError::Refused`].
fn partial_answer(answer: &str) -> String {
    if answer.is_empty() {
        String::new()
    } else {
        format!("; it sent {answer:?}")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::UnixListener;

    use super::*;

    /// How the fake backend answers a `CONNECT`.
    #[derive(Clone, Copy)]
    enum Answer {
        /// `OK <port>`, then the guest side echoes and greets first.
        Accept,
        /// Closes the stream, as for a guest port nobody listens on.
        Refuse,
        /// Something that is not the protocol.
        Garble,
        /// Never answers.
        Hang,
    }

    /// A fake hybrid vsock backend at a fresh socket path: answers the `n`th connection
    /// (counting from 0) with `answer(n)`. Returns the socket's path.
    fn backend(name: &str, answer: impl Fn(usize) -> Answer + Send + 'static) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kuasar-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("vsock.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let n = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, answer(n)));
            }
        });
        uds
    }

    async fn serve(stream: UnixStream, answer: Answer) {
        let mut stream = BufReader::new(stream);
        let mut line = String::new();
        stream.read_line(&mut line).await.unwrap();
        let port = line
            .strip_prefix("CONNECT ")
            .and_then(|rest| rest.trim_end().parse::<u32>().ok())
            .expect("a CONNECT line");
        match answer {
            Answer::Accept => {
                // The guest's first bytes arrive together with the answer.
                let hello = format!("OK {port}\nhello from {port}\n");
                stream.get_mut().write_all(hello.as_bytes()).await.unwrap();
                let mut echo = String::new();
                stream.read_line(&mut echo).await.unwrap();
                stream.get_mut().write_all(echo.as_bytes()).await.unwrap();
            }
            Answer::Refuse => {}
            Answer::Garble => stream.get_mut().write_all(b"ERR no\n").await.unwrap(),
            Answer::Hang => tokio::time::sleep(Duration::from_secs(60)).await,
        }
    }

    fn cleanup(uds: &Path) {
        let _ = std::fs::remove_dir_all(uds.parent().unwrap());
    }

    #[tokio::test]
    async fn connect_hands_over_the_guest_stream() {
        let uds = backend("accept", |_| Answer::Accept);
        let stream = connect(&uds, 1024).await.unwrap();

        let mut stream = BufReader::new(stream);
        let mut line = String::new();
        stream.read_line(&mut line).await.unwrap();
        assert_eq!(line, "hello from 1024\n");
        stream.get_mut().write_all(b"ping\n").await.unwrap();
        line.clear();
        stream.read_line(&mut line).await.unwrap();
        assert_eq!(line, "ping\n");
        cleanup(&uds);
    }

    #[tokio::test]
    async fn a_refusal_names_the_socket_and_port() {
        let uds = backend("refuse", |_| Answer::Refuse);
        let err = connect(&uds, 1024).await.unwrap_err();
        let message = err.to_string();
        assert!(message.contains(&uds.display().to_string()), "{message}");
        assert!(message.contains("port 1024 refused"), "{message}");
        assert!(err.downcast_ref::<ConnectError>().unwrap().is_transient());
        cleanup(&uds);
    }

    #[tokio::test]
    async fn a_garbled_answer_is_quoted() {
        let uds = backend("garble", |_| Answer::Garble);
        let err = connect(&uds, 7).await.unwrap_err();
        let message = err.to_string();
        assert!(message.contains("guest port 7"), "{message}");
        assert!(message.contains("\"ERR no\""), "{message}");

        // It is not tried again.
        let began = std::time::Instant::now();
        let err = connect_with_retry(&uds, 7, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(began.elapsed() < Duration::from_secs(5));
        assert!(matches!(
            err.downcast_ref::<ConnectError>(),
            Some(ConnectError::Garbled { .. })
        ));
        cleanup(&uds);
    }

    #[tokio::test]
    async fn a_missing_socket_is_named() {
        let uds = std::env::temp_dir().join("kuasar-vsock-absent/vsock.sock");
        let message = connect(&uds, 1024).await.unwrap_err().to_string();
        assert!(
            message.contains("kuasar-vsock-absent/vsock.sock"),
            "{message}"
        );
        assert!(message.contains("port 1024"), "{message}");
    }

    #[tokio::test]
    async fn retry_waits_for_the_guest_to_listen() {
        let uds = backend("retry", |n| {
            if n < 3 {
                Answer::Refuse
            } else {
                Answer::Accept
            }
        });
        let stream = connect_with_retry(&uds, 1024, Duration::from_secs(10))
            .await
            .unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await.unwrap();
        assert_eq!(line, "hello from 1024\n");
        cleanup(&uds);
    }

    #[tokio::test]
    async fn retry_waits_for_the_backend_to_listen() {
        let dir = std::env::temp_dir().join(format!("kuasar-vsock-late-{}", std::process::id()));
        let uds = dir.join("vsock.sock");
        let _ = std::fs::remove_dir_all(&dir);
        let late = uds.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let bound = backend("late", |_| Answer::Accept);
            assert_eq!(bound, late);
        });
        connect_with_retry(&uds, 1024, Duration::from_secs(10))
            .await
            .unwrap();
        cleanup(&uds);
    }

    #[tokio::test]
    async fn retry_gives_up_at_the_timeout() {
        let uds = backend("timeout", |_| Answer::Refuse);
        let began = std::time::Instant::now();
        let err = connect_with_retry(&uds, 1024, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(began.elapsed() < Duration::from_secs(10));
        let message = err.to_string();
        assert!(message.contains("not reached within 2s"), "{message}");
        assert!(message.contains("refused"), "{message}");
        cleanup(&uds);
    }

    #[tokio::test]
    async fn retry_gives_up_on_a_backend_that_never_answers() {
        let uds = backend("hang", |_| Answer::Hang);
        let err = connect_with_retry(&uds, 1024, Duration::from_millis(300))
            .await
            .unwrap_err();
        let message = err.to_string();
        assert!(message.contains("still waiting for an answer"), "{message}");
        cleanup(&uds);
    }

    #[test]
    fn guest_connections_arrive_at_the_port_suffixed_socket() {
        assert_eq!(
            listener_path(Path::new("/run/vm/pod1/vsock.sock"), 1025),
            Path::new("/run/vm/pod1/vsock.sock_1025")
        );
    }
}
