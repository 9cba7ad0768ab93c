//! The family's sandboxer, reached through its Sandbox API (`Controller`, gRPC on a unix
//! socket).
//!
//! The channel is lazy: it connects at the first call and again after the sandboxer
//! restarted, so a shim outlives a sandboxer restart. Errors name the socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use kuasar_sandbox::api::sandbox::controller_client::ControllerClient;
use kuasar_sandbox::api::sandbox::*;
use tonic::transport::{Channel, Endpoint};

/// How long an idempotent call waits for a restarting sandboxer.
pub const RECONNECT_WINDOW: Duration = Duration::from_secs(20);

const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// A client of one sandboxer.
#[derive(Clone)]
pub struct Sandboxer {
    socket: PathBuf,
    client: ControllerClient<Channel>,
}

impl Sandboxer {
    /// A client of the sandboxer serving `socket`; nothing is dialled yet.
    pub fn new(socket: &Path) -> Self {
        let path = socket.to_path_buf();
        let channel = Endpoint::from_static("http://[::1]:0")
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(TokioIo::new)
                }
            }));
        Self {
            socket: socket.to_path_buf(),
            client: ControllerClient::new(channel),
        }
    }

    /// The sandboxer's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn create(&self, request: ControllerCreateRequest) -> Result<(), tonic::Status> {
        let id = request.sandbox_id.clone();
        self.once("Create", &id, |mut c| {
            let request = request.clone();
            async move { c.create(request).await }
        })
        .await
        .map(drop)
    }

    pub async fn start(&self, id: &str) -> Result<ControllerStartResponse, tonic::Status> {
        let request = ControllerStartRequest {
            sandbox_id: id.to_string(),
            ..Default::default()
        };
        self.once("Start", id, |mut c| {
            let request = request.clone();
            async move { c.start(request).await }
        })
        .await
    }

    pub async fn platform(&self, id: &str) -> Result<ControllerPlatformResponse, tonic::Status> {
        let request = ControllerPlatformRequest {
            sandbox_id: id.to_string(),
            ..Default::default()
        };
        self.retrying("Platform", id, RECONNECT_WINDOW, |mut c| {
            let request = request.clone();
            async move { c.platform(request).await }
        })
        .await
    }

    pub async fn stop(&self, id: &str, timeout_secs: u32) -> Result<(), tonic::Status> {
        let request = ControllerStopRequest {
            sandbox_id: id.to_string(),
            timeout_secs,
            ..Default::default()
        };
        // Stopping a stopped sandbox is a no-op: safe to repeat.
        self.retrying("Stop", id, RECONNECT_WINDOW, |mut c| {
            let request = request.clone();
            async move { c.stop(request).await }
        })
        .await
        .map(drop)
    }

    /// Waits for the sandbox to exit, across sandboxer restarts (however long that takes):
    /// a wait cut short by anything but the sandboxer's own answer is made again.
    pub async fn wait(&self, id: &str) -> Result<ControllerWaitResponse, tonic::Status> {
        let request = ControllerWaitRequest {
            sandbox_id: id.to_string(),
            ..Default::default()
        };
        loop {
            match self.client.clone().wait(request.clone()).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if is_answer(&status) => return Err(self.explain("Wait", id, status)),
                Err(status) => {
                    tracing::warn!(sandbox_id = %id, socket = %self.socket.display(), error = %status.message(), "wait for the sandbox cut short, waiting again");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }

    pub async fn status(&self, id: &str) -> Result<ControllerStatusResponse, tonic::Status> {
        self.status_within(id, RECONNECT_WINDOW).await
    }

    /// Status, waiting at most `window` for an unreachable sandboxer.
    pub async fn status_within(
        &self,
        id: &str,
        window: Duration,
    ) -> Result<ControllerStatusResponse, tonic::Status> {
        let request = ControllerStatusRequest {
            sandbox_id: id.to_string(),
            ..Default::default()
        };
        self.retrying("Status", id, window, |mut c| {
            let request = request.clone();
            async move { c.status(request).await }
        })
        .await
    }

    pub async fn shutdown(&self, id: &str) -> Result<(), tonic::Status> {
        let request = ControllerShutdownRequest {
            sandbox_id: id.to_string(),
            ..Default::default()
        };
        self.retrying("Shutdown", id, RECONNECT_WINDOW, |mut c| {
            let request = request.clone();
            async move { c.shutdown(request).await }
        })
        .await
        .map(drop)
    }

    pub async fn metrics(&self, id: &str) -> Result<ControllerMetricsResponse, tonic::Status> {
        let request = ControllerMetricsRequest {
            sandbox_id: id.to_string(),
            ..Default::default()
        };
        self.retrying("Metrics", id, RECONNECT_WINDOW, |mut c| {
            let request = request.clone();
            async move { c.metrics(request).await }
        })
        .await
    }

    /// One attempt: a call that is not safe to repeat.
    async fn once<T, F, Fut>(&self, what: &str, id: &str, call: F) -> Result<T, tonic::Status>
    where
        F: Fn(ControllerClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        call(self.client.clone())
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| self.explain(what, id, status))
    }

    /// Repeats `call` while the sandboxer is unreachable, for at most `window`.
    async fn retrying<T, F, Fut>(
        &self,
        what: &str,
        id: &str,
        window: Duration,
        call: F,
    ) -> Result<T, tonic::Status>
    where
        F: Fn(ControllerClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now().checked_add(window);
        let mut logged = false;
        loop {
            match call(self.client.clone()).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if is_unreachable(&status) => {
                    if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                        return Err(self.explain(what, id, status));
                    }
                    if !logged {
                        tracing::warn!(sandbox_id = %id, socket = %self.socket.display(), error = %status.message(), "sandboxer unreachable, retrying {what}");
                        logged = true;
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(status) => return Err(self.explain(what, id, status)),
            }
        }
    }

    /// The sandboxer's own answer as it is; an unreachable sandboxer as `Unavailable`
    /// naming the socket.
    fn explain(&self, what: &str, id: &str, status: tonic::Status) -> tonic::Status {
        if is_unreachable(&status) {
            tonic::Status::unavailable(format!(
                "sandboxer at {} is not reachable ({what} of sandbox {id}): {}",
                self.socket.display(),
                status.message()
            ))
        } else {
            status
        }
    }
}

/// Whether `status` is the sandboxer's own verdict on a request, rather than a call cut
/// short (connection refused or lost, stream reset).
fn is_answer(status: &tonic::Status) -> bool {
    use tonic::Code;

    matches!(
        status.code(),
        Code::NotFound
            | Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::Unimplemented
            | Code::PermissionDenied
            | Code::OutOfRange
    ) || (status.code() == Code::Unavailable && !is_unreachable(status))
}

/// Whether `status` says the sandboxer could not be reached (rather than answering).
fn is_unreachable(status: &tonic::Status) -> bool {
    use std::error::Error;

    if status.code() != tonic::Code::Unavailable && status.code() != tonic::Code::Unknown {
        return false;
    }
    // Transport errors carry their cause; the sandboxer's own Unavailable answers do not.
    let mut source = status.source();
    while let Some(err) = source {
        if err.downcast_ref::<tonic::transport::Error>().is_some()
            || err.downcast_ref::<std::io::Error>().is_some()
        {
            return true;
        }
        source = err.source();
    }
    status.code() == tonic::Code::Unavailable
        && (status.message().contains("transport")
            || status.message().contains("connect")
            || status.message().contains("closed"))
}
