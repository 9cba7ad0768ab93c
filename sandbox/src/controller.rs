//! containerd's Sandbox API (`containerd.services.sandbox.v1.Controller`) over a
//! [`Sandboxer`]: request validation, id checks, status codes and time conversions, so
//! that a family only implements what differs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use k8s_cri::v1::PodSandboxConfig;
use prost::Message;
use tonic::{Request, Response, Status};

use crate::api::sandbox::controller_server::Controller;
use crate::api::sandbox::*;
use crate::api::types::{Metric, Mount, Platform};
use crate::error::{Error, Result};
use crate::id;

/// Type URL suffix of the CRI pod configuration containerd passes at creation.
const POD_CONFIG_TYPE: &str = "runtime.v1.PodSandboxConfig";

/// What containerd asks for when it creates a sandbox.
#[derive(Debug, Clone, Default)]
pub struct SandboxRequest {
    /// Sandbox id, already validated as a safe path component.
    pub id: String,
    /// The network namespace CRI prepared; `None` for a host-network pod.
    pub netns_path: Option<PathBuf>,
    /// The CRI pod configuration, when the sandbox is created for a Kubernetes pod.
    pub pod: Option<PodSandboxConfig>,
    /// Root filesystem mounts of the sandbox, if any.
    pub rootfs: Vec<Mount>,
    /// Annotations from containerd.
    pub annotations: HashMap<String, String>,
}

/// A started sandbox, as containerd needs to know it.
#[derive(Debug, Clone)]
pub struct StartedSandbox {
    /// Pid of the process whose namespaces the containers join.
    pub pid: u32,
    /// When the sandbox was created.
    pub created_at: SystemTime,
    /// Task API address for the sandbox's containers.
    pub address: String,
    /// Task API version served at `address`.
    pub version: u32,
    /// Labels for containerd, e.g. `selinux_label`.
    pub labels: HashMap<String, String>,
}

/// Whether a sandbox can run containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxState {
    /// Created or started and healthy.
    Ready,
    /// Stopped, or its holder process is gone.
    NotReady,
}

impl SandboxState {
    /// The CRI name of the state, which containerd passes through.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Ready => "SANDBOX_READY",
            SandboxState::NotReady => "SANDBOX_NOTREADY",
        }
    }
}

/// A sandbox's status.
#[derive(Debug, Clone)]
pub struct SandboxStatus {
    /// Pid of the holder process (0 before start).
    pub pid: u32,
    /// Readiness.
    pub state: SandboxState,
    /// Free-form details for verbose status.
    pub info: HashMap<String, String>,
    /// When the sandbox was created.
    pub created_at: SystemTime,
    /// When the sandbox stopped, if it did.
    pub exited_at: Option<SystemTime>,
    /// Task API address.
    pub address: String,
    /// Task API version.
    pub version: u32,
}

/// How a sandbox ended.
#[derive(Debug, Clone, Copy)]
pub struct SandboxExit {
    /// Exit status of the sandbox's holder.
    pub code: u32,
    /// When it ended.
    pub at: SystemTime,
}

/// A family's sandboxes. Every id handed in has passed [`id::validate`].
#[async_trait]
pub trait Sandboxer: Send + Sync + 'static {
    /// Finds the sandboxes an earlier run of the sandboxer left running, before the
    /// Sandbox API is served. Families whose sandboxes end with the sandboxer keep this
    /// default.
    async fn recover(&self) -> anyhow::Result<()> {
        Ok(())
    }

    /// Prepares a sandbox without starting anything that runs.
    async fn create(&self, request: SandboxRequest) -> Result<()>;

    /// Starts a created sandbox and its Task API server.
    async fn start(&self, id: &str) -> Result<StartedSandbox>;

    /// Stops a sandbox's containers and its holder; the sandbox stays known until shutdown.
    async fn stop(&self, id: &str, timeout: Option<Duration>) -> Result<()>;

    /// Waits until a sandbox stops.
    async fn wait(&self, id: &str) -> Result<SandboxExit>;

    /// Reports a sandbox's state.
    async fn status(&self, id: &str, verbose: bool) -> Result<SandboxStatus>;

    /// Releases everything a sandbox holds and forgets it.
    async fn shutdown(&self, id: &str) -> Result<()>;

    /// Resource usage of a whole sandbox, as an `Any` containerd can decode.
    async fn metrics(&self, id: &str) -> Result<Option<prost_types::Any>> {
        self.status(id, false).await?;
        Ok(None)
    }

    /// The platform containers of this sandbox run on.
    fn platform(&self) -> Platform {
        host_platform()
    }
}

/// The OS and architecture of this host, in the names containerd uses.
pub fn host_platform() -> Platform {
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    Platform {
        os: std::env::consts::OS.to_string(),
        architecture: architecture.to_string(),
        ..Default::default()
    }
}

/// Adapts a [`Sandboxer`] to containerd's gRPC controller service.
pub struct ControllerService<S> {
    sandboxer: std::sync::Arc<S>,
}

impl<S: Sandboxer> ControllerService<S> {
    /// Serves `sandboxer`.
    pub fn new(sandboxer: std::sync::Arc<S>) -> Self {
        Self { sandboxer }
    }

    /// Runs `change` to its end even when containerd hangs up first (a shim killed, a
    /// deadline passed): a Create, Start, Stop or Shutdown dropped halfway would leave
    /// processes, mounts or files that no sandbox accounts for.
    async fn to_completion<T, F, Fut>(&self, what: &str, change: F) -> Result<T>
    where
        F: FnOnce(std::sync::Arc<S>) -> Fut,
        Fut: std::future::Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        tokio::spawn(change(self.sandboxer.clone()))
            .await
            .map_err(|err| Error::Internal(anyhow::anyhow!("{what} did not finish: {err}")))?
    }
}

fn prost_timestamp(time: SystemTime) -> prost_types::Timestamp {
    let since_epoch = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: since_epoch.as_secs() as i64,
        nanos: since_epoch.subsec_nanos() as i32,
    }
}

fn checked_id(id: &str) -> Result<&str> {
    id::validate("sandbox", id)?;
    Ok(id)
}

/// Decodes the CRI pod configuration from the create request's options.
pub fn decode_pod_config(options: Option<&prost_types::Any>) -> Result<Option<PodSandboxConfig>> {
    let Some(options) = options else {
        return Ok(None);
    };
    if !options.type_url.ends_with(POD_CONFIG_TYPE) {
        return Ok(None);
    }
    PodSandboxConfig::decode(options.value.as_slice())
        .map(Some)
        .map_err(|err| {
            Error::InvalidArgument(format!("options are not a valid {POD_CONFIG_TYPE}: {err}"))
        })
}

#[async_trait]
impl<S: Sandboxer> Controller for ControllerService<S> {
    async fn create(
        &self,
        request: Request<ControllerCreateRequest>,
    ) -> std::result::Result<Response<ControllerCreateResponse>, Status> {
        let req = request.into_inner();
        let id = checked_id(&req.sandbox_id)?.to_string();
        let netns_path = (!req.netns_path.is_empty()).then(|| PathBuf::from(&req.netns_path));
        if let Some(path) = &netns_path {
            if !path.is_absolute() {
                return Err(Error::InvalidArgument(format!(
                    "sandbox {id:?}: netns path {:?} is not absolute",
                    req.netns_path
                ))
                .into());
            }
        }
        let pod = decode_pod_config(req.options.as_ref()).map_err(|err| match err {
            Error::InvalidArgument(msg) => Error::InvalidArgument(format!("sandbox {id:?}: {msg}")),
            other => other,
        })?;
        let request = SandboxRequest {
            id: id.clone(),
            netns_path,
            pod,
            rootfs: req.rootfs,
            annotations: req.annotations,
        };
        self.to_completion("Create", |sandboxer| async move {
            sandboxer.create(request).await
        })
        .await?;
        Ok(Response::new(ControllerCreateResponse { sandbox_id: id }))
    }

    async fn start(
        &self,
        request: Request<ControllerStartRequest>,
    ) -> std::result::Result<Response<ControllerStartResponse>, Status> {
        let req = request.into_inner();
        let id = checked_id(&req.sandbox_id)?.to_string();
        let started = self
            .to_completion(
                "Start",
                |sandboxer| async move { sandboxer.start(&id).await },
            )
            .await?;
        Ok(Response::new(ControllerStartResponse {
            sandbox_id: req.sandbox_id,
            pid: started.pid,
            created_at: Some(prost_timestamp(started.created_at)),
            labels: started.labels,
            address: started.address,
            version: started.version,
            spec: None,
        }))
    }

    async fn platform(
        &self,
        request: Request<ControllerPlatformRequest>,
    ) -> std::result::Result<Response<ControllerPlatformResponse>, Status> {
        let req = request.into_inner();
        self.sandboxer
            .status(checked_id(&req.sandbox_id)?, false)
            .await?;
        Ok(Response::new(ControllerPlatformResponse {
            platform: Some(self.sandboxer.platform()),
        }))
    }

    async fn stop(
        &self,
        request: Request<ControllerStopRequest>,
    ) -> std::result::Result<Response<ControllerStopResponse>, Status> {
        let req = request.into_inner();
        let timeout = (req.timeout_secs > 0).then(|| Duration::from_secs(req.timeout_secs.into()));
        let id = checked_id(&req.sandbox_id)?.to_string();
        self.to_completion("Stop", |sandboxer| async move {
            sandboxer.stop(&id, timeout).await
        })
        .await?;
        Ok(Response::new(ControllerStopResponse {}))
    }

    async fn wait(
        &self,
        request: Request<ControllerWaitRequest>,
    ) -> std::result::Result<Response<ControllerWaitResponse>, Status> {
        let req = request.into_inner();
        let exit = self.sandboxer.wait(checked_id(&req.sandbox_id)?).await?;
        Ok(Response::new(ControllerWaitResponse {
            exit_status: exit.code,
            exited_at: Some(prost_timestamp(exit.at)),
        }))
    }

    async fn status(
        &self,
        request: Request<ControllerStatusRequest>,
    ) -> std::result::Result<Response<ControllerStatusResponse>, Status> {
        let req = request.into_inner();
        let status = self
            .sandboxer
            .status(checked_id(&req.sandbox_id)?, req.verbose)
            .await?;
        Ok(Response::new(ControllerStatusResponse {
            sandbox_id: req.sandbox_id,
            pid: status.pid,
            state: status.state.as_str().to_string(),
            info: if req.verbose {
                status.info
            } else {
                HashMap::new()
            },
            created_at: Some(prost_timestamp(status.created_at)),
            exited_at: status.exited_at.map(prost_timestamp),
            extra: None,
            address: status.address,
            version: status.version,
        }))
    }

    async fn shutdown(
        &self,
        request: Request<ControllerShutdownRequest>,
    ) -> std::result::Result<Response<ControllerShutdownResponse>, Status> {
        let req = request.into_inner();
        let id = checked_id(&req.sandbox_id)?.to_string();
        self.to_completion("Shutdown", |sandboxer| async move {
            sandboxer.shutdown(&id).await
        })
        .await?;
        Ok(Response::new(ControllerShutdownResponse {}))
    }

    async fn metrics(
        &self,
        request: Request<ControllerMetricsRequest>,
    ) -> std::result::Result<Response<ControllerMetricsResponse>, Status> {
        let req = request.into_inner();
        let data = self.sandboxer.metrics(checked_id(&req.sandbox_id)?).await?;
        let metrics = data.map(|data| Metric {
            timestamp: Some(prost_timestamp(SystemTime::now())),
            id: req.sandbox_id.clone(),
            data: Some(data),
        });
        Ok(Response::new(ControllerMetricsResponse { metrics }))
    }

    async fn update(
        &self,
        request: Request<ControllerUpdateRequest>,
    ) -> std::result::Result<Response<ControllerUpdateResponse>, Status> {
        // containerd keeps the sandbox record itself; the sandboxer only has to know it.
        let req = request.into_inner();
        self.sandboxer
            .status(checked_id(&req.sandbox_id)?, false)
            .await?;
        Ok(Response::new(ControllerUpdateResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_uses_containerd_names() {
        let platform = host_platform();
        assert_eq!(platform.os, "linux");
        #[cfg(target_arch = "x86_64")]
        assert_eq!(platform.architecture, "amd64");
    }

    #[test]
    fn decodes_pod_config_and_rejects_garbage() {
        let config = PodSandboxConfig {
            hostname: "web-0".into(),
            ..Default::default()
        };
        let any = prost_types::Any {
            type_url: format!("type.googleapis.com/{POD_CONFIG_TYPE}"),
            value: config.encode_to_vec(),
        };
        assert_eq!(
            decode_pod_config(Some(&any)).unwrap().unwrap().hostname,
            "web-0"
        );

        let garbage = prost_types::Any {
            type_url: POD_CONFIG_TYPE.into(),
            value: vec![0xff, 0xff, 0xff],
        };
        let err = decode_pod_config(Some(&garbage)).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");

        assert!(decode_pod_config(None).unwrap().is_none());
    }
}
