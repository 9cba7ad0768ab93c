//! `vmm-task`: the guest agent, run as the microVM's init.
//!
//! It mounts what containers need, loads the image's modules, mounts the directory the
//! host shares, and serves the Task API (containers run by `runc` in the guest) and the
//! [`vmm_task::api::agent_ttrpc::Agent`] service on vsock port [`vmm_task::AGENT_PORT`].

mod guest_io;
mod init;
mod net;
mod oom;
mod service;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use containerd_shim_protos::shim_async::create_task;
use kuasar_sandbox::events::EventPublisher;
use kuasar_sandbox::oci::{OciEngine, OciRuntime, Processes};
use kuasar_sandbox::task::TaskService;
use vmm_task::api::agent_ttrpc::create_agent;

use crate::guest_io::GuestRuntime;
use crate::service::AgentService;

/// Where the agent keeps its state; the guest's root is a RAM file system.
const STATE_DIR: &str = "/run/kuasar";

/// What the agent says when run anywhere but as a guest's init.
const USAGE: &str = "vmm-task is the guest agent of vmm-sandboxer: it runs only as the init \
(PID 1) of a microVM guest built by `make guest`, never on a host.";

fn main() {
    let started_at_uptime_ms = service::uptime_ms().unwrap_or_default();
    // Outside a guest it would take over /run/kuasar and serve the Task API on the host's
    // vsock: it refuses, and answers --help and --version.
    if std::process::id() != 1 {
        match std::env::args().nth(1).as_deref() {
            Some("-h" | "--help") => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            Some("-V" | "--version") => {
                println!("vmm-task {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            _ => {
                eprintln!("{USAGE}");
                std::process::exit(2);
            }
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KUASAR_AGENT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();

    init::prepare_guest();
    std::env::set_var("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let sandbox_id = init::cmdline_value(&cmdline, vmm_task::SANDBOX_PARAM)
        .unwrap_or("guest")
        .to_string();

    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")
        .and_then(|runtime| runtime.block_on(serve(&sandbox_id, started_at_uptime_ms)));
    if let Err(err) = result {
        tracing::error!(error = format!("{err:#}"), "the agent stopped");
    }
    // init may not exit: the kernel would panic. The VM ends instead.
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    std::process::exit(1);
}

async fn serve(sandbox_id: &str, started_at_uptime_ms: u64) -> anyhow::Result<()> {
    kuasar_sandbox::reaper::start().context("start reaping child processes")?;
    let state = PathBuf::from(STATE_DIR);
    let engine = OciEngine {
        name: "runc".into(),
        binary: "runc".into(),
        root: state.join("runc"),
        flags: Vec::new(),
        create_flags: vec!["--no-pivot".into()],
        processes: Processes::Host,
    };
    engine.check_binary()?;
    let oci = OciRuntime::new(engine, state.join("work"))?;
    let ooms = Arc::new(oom::OomEvents::default());
    let runtime = Arc::new(GuestRuntime::new(oci, state.join("io"), ooms.clone())?);
    let tasks = Arc::new(TaskService::new(
        sandbox_id,
        runtime,
        EventPublisher::discard(),
    ));

    let address = format!("vsock://-1:{}", vmm_task::AGENT_PORT);
    let mut server = ttrpc::r#async::Server::new()
        .bind(&address)
        .with_context(|| format!("listen on {address}"))?
        .register_service(create_task(tasks))
        .register_service(create_agent(Arc::new(AgentService::new(
            started_at_uptime_ms,
            ooms,
        ))));
    server
        .start()
        .await
        .with_context(|| format!("serve on {address}"))?;
    tracing::info!(%sandbox_id, port = vmm_task::AGENT_PORT, "agent serving");
    tokio::task::spawn_blocking(init::announce_ready);

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    terminate.recv().await;
    let _ = server.shutdown().await;
    Ok(())
}
