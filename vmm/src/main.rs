//! `vmm-sandboxer`: runs Kubernetes pods for containerd, each in a microVM of its own
//! with the `vmm-task` agent as the guest's init.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use kuasar_sandbox::launch::{self, CommonArgs};
use kuasar_sandbox::PodSandboxer;
use vmm_sandboxer::config::VmmSettings;
use vmm_sandboxer::runtime::VmRuntime;

/// Name of this family in sockets, directories and config paths.
const FAMILY: &str = "vmm";

/// Serves containerd's Sandbox API for pods run in microVMs.
#[derive(Debug, Parser)]
#[command(name = "vmm-sandboxer", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    kuasar_sandbox::holder::run_if_requested();
    kuasar_sandbox::relay::run_if_requested();

    let cli: Cli = launch::parse_args(FAMILY);
    let result = cli.common.load::<VmmSettings>(FAMILY).and_then(|config| {
        let vmm = config.family.vmm.clone();
        vmm.validate()?;
        let missing = vmm.missing_image_files();
        if !missing.is_empty() {
            // Pods fail with this error until the image appears; the daemon still serves.
            eprintln!(
                "vmm-sandboxer: warning: missing {} (build the guest with `make guest`)",
                missing.join(", ")
            );
        }
        launch::run("vmm-sandboxer", config, |config, events| {
            let runtime = VmRuntime::new(vmm, config.state_dir.join("vms"))?;
            Ok(PodSandboxer::new(config, Arc::new(runtime), events))
        })
    });
    launch::exit_code("vmm-sandboxer", result)
}
