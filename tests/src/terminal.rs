//! An exec on a terminal the way `crictl exec -it` runs one: CRI Exec, then a websocket
//! session with containerd's streaming server in the Kubernetes remote-command protocol
//! (`v4.channel.k8s.io`: every message starts with its channel number).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::CriClient;

/// Channel of the process's stdin.
pub const STDIN: u8 = 0;
/// Channel of the process's stdout.
pub const STDOUT: u8 = 1;
/// Channel of the process's stderr.
pub const STDERR: u8 = 2;
/// Channel of the status document at the end of the session.
pub const ERROR: u8 = 3;
const RESIZE: u8 = 4;

/// Typed into a shell exec'd on a 100 x 30 terminal: prints the terminal's device, its size
/// once containerd has applied the resize (which comes a moment after the session opens;
/// the wait is bounded), then `tty-ok-42`, and exits 3. The values the output is checked
/// for are computed, so that the terminal's echo of this input never contains them.
pub const TERMINAL_CHECK: &[u8] = b"tty; i=0; while [ \"$(stty size)\" != \"$((15*2)) $((50*2))\" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done; stty size; echo tty-ok-$((6*7)); exit 3\n";

/// A websocket session with containerd's streaming server.
pub type ExecSession =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Runs CRI Exec for `command` in container `id` (on a terminal with `tty`) and attaches
/// to the session containerd's streaming server offers, which must be on loopback.
pub async fn open_exec_session(
    cri: &CriClient,
    id: &str,
    command: &[&str],
    tty: bool,
) -> Result<ExecSession> {
    let url = cri.exec_stream_url(id, command, tty).await?;
    ensure!(
        url.starts_with("http://127.0.0.1:"),
        "streaming server not on loopback: {url}"
    );
    let mut request = url.replacen("http://", "ws://", 1).into_client_request()?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "v4.channel.k8s.io".parse()?);
    let (session, _) = tokio_tungstenite::connect_async(request)
        .await
        .context("attach to the exec session")?;
    Ok(session)
}

/// What a terminal session printed and how it ended.
#[derive(Debug, Default)]
pub struct TerminalSession {
    /// Everything the terminal showed (input echoed, then output).
    pub output: String,
    /// The status document of the error channel, e.g. naming a non-zero exit code.
    pub status: String,
}

/// Runs `command` in container `id` on a `width` x `height` terminal, types `input` and
/// collects what comes back until the session ends, at most `timeout`.
pub async fn exec_on_terminal(
    cri: &CriClient,
    id: &str,
    command: &[&str],
    (width, height): (u32, u32),
    input: &[u8],
    timeout: Duration,
) -> Result<TerminalSession> {
    let mut session = open_exec_session(cri, id, command, true).await?;
    let frame = |channel: u8, data: &[u8]| Message::Binary([&[channel], data].concat().into());
    let size = format!(r#"{{"Width":{width},"Height":{height}}}"#);
    session.send(frame(RESIZE, size.as_bytes())).await?;
    session.send(frame(STDIN, input)).await?;

    let mut output = Vec::new();
    let mut status = String::new();
    let read = async {
        while let Some(message) = session.next().await {
            let Message::Binary(data) = message? else {
                continue;
            };
            match data.first() {
                Some(&STDOUT) => output.extend_from_slice(&data[1..]),
                Some(&ERROR) if data.len() > 1 => {
                    status.push_str(&String::from_utf8_lossy(&data[1..]))
                }
                _ => {}
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(timeout, read)
        .await
        .context("exec session did not end")??;
    Ok(TerminalSession {
        output: String::from_utf8_lossy(&output).into_owned(),
        status,
    })
}
