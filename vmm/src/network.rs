//! The pod's network, wired into its VM.
//!
//! CRI's network plugin gives the pod a network namespace with one interface (a veth,
//! `eth0`) holding the pod's address. QEMU runs in that namespace and creates a tap
//! device there; traffic arriving on either device is redirected to the other with tc,
//! so the guest's card, which gets the veth's MAC address, owns the pod's address as if
//! it were the veth. The guest is configured with the same addresses and routes.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

/// Name of the VM's tap device in the pod's network namespace.
pub const TAP: &str = "tap0";

/// How long QEMU gets to create its tap device.
const TAP_TIMEOUT: Duration = Duration::from_secs(10);

/// The pod's interface as CRI's network plugin set it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    /// Its name in the namespace, e.g. `eth0`.
    pub name: String,
    /// Its MAC address.
    pub mac: String,
    /// Its MTU.
    pub mtu: u32,
    /// Its addresses in CIDR form.
    pub addresses: Vec<String>,
}

/// A route of the pod's namespace through the pod's interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRoute {
    /// Destination in CIDR form; empty for the default route.
    pub destination: String,
    /// Gateway; empty for a link route.
    pub gateway: String,
}

/// What the guest needs of the pod's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    /// The interface the VM takes over.
    pub interface: PodInterface,
    /// Routes through it that need a gateway (link routes come with the addresses).
    pub routes: Vec<PodRoute>,
}

/// Runs `args` in the network namespace `netns` and returns its output.
async fn in_netns(netns: &Path, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net={}", netns.display()))
        .arg("--")
        .args(args);
    let output = kuasar_sandbox::reaper::output(&mut command)
        .await
        .context("run nsenter")?;
    if output.status.code != 0 {
        bail!(
            "{} in {}: {}",
            args.join(" "),
            netns.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output.stdout)
}

/// Reads the pod's interface and routes from its namespace.
pub async fn inspect(netns: &Path) -> anyhow::Result<PodNetwork> {
    let links = in_netns(netns, &["ip", "-json", "address", "show"]).await?;
    let interface = pod_interface(&serde_json::from_slice(&links).context("parse ip's addresses")?)
        .with_context(|| format!("network namespace {}", netns.display()))?;
    let routes = in_netns(netns, &["ip", "-json", "-4", "route", "show"]).await?;
    let routes = gateway_routes(
        &serde_json::from_slice(&routes).context("parse ip's routes")?,
        &interface.name,
    );
    Ok(PodNetwork { interface, routes })
}

/// The namespace's one interface with a global address.
fn pod_interface(links: &Value) -> anyhow::Result<PodInterface> {
    let mut found = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        let name = link["ifname"].as_str().unwrap_or_default();
        if name == "lo" || name == TAP {
            continue;
        }
        let addresses: Vec<String> = link["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["scope"] == "global")
            .filter_map(|a| {
                Some(format!(
                    "{}/{}",
                    a["local"].as_str()?,
                    a["prefixlen"].as_u64()?
                ))
            })
            .collect();
        if addresses.is_empty() {
            continue;
        }
        found.push(PodInterface {
            name: name.to_string(),
            mac: link["address"].as_str().unwrap_or_default().to_string(),
            mtu: link["mtu"].as_u64().unwrap_or(1500) as u32,
            addresses,
        });
    }
    match found.len() {
        0 => bail!("no interface with an address: the pod's network is not set up"),
        1 => Ok(found.remove(0)),
        _ => {
            let names: Vec<&str> = found.iter().map(|i| i.name.as_str()).collect();
            bail!(
                "several interfaces with addresses ({}): a VM takes one",
                names.join(", ")
            )
        }
    }
}

/// The routes through `device` that have a gateway.
fn gateway_routes(routes: &Value, device: &str) -> Vec<PodRoute> {
    routes
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["dev"] == device)
        .filter_map(|r| {
            let gateway = r["gateway"].as_str()?;
            let destination = match r["dst"].as_str()? {
                "default" => String::new(),
                dst => dst.to_string(),
            };
            Some(PodRoute {
                destination,
                gateway: gateway.to_string(),
            })
        })
        .collect()
}

/// Joins the VM's tap to the pod's interface once QEMU has created it: both up, and
/// each one's incoming traffic sent out of the other.
pub async fn connect_tap(netns: &Path, interface: &PodInterface) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + TAP_TIMEOUT;
    while in_netns(netns, &["ip", "link", "show", TAP]).await.is_err() {
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "QEMU did not create tap device {TAP} in {} within {TAP_TIMEOUT:?}",
                netns.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A boot that failed before this one may have left the interface's redirect.
    disconnect(netns, &interface.name).await;
    let mtu = interface.mtu.to_string();
    in_netns(netns, &["ip", "link", "set", TAP, "mtu", &mtu, "up"]).await?;
    for (from, to) in [
        (interface.name.as_str(), TAP),
        (TAP, interface.name.as_str()),
    ] {
        in_netns(netns, &["tc", "qdisc", "add", "dev", from, "ingress"]).await?;
        in_netns(
            netns,
            &[
                "tc", "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32",
                "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
            ],
        )
        .await?;
    }
    Ok(())
}

/// Undoes [`connect_tap`] on the pod's interface; the tap goes with QEMU.
pub async fn disconnect(netns: &Path, interface: &str) {
    if let Err(err) = in_netns(netns, &["tc", "qdisc", "del", "dev", interface, "ingress"]).await {
        tracing::debug!(error = format!("{err:#}"), "no redirect to remove");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_pod_interface_is_the_one_with_a_global_address() {
        let links = json!([
            { "ifname": "lo", "address": "00:00:00:00:00:00", "mtu": 65536,
              "addr_info": [{ "family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host" }] },
            { "ifname": "eth0", "address": "0a:58:0a:e7:05:07", "mtu": 1500,
              "addr_info": [
                { "family": "inet", "local": "10.231.5.7", "prefixlen": 24, "scope": "global" },
                { "family": "inet6", "local": "fe80::858:aff:fee7:507", "prefixlen": 64, "scope": "link" }
              ] }
        ]);
        let interface = pod_interface(&links).unwrap();
        assert_eq!(
            interface,
            PodInterface {
                name: "eth0".into(),
                mac: "0a:58:0a:e7:05:07".into(),
                mtu: 1500,
                addresses: vec!["10.231.5.7/24".into()],
            }
        );
    }

    #[test]
    fn a_namespace_without_addresses_or_with_several_interfaces_is_refused() {
        let none = json!([{ "ifname": "lo", "addr_info": [] }]);
        assert!(pod_interface(&none)
            .unwrap_err()
            .to_string()
            .contains("not set up"));
        let link = |name: &str, ip: &str| {
            json!({ "ifname": name, "address": "x", "mtu": 1500,
            "addr_info": [{ "local": ip, "prefixlen": 24, "scope": "global" }] })
        };
        let two = json!([link("eth0", "10.0.0.2"), link("eth1", "10.0.1.2")]);
        assert!(pod_interface(&two)
            .unwrap_err()
            .to_string()
            .contains("eth0, eth1"));
    }

    #[test]
    fn only_gateway_routes_through_the_pod_interface_are_kept() {
        let routes = json!([
            { "dst": "default", "gateway": "10.231.5.1", "dev": "eth0" },
            { "dst": "10.231.5.0/24", "dev": "eth0", "scope": "link" },
            { "dst": "192.168.0.0/16", "gateway": "10.231.5.254", "dev": "eth0" },
            { "dst": "default", "gateway": "172.16.0.1", "dev": "eth1" }
        ]);
        assert_eq!(
            gateway_routes(&routes, "eth0"),
            [
                PodRoute {
                    destination: String::new(),
                    gateway: "10.231.5.1".into()
                },
                PodRoute {
                    destination: "192.168.0.0/16".into(),
                    gateway: "10.231.5.254".into()
                },
            ]
        );
    }
}
