//! A minimal client of QEMU's machine protocol (QMP): JSON lines over a unix socket, a
//! greeting, capability negotiation, then one command at a time. Asynchronous events
//! interleaved with answers are skipped.

use std::path::Path;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// A negotiated QMP connection.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects to the QMP socket at `path` and leaves capability negotiation done.
    pub async fn connect(path: &Path) -> anyhow::Result<Self> {
        let stream = UnixStream::connect(path)
            .await
            .with_context(|| format!("connect to QMP at {}", path.display()))?;
        let (reader, writer) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(reader),
            writer,
        };
        let greeting = qmp.read_message().await.context("read the QMP greeting")?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities").await?;
        Ok(qmp)
    }

    /// Runs `command` without arguments and returns its `return` value.
    pub async fn execute(&mut self, command: &str) -> anyhow::Result<Value> {
        let mut line = json!({ "execute": command }).to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .with_context(|| format!("send QMP command {command}"))?;
        loop {
            let message = self.read_message().await?;
            if message.get("event").is_some() {
                continue;
            }
            return answer(command, message);
        }
    }

    /// The VM's run state (`running`, `paused`, `internal-error`, `guest-panicked`,
    /// `shutdown`, …).
    pub async fn status(&mut self) -> anyhow::Result<String> {
        let value = self.execute("query-status").await?;
        value["status"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("query-status answered {value}"))
    }

    async fn read_message(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        let read = self
            .reader
            .read_line(&mut line)
            .await
            .context("read from QMP")?;
        if read == 0 {
            bail!("QMP connection closed");
        }
        serde_json::from_str(&line).with_context(|| format!("QMP sent {line:?}"))
    }
}

/// The `return` of an answer to `command`, or its `error` as an error.
fn answer(command: &str, message: Value) -> anyhow::Result<Value> {
    if let Some(value) = message.get("return") {
        return Ok(value.clone());
    }
    if let Some(error) = message.get("error") {
        bail!(
            "QMP command {command} failed: {}",
            error["desc"].as_str().unwrap_or("no description")
        );
    }
    bail!("unexpected QMP answer to {command}: {message}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_and_errors() {
        let ok = answer("query-status", json!({"return": {"status": "running"}})).unwrap();
        assert_eq!(ok["status"], "running");
        let err = answer(
            "stop",
            json!({"error": {"class": "GenericError", "desc": "no"}}),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(err, "QMP command stop failed: no");
        assert!(answer("x", json!({"something": 1})).is_err());
    }

    #[tokio::test]
    async fn negotiates_and_skips_events() {
        let dir = std::env::temp_dir().join(format!("kuasar-qmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (reader, mut writer) = stream.into_split();
            let mut lines = BufReader::new(reader).lines();
            writer
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            let first = lines.next_line().await.unwrap().unwrap();
            assert!(first.contains("qmp_capabilities"), "{first}");
            writer.write_all(b"{\"return\": {}}\n").await.unwrap();
            let second = lines.next_line().await.unwrap().unwrap();
            assert!(second.contains("query-status"), "{second}");
            writer
                .write_all(b"{\"event\": \"STOP\", \"timestamp\": {}}\n{\"return\": {\"status\": \"internal-error\", \"running\": false}}\n")
                .await
                .unwrap();
        });
        let mut qmp = Qmp::connect(&path).await.unwrap();
        assert_eq!(qmp.status().await.unwrap(), "internal-error");
        server.await.unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
