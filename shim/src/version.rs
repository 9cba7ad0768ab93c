//! Which Task API version the shim announces to the containerd that starts it.
//!
//! containerd 1.6 reads a plain address from `start` and speaks the Task API v2; 1.7
//! accepts bootstrap parameters up to version 2; 2.x accepts version 3 and then sends the
//! pod's containers' Task API v3 calls straight to the pod's shim, without running the
//! binary for each of them. The shim asks containerd its version over its own gRPC socket
//! (`containerd.services.version.v1.Version`); when that fails it announces version 2,
//! which every release understands.

use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::Endpoint;

/// How long `start` waits for containerd's version.
const VERSION_TIMEOUT: Duration = Duration::from_secs(2);

const VERSION_PATH: &str = "/containerd.services.version.v1.Version/Version";

/// `containerd.services.version.v1.VersionResponse`.
#[derive(Clone, PartialEq, prost::Message)]
struct VersionResponse {
    #[prost(string, tag = "1")]
    version: String,
    #[prost(string, tag = "2")]
    revision: String,
}

/// The Task API version to announce to the containerd serving gRPC on `address`.
pub fn task_api_version(address: &str) -> u32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(_) => return 2,
    };
    let version = runtime.block_on(async {
        tokio::time::timeout(VERSION_TIMEOUT, containerd_version(address))
            .await
            .ok()
            .flatten()
    });
    version.as_deref().map_or(2, version_for)
}

/// The Task API version for containerd `version` (`v2.1.9`, `2.1.9+unknown`,
/// `1.7.24~ds1`).
fn version_for(version: &str) -> u32 {
    let major = version
        .trim_start_matches('v')
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|major| major.parse::<u32>().ok());
    match major {
        Some(major) if major >= 2 => 3,
        _ => 2,
    }
}

async fn containerd_version(address: &str) -> Option<String> {
    let path = address.trim_start_matches("unix://").to_string();
    let channel = Endpoint::from_static("http://[::1]:0")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .ok()?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.ok()?;
    let codec = tonic_prost::ProstCodec::<(), VersionResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(VERSION_PATH);
    let response = grpc
        .unary(tonic::Request::new(()), path, codec)
        .await
        .ok()?;
    let version = response.into_inner();
    tracing::debug!(version = %version.version, revision = %version.revision, "containerd version");
    Some(version.version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_2_gets_version_3() {
        assert_eq!(version_for("v2.1.9"), 3);
        assert_eq!(version_for("2.1.9+unknown"), 3);
        assert_eq!(version_for("1.7.24~ds1"), 2);
        assert_eq!(version_for("v1.6.20"), 2);
        assert_eq!(version_for("garbage"), 2);
    }

    #[test]
    fn an_unreachable_containerd_gets_version_2() {
        assert_eq!(task_api_version("/nonexistent/containerd.sock"), 2);
    }
}
