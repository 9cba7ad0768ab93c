//! `quark-sandboxer`: runs Kubernetes pods for containerd inside an application kernel
//! (gVisor's runsc, or Quark: any runtime with runsc's command line).

mod config;
mod kernel;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use kuasar_sandbox::launch::{self, CommonArgs};
use kuasar_sandbox::oci::{OciEngine, OciRuntime, Processes};
use kuasar_sandbox::PodSandboxer;

use crate::config::QuarkSettings;
use crate::kernel::QuarkRuntime;

/// Name of this family in sockets, directories and config paths.
const FAMILY: &str = "quark";

/// Serves containerd's Sandbox API for pods run inside an application kernel.
#[derive(Debug, Parser)]
#[command(name = "quark-sandboxer", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    kuasar_sandbox::holder::run_if_requested();
    if std::env::args().nth(1).as_deref() == Some(kernel::PAUSE_COMMAND) {
        kernel::pause();
    }

    let cli: Cli = launch::parse_args(FAMILY);
    let result = cli.common.load::<QuarkSettings>(FAMILY).and_then(|config| {
        let quark = &config.family.quark;
        let engine = OciEngine {
            name: quark
                .binary
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_else(|| "runsc".into()),
            binary: quark.binary.clone(),
            root: quark
                .root
                .clone()
                .unwrap_or_else(|| config.state_dir.join("runsc")),
            flags: quark.global_flags()?,
            create_flags: Vec::new(),
            processes: Processes::Kernel,
        };
        if let Err(err) = engine.check_binary() {
            // Pods fail with this error until the binary appears; the daemon still serves.
            eprintln!("quark-sandboxer: warning: {err:#} (set [quark] binary in the config)");
        }
        launch::run("quark-sandboxer", config, |config, events| {
            let oci = OciRuntime::new(engine, config.state_dir.join("work"))?;
            let runtime = QuarkRuntime::new(oci, config.state_dir.join("pods"))?;
            Ok(PodSandboxer::new(config, Arc::new(runtime), events))
        })
    });
    launch::exit_code("quark-sandboxer", result)
}
