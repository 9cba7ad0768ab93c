//! The Task API the shim serves to containerd: `containerd.task.v2.Task` (containerd 1.6
//! and 1.7) and `containerd.task.v3.Task` (2.x), both over ttrpc.
//!
//! Nothing is decoded on the way but the task id (field 1 of every Task request): calls on
//! the pod's pause container are the sandbox's own ([`Pod::pause_call`]); every other call
//! goes to the sandboxer's task server as it came. `Shutdown` is the shim's own: it ends
//! the shim once the pod is gone, and is never forwarded (the sandboxer owns its task
//! servers).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use ttrpc::r#async::{MethodHandler, Service, TtrpcContext};
use ttrpc::{Request, Response};

use crate::pod::Pod;

/// The Task API services the shim serves.
pub const TASK_SERVICES: [&str; 2] = ["containerd.task.v2.Task", "containerd.task.v3.Task"];

/// Every method of the Task API (identical in v2 and v3).
const METHODS: [&str; 17] = [
    "State",
    "Create",
    "Start",
    "Delete",
    "Pids",
    "Pause",
    "Resume",
    "Checkpoint",
    "Kill",
    "Exec",
    "ResizePty",
    "CloseIO",
    "Update",
    "Wait",
    "Stats",
    "Connect",
    "Shutdown",
];

/// The ttrpc services of both Task API versions, bound to `pod`.
pub fn services(pod: Arc<Pod>) -> HashMap<String, Service> {
    TASK_SERVICES
        .iter()
        .map(|service| {
            let methods = METHODS
                .iter()
                .map(|method| {
                    let handler: Box<dyn MethodHandler + Send + Sync> = Box::new(TaskMethod {
                        pod: pod.clone(),
                        method,
                    });
                    (method.to_string(), handler)
                })
                .collect();
            let service_entry = Service {
                methods,
                streams: HashMap::new(),
            };
            (service.to_string(), service_entry)
        })
        .collect()
}

/// The task id in a Task API request: field 1, a string, in every request message.
#[derive(Clone, PartialEq, prost::Message)]
struct TaskId {
    #[prost(string, tag = "1")]
    id: String,
}

/// The task id of a request's payload, empty when it has none.
pub fn task_id(payload: &[u8]) -> String {
    <TaskId as prost::Message>::decode(payload)
        .map(|t| t.id)
        .unwrap_or_default()
}

struct TaskMethod {
    pod: Arc<Pod>,
    method: &'static str,
}

#[async_trait]
impl MethodHandler for TaskMethod {
    async fn handler(&self, _ctx: TtrpcContext, request: Request) -> ttrpc::Result<Response> {
        let id = task_id(&request.payload);
        if self.method == "Shutdown" {
            self.pod.shutdown_requested();
            return Ok(Response::new());
        }
        if id == self.pod.id {
            return Ok(self.pod.pause_call(self.method, &request.payload).await);
        }
        tracing::debug!(method = self.method, container_id = %id, "forwarding");
        Ok(self.pod.upstream.forward(request).await)
    }
}

#[cfg(test)]
mod tests {
    use containerd_shim_protos::api::KillRequest;
    use containerd_shim_protos::protobuf::Message;

    use super::*;

    #[test]
    fn reads_the_task_id_of_any_request() {
        let kill = KillRequest {
            id: "ctr-1".into(),
            exec_id: "e".into(),
            signal: 9,
            ..Default::default()
        };
        assert_eq!(task_id(&kill.write_to_bytes().unwrap()), "ctr-1");
        assert_eq!(task_id(&[]), "");
    }
}
