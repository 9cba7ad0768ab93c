//! `wasm-sandboxer`: runs Kubernetes pods whose containers are WebAssembly (WASI
//! preview 1) modules, with wasmtime.

mod config;
mod engine;
mod runtime;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use kuasar_sandbox::config::Config;
use kuasar_sandbox::events::EventPublisher;
use kuasar_sandbox::{reaper, server, PodSandboxer};

use crate::config::WasmSettings;
use crate::engine::ModuleCache;
use crate::runtime::WasmRuntime;

/// Name of this family in sockets, directories and config paths.
const FAMILY: &str = "wasm";

/// Serves containerd's Sandbox API for pods of WebAssembly containers.
#[derive(Debug, Parser)]
#[command(name = "wasm-sandboxer", version, about)]
struct Cli {
    /// Configuration file [default: /etc/kuasar/wasm-sandboxer.toml when present]
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Unix socket to serve the Sandbox API on [default: /run/wasm-sandboxer.sock]
    #[arg(long, value_name = "SOCKET")]
    listen: Option<PathBuf>,
    /// Directory for sandbox state [default: /run/kuasar/wasm]
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Log filter: error, warn, info, debug, trace, or tracing directives [default: info]
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
}

fn main() -> ExitCode {
    kuasar_sandbox::holder::run_if_requested();
    worker::run_if_requested();

    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("wasm-sandboxer: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = Config::<WasmSettings>::load(FAMILY, cli.config.as_deref())?;
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
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("create state directory {}", config.state_dir.display()))?;
    let cache_dir = config
        .family
        .wasm
        .cache_dir
        .clone()
        .unwrap_or_else(|| config.state_dir.join("modules"));
    let cache = ModuleCache::new(cache_dir)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        reaper::start().context("become the subreaper of containers")?;
        let events = EventPublisher::start(config.containerd.events_address());
        let listen = config.listen.clone();
        tracing::info!(version = env!("CARGO_PKG_VERSION"), state_dir = %config.state_dir.display(), "wasm-sandboxer starting");
        let runtime = Arc::new(WasmRuntime::new(cache));
        let sandboxer = Arc::new(PodSandboxer::new(&config, runtime, events));
        server::serve(&listen, sandboxer).await
    })
}
