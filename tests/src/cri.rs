//! A small CRI client for tests: the `runtime.v1` services of containerd over its unix socket,
//! with one call per lifecycle step and a reader for CRI container log files.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    Container, ContainerConfig, ContainerFilter, ContainerState, ContainerStatus,
    ContainerStatusRequest, CreateContainerRequest, ExecSyncRequest, ExecSyncResponse, Image,
    ImageSpec, ImageStatusRequest, ImageStatusResponse, ListContainersRequest, ListImagesRequest,
    ListPodSandboxRequest, PodSandbox, PodSandboxConfig, PodSandboxFilter, PodSandboxStatus,
    PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StatusRequest, StatusResponse, StopContainerRequest,
    StopPodSandboxRequest, VersionRequest, VersionResponse,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Deadline of a single CRI request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How often [`CriClient::wait_container_exited`] polls the container's status.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A connection to a CRI endpoint. Cheap to clone; every call takes `&self`.
#[derive(Clone)]
pub struct CriClient {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    socket: PathBuf,
}

impl CriClient {
    /// Connects to the CRI services served on the unix socket `socket`.
    pub async fn connect(socket: &Path) -> Result<Self> {
        let path = socket.to_path_buf();
        let channel =
            Endpoint::try_from("http://[::1]:0")
                .context("invalid placeholder endpoint")?
                .timeout(REQUEST_TIMEOUT)
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .with_context(|| format!("cannot connect to CRI socket {}", socket.display()))?;

        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            socket: socket.to_path_buf(),
        })
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The runtime's name and versions.
    pub async fn version(&self) -> Result<VersionResponse> {
        let request = VersionRequest {
            version: "v1".to_string(),
        };
        let response = self
            .runtime
            .clone()
            .version(request)
            .await
            .context("CRI Version")?;
        Ok(response.into_inner())
    }

    /// The runtime's conditions (RuntimeReady, NetworkReady) and handlers.
    pub async fn status(&self) -> Result<StatusResponse> {
        let request = StatusRequest { verbose: false };
        let response = self
            .runtime
            .clone()
            .status(request)
            .await
            .context("CRI Status")?;
        Ok(response.into_inner())
    }

    /// Runs a pod sandbox on `runtime_handler` and returns its id.
    pub async fn run_pod(
        &self,
        config: &PodSandboxConfig,
        runtime_handler: &str,
    ) -> Result<String> {
        let request = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: runtime_handler.to_string(),
        };
        let response = self
            .runtime
            .clone()
            .run_pod_sandbox(request)
            .await
            .with_context(|| {
                format!(
                    "CRI RunPodSandbox {} on handler {runtime_handler:?}",
                    pod_name(config)
                )
            })?;
        Ok(response.into_inner().pod_sandbox_id)
    }

    /// The status of pod `pod_id`.
    pub async fn pod_status(&self, pod_id: &str) -> Result<PodSandboxStatus> {
        let request = PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.to_string(),
            verbose: false,
        };
        let response = self
            .runtime
            .clone()
            .pod_sandbox_status(request)
            .await
            .with_context(|| format!("CRI PodSandboxStatus {pod_id}"))?;
        response
            .into_inner()
            .status
            .with_context(|| format!("CRI PodSandboxStatus {pod_id} returned no status"))
    }

    /// Stops every container of pod `pod_id` and the pod itself.
    pub async fn stop_pod(&self, pod_id: &str) -> Result<()> {
        let request = StopPodSandboxRequest {
            pod_sandbox_id: pod_id.to_string(),
        };
        self.runtime
            .clone()
            .stop_pod_sandbox(request)
            .await
            .with_context(|| format!("CRI StopPodSandbox {pod_id}"))?;
        Ok(())
    }

    /// Removes pod `pod_id` and its containers.
    pub async fn remove_pod(&self, pod_id: &str) -> Result<()> {
        let request = RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.to_string(),
        };
        self.runtime
            .clone()
            .remove_pod_sandbox(request)
            .await
            .with_context(|| format!("CRI RemovePodSandbox {pod_id}"))?;
        Ok(())
    }

    /// All pods the runtime knows of.
    pub async fn list_pods(&self) -> Result<Vec<PodSandbox>> {
        let request = ListPodSandboxRequest {
            filter: Some(PodSandboxFilter::default()),
        };
        let response = self
            .runtime
            .clone()
            .list_pod_sandbox(request)
            .await
            .context("CRI ListPodSandbox")?;
        Ok(response.into_inner().items)
    }

    /// Creates container `config` in pod `pod_id`, which was run with `pod_config`.
    pub async fn create_container(
        &self,
        pod_id: &str,
        config: &ContainerConfig,
        pod_config: &PodSandboxConfig,
    ) -> Result<String> {
        let request = CreateContainerRequest {
            pod_sandbox_id: pod_id.to_string(),
            config: Some(config.clone()),
            sandbox_config: Some(pod_config.clone()),
        };
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.as_str())
            .unwrap_or("");
        let response = self
            .runtime
            .clone()
            .create_container(request)
            .await
            .with_context(|| format!("CRI CreateContainer {name:?} in pod {pod_id}"))?;
        Ok(response.into_inner().container_id)
    }

    /// Starts created container `container_id`.
    pub async fn start_container(&self, container_id: &str) -> Result<()> {
        let request = StartContainerRequest {
            container_id: container_id.to_string(),
        };
        self.runtime
            .clone()
            .start_container(request)
            .await
            .with_context(|| format!("CRI StartContainer {container_id}"))?;
        Ok(())
    }

    /// Stops container `container_id`: SIGTERM, then SIGKILL after `timeout_secs`.
    pub async fn stop_container(&self, container_id: &str, timeout_secs: i64) -> Result<()> {
        let request = StopContainerRequest {
            container_id: container_id.to_string(),
            timeout: timeout_secs,
        };
        self.runtime
            .clone()
            .stop_container(request)
            .await
            .with_context(|| format!("CRI StopContainer {container_id}"))?;
        Ok(())
    }

    /// Removes container `container_id`.
    pub async fn remove_container(&self, container_id: &str) -> Result<()> {
        let request = RemoveContainerRequest {
            container_id: container_id.to_string(),
        };
        self.runtime
            .clone()
            .remove_container(request)
            .await
            .with_context(|| format!("CRI RemoveContainer {container_id}"))?;
        Ok(())
    }

    /// The status of container `container_id`.
    pub async fn container_status(&self, container_id: &str) -> Result<ContainerStatus> {
        let request = ContainerStatusRequest {
            container_id: container_id.to_string(),
            verbose: false,
        };
        let response = self
            .runtime
            .clone()
            .container_status(request)
            .await
            .with_context(|| format!("CRI ContainerStatus {container_id}"))?;
        response
            .into_inner()
            .status
            .with_context(|| format!("CRI ContainerStatus {container_id} returned no status"))
    }

    /// Containers of pod `pod_id`, or of every pod when `pod_id` is `None`.
    pub async fn list_containers(&self, pod_id: Option<&str>) -> Result<Vec<Container>> {
        let filter = ContainerFilter {
            pod_sandbox_id: pod_id.unwrap_or_default().to_string(),
            ..Default::default()
        };
        let request = ListContainersRequest {
            filter: Some(filter),
        };
        let response = self
            .runtime
            .clone()
            .list_containers(request)
            .await
            .context("CRI ListContainers")?;
        Ok(response.into_inner().containers)
    }

    /// Asks for a streaming exec session (what `crictl exec -it` does) and returns the URL
    /// of containerd's streaming server to attach to.
    pub async fn exec_stream_url(
        &self,
        container_id: &str,
        cmd: &[&str],
        tty: bool,
    ) -> Result<String> {
        let request = k8s_cri::v1::ExecRequest {
            container_id: container_id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            tty,
            stdin: true,
            stdout: true,
            stderr: !tty,
        };
        let response = self
            .runtime
            .clone()
            .exec(request)
            .await
            .with_context(|| format!("CRI Exec {cmd:?} in {container_id}"))?;
        Ok(response.into_inner().url)
    }

    /// Runs `cmd` in container `container_id` and waits for it for at most `timeout_secs`.
    pub async fn exec_sync(
        &self,
        container_id: &str,
        cmd: &[&str],
        timeout_secs: i64,
    ) -> Result<ExecSyncResponse> {
        let request = ExecSyncRequest {
            container_id: container_id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout_secs,
        };
        let response = self
            .runtime
            .clone()
            .exec_sync(request)
            .await
            .with_context(|| format!("CRI ExecSync {cmd:?} in {container_id}"))?;
        Ok(response.into_inner())
    }

    /// Resource usage of container `container_id`.
    pub async fn container_stats(&self, container_id: &str) -> Result<k8s_cri::v1::ContainerStats> {
        let request = k8s_cri::v1::ContainerStatsRequest {
            container_id: container_id.to_string(),
        };
        let response = self
            .runtime
            .clone()
            .container_stats(request)
            .await
            .with_context(|| format!("CRI ContainerStats {container_id}"))?;
        response
            .into_inner()
            .stats
            .with_context(|| format!("CRI ContainerStats {container_id}: no stats"))
    }

    /// Applies new resource limits to container `container_id`.
    pub async fn update_container_resources(
        &self,
        container_id: &str,
        linux: k8s_cri::v1::LinuxContainerResources,
    ) -> Result<()> {
        let request = k8s_cri::v1::UpdateContainerResourcesRequest {
            container_id: container_id.to_string(),
            linux: Some(linux),
            ..Default::default()
        };
        self.runtime
            .clone()
            .update_container_resources(request)
            .await
            .with_context(|| format!("CRI UpdateContainerResources {container_id}"))?;
        Ok(())
    }

    /// Polls container `container_id` until it has exited, for at most `timeout`.
    pub async fn wait_container_exited(
        &self,
        container_id: &str,
        timeout: Duration,
    ) -> Result<ContainerStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.container_status(container_id).await?;
            if status.state == ContainerState::ContainerExited as i32 {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "container {container_id} has not exited within {timeout:?} (state {})",
                    state_name(status.state)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Images the CRI image service knows of.
    pub async fn list_images(&self) -> Result<Vec<Image>> {
        let request = ListImagesRequest { filter: None };
        let response = self
            .images
            .clone()
            .list_images(request)
            .await
            .context("CRI ListImages")?;
        Ok(response.into_inner().images)
    }

    /// The CRI image service's verbose status of `image`; its `image` is empty when the
    /// image is unknown.
    pub async fn image_status(&self, image: &str) -> Result<ImageStatusResponse> {
        let request = ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: true,
        };
        let response = self
            .images
            .clone()
            .image_status(request)
            .await
            .with_context(|| format!("CRI ImageStatus {image}"))?;
        Ok(response.into_inner())
    }

    /// Stops and removes every pod, continuing past failures; returns the first error.
    pub async fn remove_all_pods(&self) -> Result<()> {
        let mut first_error = None;
        for pod in self.list_pods().await? {
            let result = async {
                self.stop_pod(&pod.id).await?;
                self.remove_pod(&pod.id).await
            }
            .await;
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Exec or log output as trimmed text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

/// An [`ImageSpec`] naming `image`.
pub fn image_spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.to_string(),
        ..Default::default()
    }
}

/// The proto name of a container state value.
pub fn state_name(state: i32) -> &'static str {
    ContainerState::try_from(state)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN_VALUE")
}

/// Path of a container's CRI log file: the pod's `log_directory` joined with the container's
/// `log_path`.
pub fn container_log_file(
    pod_config: &PodSandboxConfig,
    container_config: &ContainerConfig,
) -> PathBuf {
    Path::new(&pod_config.log_directory).join(&container_config.log_path)
}

/// The text a container wrote to stdout and stderr, from its CRI log file.
pub fn read_container_log(path: &Path) -> Result<String> {
    let content = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read container log {}", path.display()))?;
    parse_cri_log(&content).with_context(|| format!("malformed container log {}", path.display()))
}

/// Joins the messages of a CRI log (`<timestamp> <stream> <P|F> <text>` per line) into the
/// plain text: a full (`F`) record ends a line, a partial (`P`) one continues it.
pub fn parse_cri_log(content: &str) -> Result<String> {
    let mut text = String::new();
    for (index, line) in content.lines().enumerate() {
        let mut fields = line.splitn(4, ' ');
        let (Some(_timestamp), Some(stream), Some(tag)) =
            (fields.next(), fields.next(), fields.next())
        else {
            bail!("line {}: too few fields: {line:?}", index + 1);
        };
        if stream != "stdout" && stream != "stderr" {
            bail!("line {}: unknown stream {stream:?}", index + 1);
        }
        text.push_str(fields.next().unwrap_or(""));
        match tag {
            "F" => text.push('\n'),
            "P" => {}
            other => bail!("line {}: unknown tag {other:?}", index + 1),
        }
    }
    Ok(text)
}

fn pod_name(config: &PodSandboxConfig) -> String {
    config
        .metadata
        .as_ref()
        .map(|m| format!("{:?}", m.name))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_and_partial_records() {
        let log = "2024-01-01T00:00:00.000000000Z stdout F hello\n\
                   2024-01-01T00:00:00.000000001Z stderr P par\n\
                   2024-01-01T00:00:00.000000002Z stderr F tial\n\
                   2024-01-01T00:00:00.000000003Z stdout F \n";
        assert_eq!(parse_cri_log(log).unwrap(), "hello\npartial\n\n");
    }

    #[test]
    fn rejects_unknown_tags() {
        assert!(parse_cri_log("2024-01-01T00:00:00Z stdout X hi\n").is_err());
    }
}
