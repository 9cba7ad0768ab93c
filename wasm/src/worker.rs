//! The worker: one process per WebAssembly container process, running one module.
//!
//! It is the sandboxer's binary, re-executed with the hidden `run-module` command into the
//! container's cgroup, so each module can be killed, limited and measured like any
//! process, and a trap or a memory blow-up ends only this process. It loads the module
//! the sandboxer precompiled once the sandboxer has placed it in the container's cgroup
//! (a first byte on the control socket at fd 3), links WASI preview 1, reports "ready"
//! (or the error) there, and runs `_start` once the sandboxer writes a second byte.

use std::io::{BufRead, Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use wasmtime::{Linker, Module, Store};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

/// Name of the hidden command that turns this binary into a worker.
pub const COMMAND: &str = "run-module";

/// The descriptor the control socket is handed on.
pub const CONTROL_FD: i32 = 3;

/// Exit code of a module that trapped, as for a process that aborted.
pub const TRAP_EXIT_CODE: i32 = 134;

/// What a worker runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// The precompiled module.
    pub compiled: PathBuf,
    /// The module's path inside the container, for messages.
    pub module: String,
    /// `argv`, starting with the module's name.
    pub args: Vec<String>,
    /// Environment variables as `KEY=value`.
    pub env: Vec<String>,
    /// Directories made visible to the module: host path and guest path.
    pub preopens: Vec<(PathBuf, String)>,
}

/// Runs the worker and exits when this process was started as one; returns otherwise.
pub fn run_if_requested() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some(COMMAND) {
        return;
    }
    // SAFETY: F_GETFD only inspects the descriptor table.
    if unsafe { libc::fcntl(CONTROL_FD, libc::F_GETFD) } < 0 {
        eprintln!(
            "{COMMAND}: no control socket on fd {CONTROL_FD}; only the sandboxer starts workers"
        );
        std::process::exit(2);
    }
    // SAFETY: the descriptor is open (checked above): the sandboxer starts every worker
    // with its control socket there, and nothing else in this process owns it.
    let control = unsafe { UnixStream::from_raw_fd(CONTROL_FD) };
    // Nothing is loaded before the sandboxer has placed this process in the container's
    // cgroup, so that the module's memory is the container's from the first byte.
    let mut placed = [0u8; 1];
    if !matches!((&control).read(&mut placed), Ok(1)) {
        std::process::exit(1);
    }
    let code = match args
        .get(2)
        .map(|json| serde_json::from_str::<WorkerSpec>(json))
    {
        Some(Ok(spec)) => run(&spec, control),
        Some(Err(err)) => report(control, &format!("error: bad worker spec: {err}")),
        None => report(control, "error: missing worker spec"),
    };
    std::process::exit(code);
}

fn report(mut control: UnixStream, line: &str) -> i32 {
    let _ = writeln!(control, "{line}");
    1
}

fn run(spec: &WorkerSpec, mut control: UnixStream) -> i32 {
    let (mut store, start) = match load(spec) {
        Ok(loaded) => loaded,
        Err(err) => return report(control, &format!("error: {err:#}")),
    };
    if writeln!(control, "ready").is_err() {
        return 1;
    }
    let mut go = [0u8; 1];
    if !matches!(control.read(&mut go), Ok(1)) {
        // The sandboxer went away or deleted the container before starting it.
        return 1;
    }
    drop(control);

    let code = match start.call(&mut store, ()) {
        Ok(()) => 0,
        Err(err) => match err.downcast_ref::<I32Exit>() {
            Some(exit) => exit.0,
            None => {
                let _ = std::io::stdout().flush();
                eprintln!("wasm trap in {}: {err:?}", spec.module);
                TRAP_EXIT_CODE
            }
        },
    };
    drop(store);
    code
}

fn load(spec: &WorkerSpec) -> anyhow::Result<(Store<WasiP1Ctx>, wasmtime::TypedFunc<(), ()>)> {
    let engine = crate::engine::engine()?;
    // SAFETY: the file was written by this binary's own `precompile_module`, with the same
    // engine configuration, into a cache directory only the sandboxer writes.
    let module = unsafe { Module::deserialize_file(&engine, &spec.compiled) }
        .map_err(|err| anyhow::anyhow!("load compiled module {}: {err:#}", spec.module))?;

    let mut wasi = WasiCtxBuilder::new();
    wasi.inherit_stdio().args(&spec.args);
    for variable in &spec.env {
        let (key, value) = variable.split_once('=').unwrap_or((variable, ""));
        wasi.env(key, value);
    }
    for (host, guest) in &spec.preopens {
        wasi.preopened_dir(host, guest, FsPerms::ReadWrite)
            .map_err(|err| anyhow::anyhow!("preopen {} as {guest}: {err:#}", host.display()))?;
    }
    let mut store = Store::new(&engine, wasi.build_p1());

    let mut linker: Linker<WasiP1Ctx> = Linker::new(&engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |ctx| ctx)
        .map_err(|err| anyhow::anyhow!("link WASI preview 1: {err:#}"))?;
    let instance = linker
        .instantiate(&mut store, &module)
        .map_err(|err| anyhow::anyhow!("{} cannot be linked: {err:#}", spec.module))?;
    let start = instance
        .get_typed_func::<(), ()>(&mut store, "_start")
        .map_err(|_| {
            anyhow::anyhow!(
                "{} has no _start function (not a WASI command)",
                spec.module
            )
        })?;
    Ok((store, start))
}

/// Reads the worker's first report line from the sandboxer's end of the control socket.
pub fn read_report(control: &UnixStream) -> anyhow::Result<()> {
    let mut line = String::new();
    std::io::BufReader::new(control)
        .read_line(&mut line)
        .context("read worker report")?;
    match line.trim_end() {
        "ready" => Ok(()),
        "" => anyhow::bail!("the worker exited before loading the module"),
        other => anyhow::bail!("{}", other.strip_prefix("error: ").unwrap_or(other)),
    }
}
