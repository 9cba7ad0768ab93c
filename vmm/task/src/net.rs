//! The guest's network: the pod's interfaces and routes, configured with the image's
//! busybox `ip`.

use std::process::Command;

use anyhow::{bail, Context};
use vmm_task::api::agent::{Interface, Route};

const BUSYBOX: &str = "/bin/busybox";

/// Runs `ip ARGS`, failing with its error output. The child goes through the reaper,
/// which collects every child of the agent.
pub async fn run_ip(args: &[&str]) -> anyhow::Result<()> {
    let mut command = Command::new(BUSYBOX);
    command.arg("ip").args(args);
    let output = kuasar_sandbox::reaper::output(&mut command)
        .await
        .with_context(|| format!("run {BUSYBOX} ip"))?;
    if output.status.code != 0 {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Name of the guest device with MAC address `mac`.
fn device_with_mac(mac: &str) -> anyhow::Result<String> {
    let wanted = mac.to_ascii_lowercase();
    for entry in std::fs::read_dir("/sys/class/net").context("list /sys/class/net")? {
        let entry = entry?;
        let address = std::fs::read_to_string(entry.path().join("address")).unwrap_or_default();
        if address.trim() == wanted {
            return Ok(entry.file_name().to_string_lossy().into_owned());
        }
    }
    bail!("no network device with MAC address {mac}")
}

/// Brings up `interface` with its addresses.
pub async fn configure(interface: &Interface) -> anyhow::Result<()> {
    let device = device_with_mac(&interface.mac)?;
    if interface.mtu > 0 {
        run_ip(&["link", "set", &device, "mtu", &interface.mtu.to_string()]).await?;
    }
    for address in &interface.addresses {
        run_ip(&["addr", "add", address, "dev", &device]).await?;
    }
    run_ip(&["link", "set", &device, "up"]).await
}

/// Adds `route`.
pub async fn add_route(route: &Route) -> anyhow::Result<()> {
    let destination = if route.destination.is_empty() {
        "default"
    } else {
        route.destination.as_str()
    };
    let mut args = vec!["route", "add", destination];
    if !route.gateway.is_empty() {
        args.extend(["via", route.gateway.as_str()]);
    }
    run_ip(&args).await
}
