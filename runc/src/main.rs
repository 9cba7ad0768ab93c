//! `runc-sandboxer`: runs Kubernetes pods for containerd as Linux namespaces, with runc.

mod config;
mod console;
mod runtime;
mod stats;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use kuasar_sandbox::launch::{self, CommonArgs};
use kuasar_sandbox::PodSandboxer;

use crate::config::RuncSettings;
use crate::runtime::RuncRuntime;

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

    let cli = Cli::parse();
    let result = cli.common.load::<RuncSettings>(FAMILY).and_then(|config| {
        check_runc(&config.family.runc.binary)?;
        launch::run("runc-sandboxer", config, |config, events| {
            let runtime = Arc::new(RuncRuntime::for_config(config)?);
            Ok(PodSandboxer::new(config, runtime, events))
        })
    });
    launch::exit_code("runc-sandboxer", result)
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
