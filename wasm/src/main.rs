//! `wasm-sandboxer`: runs Kubernetes pods whose containers are WebAssembly (WASI
//! preview 1) modules, with wasmtime.

mod config;
mod engine;
mod runtime;
mod worker;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use kuasar_sandbox::launch::{self, CommonArgs};
use kuasar_sandbox::PodSandboxer;

use crate::config::WasmSettings;
use crate::engine::ModuleCache;
use crate::runtime::WasmRuntime;

/// Name of this family in sockets, directories and config paths.
const FAMILY: &str = "wasm";

/// Serves containerd's Sandbox API for pods of WebAssembly containers.
#[derive(Debug, Parser)]
#[command(name = "wasm-sandboxer", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    kuasar_sandbox::holder::run_if_requested();
    worker::run_if_requested();

    let cli: Cli = launch::parse_args(FAMILY);
    let result = cli.common.load::<WasmSettings>(FAMILY).and_then(|config| {
        launch::run("wasm-sandboxer", config, |config, events| {
            let cache_dir = config
                .family
                .wasm
                .cache_dir
                .clone()
                .unwrap_or_else(|| config.state_dir.join("modules"));
            let runtime = Arc::new(WasmRuntime::new(ModuleCache::new(cache_dir)?));
            Ok(PodSandboxer::new(config, runtime, events))
        })
    });
    launch::exit_code("wasm-sandboxer", result)
}
