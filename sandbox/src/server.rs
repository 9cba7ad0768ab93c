//! Runs a sandboxer: the Sandbox API on its unix socket until SIGTERM or SIGINT.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_stream::wrappers::UnixListenerStream;

use crate::api::sandbox::controller_server::ControllerServer;
use crate::controller::{ControllerService, Sandboxer};

/// How long requests in flight get to finish once the sandboxer is asked to stop.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves `sandboxer` on the unix socket `listen` until the process is asked to stop.
///
/// A stale socket file is replaced; a socket another live sandboxer answers on is not.
pub async fn serve<S: Sandboxer>(listen: &Path, sandboxer: Arc<S>) -> anyhow::Result<()> {
    if let Some(parent) = listen.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("create directory {}", parent.display()))?;
    }
    if listen.exists() {
        if std::os::unix::net::UnixStream::connect(listen).is_ok() {
            anyhow::bail!("another sandboxer is listening on {}", listen.display());
        }
        std::fs::remove_file(listen)
            .with_context(|| format!("remove stale socket {}", listen.display()))?;
    }
    let listener =
        UnixListener::bind(listen).with_context(|| format!("listen on {}", listen.display()))?;
    tracing::info!(socket = %listen.display(), "serving the Sandbox API");

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let (stop, mut stopping) = tokio::sync::watch::channel(false);
    let server = tonic::transport::Server::builder()
        .add_service(ControllerServer::new(ControllerService::new(sandboxer)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        });
    tokio::pin!(server);

    let result = tokio::select! {
        result = &mut server => result,
        _ = async {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        } => {
            tracing::info!("stopping on signal");
            let _ = stop.send(true);
            // containerd keeps Wait calls open for as long as pods live: give requests in
            // flight a moment, then go.
            tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await.unwrap_or(Ok(()))
        }
    }
    .context("serve the Sandbox API");
    let _ = std::fs::remove_file(listen);
    result
}

/// The tracing filter that `directives` ("info", "info,kuasar_sandbox=debug") describe.
/// The error is the filter's own message only: its cause repeats that message.
pub fn log_filter(directives: &str) -> anyhow::Result<tracing_subscriber::EnvFilter> {
    tracing_subscriber::EnvFilter::try_new(directives).map_err(|err| anyhow::anyhow!("{err}"))
}

/// Sets up `tracing` output to stderr with the filter `level` (`RUST_LOG` wins when set),
/// coloured only on a terminal.
pub fn init_logging(level: &str) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => {
            log_filter(&directives).with_context(|| format!("invalid RUST_LOG {directives:?}"))?
        }
        _ => log_filter(level).with_context(|| format!("invalid log level {level:?}"))?,
    };
    // Colours only for a person at a terminal: logs that go to a file or a journal stay
    // plain text.
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colours)
        .init();
    Ok(())
}
