//! `runc-sandboxer`: runs Kubernetes pods for containerd as Linux namespaces, with runc.

mod config;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use kuasar_sandbox::launch::{self, CommonArgs};
use kuasar_sandbox::oci::{OciEngine, OciRuntime, Processes};
use kuasar_sandbox::PodSandboxer;

use crate::config::RuncSettings;

/// Name of this family in sockets, directories and config paths.
const FAMILY: &str = "runc";

/// Serves containerd's Sandbox API for pods run as Linux namespaces with runc.
#[derive(Debug, Parser)]
#[command(name = "runc-sandboxer", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    kuasar_sandbox::holder::run_if_requested();

    let cli: Cli = launch::parse_args(FAMILY);
    let result = cli.common.load::<RuncSettings>(FAMILY).and_then(|config| {
        let runc = &config.family.runc;
        let engine = OciEngine {
            name: "runc".into(),
            binary: runc.binary.clone(),
            root: runc
                .root
                .clone()
                .unwrap_or_else(|| config.state_dir.join("runc")),
            flags: Vec::new(),
            create_flags: Vec::new(),
            processes: Processes::Host,
        };
        engine
            .check_binary()
            .map_err(|err| anyhow::anyhow!("{err:#} (set [runc] binary in the config)"))?;
        launch::run("runc-sandboxer", config, |config, events| {
            let runtime = Arc::new(OciRuntime::new(engine, config.state_dir.join("work"))?);
            Ok(PodSandboxer::new(config, runtime, events))
        })
    });
    launch::exit_code("runc-sandboxer", result)
}
