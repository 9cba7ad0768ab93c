//! `runc-sandboxer`: runs Kubernetes pods for containerd as Linux namespaces, with runc.

mod config;
mod console;
mod runtime;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use kuasar_sandbox::config::Config;
use kuasar_sandbox::events::EventPublisher;
use kuasar_sandbox::{reaper, server, PodSandboxer};

use crate::config::RuncSettings;
use crate::runtime::RuncRuntime;

/// Name of this family in sockets, directories and config paths.
const FAMILY: &str = "runc";

/// Serves containerd's Sandbox API for pods run as Linux namespaces with runc.
#[derive(Debug, Parser)]
#[command(name = "runc-sandboxer", version, about)]
struct Cli {
    /// Configuration file [default: /etc/kuasar/runc-sandboxer.toml when present]
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Unix socket to serve the Sandbox API on [default: /run/runc-sandboxer.sock]
    #[arg(long, value_name = "SOCKET")]
    listen: Option<PathBuf>,
    /// Directory for sandbox state [default: /run/kuasar/runc]
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Log filter: error, warn, info, debug, trace, or tracing directives [default: info]
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
}

fn main() -> ExitCode {
    kuasar_sandbox::holder::run_if_requested();

    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("runc-sandboxer: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = Config::<RuncSettings>::load(FAMILY, cli.config.as_deref())?;
    if let Some(listen) = cli.listen {
        config.listen = listen;
    }
    if let Some(dir) = cli.dir {
        config.state_dir = dir;
    }
    if let Some(level) = cli.log_level {
        config.log_level = level;
    }
    for (key, path) in [("--listen", &config.listen), ("--dir", &config.state_dir)] {
        if !path.is_absolute() || path.parent().is_none() {
            anyhow::bail!(
                "{key} must be an absolute path below /, got {}",
                path.display()
            );
        }
    }
    server::init_logging(&config.log_level)?;
    check_runc(&config.family.runc.binary)?;
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("create state directory {}", config.state_dir.display()))?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        reaper::start().context("become the subreaper of containers")?;
        let events = EventPublisher::start(config.containerd.events_address());
        let listen = config.listen.clone();
        tracing::info!(version = env!("CARGO_PKG_VERSION"), state_dir = %config.state_dir.display(), "runc-sandboxer starting");
        let runtime = Arc::new(RuncRuntime::for_config(&config)?);
        let sandboxer = Arc::new(PodSandboxer::new(&config, runtime, events));
        server::serve(&listen, sandboxer).await
    })
}

/// Fails early, with the name tried, when the runc binary cannot be found.
fn check_runc(binary: &std::path::Path) -> anyhow::Result<()> {
    let found = if binary.components().count() > 1 {
        binary.is_file()
    } else {
        std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(binary).is_file()))
            .unwrap_or(false)
    };
    if !found {
        anyhow::bail!(
            "runc binary {:?} not found (set [runc] binary in the config)",
            binary.display().to_string()
        );
    }
    Ok(())
}
