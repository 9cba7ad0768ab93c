//! The guest agent of the microVM family, and the contract between it and the host.
//!
//! The agent is the VM's init. It serves, over ttrpc on vsock port [`AGENT_PORT`],
//! containerd's Task API for the pod's containers (run by `runc` inside the guest) and
//! the [`api::agent_ttrpc::Agent`] service for what concerns the VM itself. The host
//! shares container bundles into the guest over 9p (tag [`SHARE_TAG`], mounted at
//! [`GUEST_SHARE_DIR`]) and receives container stdio over vsock connections the agent
//! opens to it (see [`stdio`]).

/// Generated code of `proto/agent.proto`.
#[allow(missing_docs, unused, nonstandard_style, clippy::all)]
pub mod api {
    /// Messages.
    pub mod agent {
        include!(concat!(env!("OUT_DIR"), "/agent.rs"));
    }
    /// The ttrpc service and client.
    pub mod agent_ttrpc {
        include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
    }
}

/// Guest vsock port of the agent's ttrpc server.
pub const AGENT_PORT: u32 = 1024;

/// The host's vsock context id, as seen from a guest.
pub const HOST_CID: u32 = 2;

/// 9p mount tag of the directory the host shares with the guest.
pub const SHARE_TAG: &str = "kuasar";

/// Where the guest mounts the shared directory.
pub const GUEST_SHARE_DIR: &str = "/run/kuasar/share";

/// The line the agent writes on the virtio-serial port once it serves: the host waits
/// for it before its first vsock connection, since requests that reach the vsock
/// backend while the guest's driver starts can stall it.
pub const READY_LINE: &str = "KUASAR-AGENT-READY";

/// Kernel command-line parameter carrying the sandbox id, for the agent's logs.
pub const SANDBOX_PARAM: &str = "kuasar.sandbox";

/// Container stdio across the VM boundary.
///
/// In the Task API requests the host sends to the agent, a stream is not a FIFO path
/// but `vsock://<cid>:<port>`: the agent connects there (the host, CID 2, listening on
/// a port of its choosing) and copies the stream over that connection.
pub mod stdio {
    /// The stdio address of host port `port`.
    pub fn host_address(port: u32) -> String {
        format!("vsock://{}:{port}", super::HOST_CID)
    }

    /// The context id and port of a `vsock://<cid>:<port>` stdio address.
    pub fn parse(address: &str) -> Option<(u32, u32)> {
        let (cid, port) = address.strip_prefix("vsock://")?.split_once(':')?;
        Some((cid.parse().ok()?, port.parse().ok()?))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn addresses_round_trip_and_paths_are_not_addresses() {
            assert_eq!(parse(&host_address(2001)), Some((2, 2001)));
            assert_eq!(parse("/run/containerd/fifo/1-stdout"), None);
            assert_eq!(parse("vsock://2"), None);
            assert_eq!(parse("vsock://x:1"), None);
            assert_eq!(parse("vsock://2:99999999999"), None);
        }
    }
}
