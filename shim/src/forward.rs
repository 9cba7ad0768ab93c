//! Task API requests passed through to the sandboxer's task server of the pod, message by
//! message and undecoded: the v2 and v3 Task APIs carry the same messages, so only the
//! service name changes on the way.
//!
//! Every request gets a connection of its own, so a sandboxer restart never leaves a dead
//! connection behind. A request that never reached the sandboxer (the socket refused it) is
//! safe to try again and is, for a while; one whose answer was lost is repeated only when
//! the method is idempotent, and otherwise fails as `Unavailable`.

use std::sync::Mutex;
use std::time::Duration;

use ttrpc::r#async::Client;
use ttrpc::{Code, Request, Response, Status};

use crate::controller::{Sandboxer, RECONNECT_WINDOW};

/// The service the sandboxers serve.
pub const TASK_V3: &str = "containerd.task.v3.Task";

const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Methods whose repetition changes nothing: they are repeated after a lost answer.
const IDEMPOTENT: [&str; 6] = ["State", "Pids", "Stats", "Connect", "Wait", "Update"];

/// The task server of one pod in its sandboxer.
pub struct TaskUpstream {
    sandboxer: Sandboxer,
    sandbox_id: String,
    address: Mutex<Option<String>>,
}

impl TaskUpstream {
    pub fn new(sandboxer: Sandboxer, sandbox_id: &str) -> Self {
        Self {
            sandboxer,
            sandbox_id: sandbox_id.to_string(),
            address: Mutex::new(None),
        }
    }

    /// Records the Task API address the sandboxer returned for the pod.
    pub fn set_address(&self, address: &str) {
        *self.address.lock().unwrap_or_else(|e| e.into_inner()) = Some(dial_address(address));
    }

    /// Sends `request` (of any Task API version) to the sandboxer's v3 task server and
    /// returns its answer, an error status included.
    pub async fn forward(&self, mut request: Request) -> Response {
        request.service = TASK_V3.to_string();
        let idempotent = IDEMPOTENT.contains(&request.method.as_str());
        let deadline = tokio::time::Instant::now() + RECONNECT_WINDOW;
        loop {
            let address = match self.address(deadline).await {
                Ok(address) => address,
                Err(status) => return error_response(status),
            };
            let client = match connect(&address).await {
                Ok(client) => client,
                Err(err) => {
                    if tokio::time::Instant::now() >= deadline {
                        return error_response(self.unreachable(&request.method, &address, &err));
                    }
                    tracing::debug!(%address, error = %err, "sandboxer task server unreachable, retrying");
                    // The sandboxer may have come back with the pod's server elsewhere.
                    self.forget_address();
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
            };
            match client.request(request.clone()).await {
                Ok(response) => return response,
                Err(ttrpc::Error::RpcStatus(status)) => return status_response(status),
                Err(err) if idempotent && tokio::time::Instant::now() < deadline => {
                    tracing::warn!(method = %request.method, error = %err, "task request lost, repeating");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(err) => {
                    return error_response(self.unreachable(&request.method, &address, &err));
                }
            }
        }
    }

    /// The pod's task address, asking the sandboxer for it until `deadline` at most.
    async fn address(&self, deadline: tokio::time::Instant) -> Result<String, Status> {
        if let Some(address) = self
            .address
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Ok(address);
        }
        let window = deadline.saturating_duration_since(tokio::time::Instant::now());
        let status = self
            .sandboxer
            .status_within(&self.sandbox_id, window)
            .await
            .map_err(status_of_grpc)?;
        if status.address.is_empty() {
            // A stopped sandbox's containers are gone with it: containerd then deletes them
            // as it does containers that no longer exist.
            return Err(status_of(
                Code::NOT_FOUND,
                format!(
                    "sandbox {} runs no task server (stopped or never started): its \
                     containers are gone",
                    self.sandbox_id
                ),
            ));
        }
        self.set_address(&status.address);
        Ok(dial_address(&status.address))
    }

    fn forget_address(&self) {
        *self.address.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn unreachable(&self, method: &str, address: &str, err: &ttrpc::Error) -> Status {
        status_of(
            Code::UNAVAILABLE,
            format!(
                "{method}: the task server of sandbox {} at {address} (sandboxer {}) is not \
                 reachable: {err}",
                self.sandbox_id,
                self.sandboxer.socket().display()
            ),
        )
    }
}

async fn connect(address: &str) -> Result<Client, ttrpc::Error> {
    Client::connect(address).await
}

/// `ttrpc+unix:///path` (the Sandbox API's form) as the `unix:///path` ttrpc dials.
pub fn dial_address(address: &str) -> String {
    address
        .strip_prefix("ttrpc+")
        .unwrap_or(address)
        .to_string()
}

/// A ttrpc status.
pub fn status_of(code: Code, message: impl Into<String>) -> Status {
    let mut status = Status::new();
    status.set_code(code);
    status.set_message(message.into());
    status
}

/// A response carrying `status`.
pub fn status_response(status: Status) -> Response {
    let mut response = Response::new();
    response.set_status(status);
    response
}

fn error_response(status: Status) -> Response {
    status_response(status)
}

/// A gRPC status from the sandboxer as the ttrpc status containerd expects (the codes are
/// the same numbers).
pub fn status_of_grpc(status: tonic::Status) -> Status {
    let code = <Code as protobuf::Enum>::from_i32(status.code() as i32).unwrap_or(Code::UNKNOWN);
    status_of(code, status.message())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use async_trait::async_trait;
    use ttrpc::r#async::{MethodHandler, Server, Service, TtrpcContext};

    use super::*;

    /// Answers with what it received: service and method it was reached by, payload and
    /// namespace metadata; a payload of `missing` gets a NOT_FOUND status.
    struct Echo {
        path: &'static str,
    }

    #[async_trait]
    impl MethodHandler for Echo {
        async fn handler(&self, ctx: TtrpcContext, request: Request) -> ttrpc::Result<Response> {
            if request.payload == b"missing" {
                // As generated services answer an error status.
                return Ok(status_response(status_of(
                    Code::NOT_FOUND,
                    "container missing not found",
                )));
            }
            let namespace = ctx
                .metadata
                .get("containerd-namespace-ttrpc")
                .and_then(|v| v.first().cloned())
                .unwrap_or_default();
            let mut response = Response::new();
            response.payload = format!(
                "{}|{}|{}",
                self.path,
                String::from_utf8_lossy(&request.payload),
                namespace
            )
            .into_bytes();
            Ok(response)
        }
    }

    #[tokio::test]
    async fn passes_v2_requests_to_the_v3_service_with_their_status() {
        let dir = std::env::temp_dir().join(format!("kuasar-shim-fwd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("task.sock");
        let _ = std::fs::remove_file(&socket);

        let mut methods: HashMap<String, Box<dyn MethodHandler + Send + Sync>> = HashMap::new();
        methods.insert("State".into(), Box::new(Echo { path: "v3/State" }));
        let mut services = HashMap::new();
        services.insert(
            TASK_V3.to_string(),
            Service {
                methods,
                streams: HashMap::new(),
            },
        );
        let mut server = Server::new()
            .bind(&format!("unix://{}", socket.display()))
            .unwrap()
            .register_service(services);
        server.start().await.unwrap();

        let upstream = TaskUpstream::new(Sandboxer::new(&dir.join("none.sock")), "pod");
        upstream.set_address(&format!("ttrpc+unix://{}", socket.display()));
        let request = |payload: &[u8]| {
            let mut request = Request::new();
            request.service = "containerd.task.v2.Task".into();
            request.method = "State".into();
            request.payload = payload.to_vec();
            let mut metadata = HashMap::new();
            metadata.insert(
                "containerd-namespace-ttrpc".to_string(),
                vec!["k8s.io".to_string()],
            );
            request.metadata = ttrpc::context::to_pb(metadata);
            request
        };

        let answer = upstream.forward(request(b"ctr-1")).await;
        assert!(answer.status.is_none() || answer.status.code() == Code::OK);
        assert_eq!(answer.payload, b"v3/State|ctr-1|k8s.io");

        let answer = upstream.forward(request(b"missing")).await;
        assert_eq!(answer.status.code(), Code::NOT_FOUND);
        assert_eq!(answer.status.message(), "container missing not found");

        server.shutdown().await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dials_the_unix_socket_of_a_sandbox_address() {
        assert_eq!(
            dial_address("ttrpc+unix:///run/x.sock"),
            "unix:///run/x.sock"
        );
        assert_eq!(dial_address("unix:///run/x.sock"), "unix:///run/x.sock");
    }

    #[test]
    fn grpc_codes_map_to_ttrpc_codes() {
        let status = status_of_grpc(tonic::Status::not_found("no sandbox x"));
        assert_eq!(status.code(), Code::NOT_FOUND);
        assert_eq!(status.message(), "no sandbox x");
    }
}
