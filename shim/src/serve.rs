//! The long-lived shim of one pod: serves the Task API (v2 and v3) and, for shim-mode
//! containerd, the Sandbox API on its socket until the pod is gone.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use containerd_shim_protos::sandbox_async::create_sandbox;
use kuasar_sandbox::events::EventPublisher;
use tokio::signal::unix::{signal, SignalKind};

use crate::args::Args;
use crate::config::ShimConfig;
use crate::controller::Sandboxer;
use crate::launch::socket_path;
use crate::pod::Pod;
use crate::sandbox::SandboxService;
use crate::task;

/// Environment variable with containerd's ttrpc socket, where task events go.
const TTRPC_ADDRESS_ENV: &str = "TTRPC_ADDRESS";

/// Runs the shim of pod `args.id` until the pod is gone or the shim is told to stop.
pub async fn serve(args: &Args) -> anyhow::Result<()> {
    let bundle = args.bundle_dir()?;
    let config = ShimConfig::load(&bundle).unwrap_or_else(|_| ShimConfig::defaults(&args.family));
    log_to_containerd(&bundle);
    let level = if args.debug {
        "debug"
    } else {
        &config.log_level
    };
    kuasar_sandbox::server::init_logging(level)?;

    let socket = socket_path(&args.address, &args.namespace, &args.id);
    let sandboxer = Sandboxer::new(&config.sandboxer_address);
    let events = match std::env::var_os(TTRPC_ADDRESS_ENV) {
        Some(address) if !address.is_empty() => EventPublisher::start(PathBuf::from(address)),
        _ => EventPublisher::discard(),
    };
    let pod = Arc::new(Pod::new(&args.id, &args.namespace, sandboxer, events));

    let mut services = task::services(pod.clone());
    services.extend(create_sandbox(Arc::new(SandboxService::new(pod.clone()))));
    let mut server = ttrpc::r#async::Server::new()
        .bind(&format!("unix://{}", socket.display()))
        .with_context(|| format!("cannot listen on {}", socket.display()))?
        .register_service(services);
    server
        .start()
        .await
        .with_context(|| format!("cannot serve on {}", socket.display()))?;
    tracing::info!(
        sandbox_id = %args.id,
        family = %args.family,
        sandboxer = %config.sandboxer_address.display(),
        socket = %socket.display(),
        "shim serving"
    );

    // Once the pod is gone nobody needs to find the shim any more: its socket goes at once,
    // so that nothing is left of it even if the shim is killed while it lingers.
    {
        let (pod, socket) = (pod.clone(), socket.clone());
        tokio::spawn(async move {
            pod.marked_gone().await;
            remove_socket(&socket);
        });
    }

    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = pod.gone() => {}
        _ = terminate.recv() => tracing::info!(sandbox_id = %args.id, "SIGTERM: the shim exits"),
        _ = interrupt.recv() => tracing::info!(sandbox_id = %args.id, "SIGINT: the shim exits"),
    }
    let _ = server.shutdown().await;
    remove_socket(&socket);
    Ok(())
}

/// Sends the shim's stderr (its log) into the `log` FIFO containerd reads from the bundle,
/// when there is one.
fn log_to_containerd(bundle: &Path) {
    let fifo = bundle.join("log");
    let Ok(file) = std::fs::OpenOptions::new().write(true).open(&fifo) else {
        return;
    };
    // SAFETY: dup2 onto fd 2 replaces only the process's stderr with an open file.
    unsafe {
        libc::dup2(file.as_raw_fd(), libc::STDERR_FILENO);
    }
}

fn remove_socket(socket: &Path) {
    if let Err(e) = std::fs::remove_file(socket) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(socket = %socket.display(), error = %e, "cannot remove the shim socket");
        }
    }
}
