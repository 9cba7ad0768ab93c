//! `containerd.runtime.sandbox.v1.Sandbox` over ttrpc: the shim-mode Sandbox API of
//! containerd 1.7 (`sandbox_mode = "shim"`) and 2.x (`sandboxer = "shim"`), each call
//! forwarded to the sandboxer's `Controller`.
//!
//! Both APIs carry the same nested messages (mounts, `Any`, timestamps, platforms,
//! metrics), which cross from the ttrpc side's types to the gRPC side's by their protobuf
//! encoding.

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::sandbox_api::*;
use containerd_shim_protos::sandbox_async::Sandbox;
use kuasar_sandbox::api::sandbox::ControllerCreateRequest;
use ttrpc::r#async::TtrpcContext;

use crate::forward::status_of_grpc;
use crate::pod::Pod;

/// The Sandbox service of one pod.
pub struct SandboxService {
    pod: Arc<Pod>,
}

impl SandboxService {
    pub fn new(pod: Arc<Pod>) -> Self {
        Self { pod }
    }

    fn check(&self, id: &str) -> ttrpc::Result<()> {
        if id != self.pod.id {
            return Err(ttrpc::Error::RpcStatus(crate::forward::status_of(
                ttrpc::Code::NOT_FOUND,
                format!(
                    "sandbox {id} not found (this shim serves sandbox {})",
                    self.pod.id
                ),
            )));
        }
        Ok(())
    }
}

fn grpc_error(status: tonic::Status) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(status_of_grpc(status))
}

/// `message` re-encoded as the other side's type of the same protobuf message.
fn convert<A: Message, B: prost::Message + Default>(message: &A) -> B {
    let bytes = message.write_to_bytes().unwrap_or_default();
    B::decode(bytes.as_slice()).unwrap_or_default()
}

/// The reverse of [`convert`].
pub fn convert_back<A: prost::Message, B: Message>(message: &A) -> B {
    B::parse_from_bytes(&message.encode_to_vec()).unwrap_or_default()
}

#[async_trait]
impl Sandbox for SandboxService {
    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        request: CreateSandboxRequest,
    ) -> ttrpc::Result<CreateSandboxResponse> {
        self.check(&request.sandbox_id)?;
        tracing::info!(sandbox_id = %request.sandbox_id, "create sandbox");
        let options = request.options.as_ref().map(|any| prost_types::Any {
            type_url: any.type_url.clone(),
            value: any.value.clone(),
        });
        self.pod
            .create(ControllerCreateRequest {
                sandbox_id: request.sandbox_id.clone(),
                rootfs: request.rootfs.iter().map(convert).collect(),
                options,
                netns_path: request.netns_path.clone(),
                annotations: request.annotations.clone(),
                ..Default::default()
            })
            .await
            .map_err(grpc_error)?;
        Ok(CreateSandboxResponse::new())
    }

    async fn start_sandbox(
        &self,
        _ctx: &TtrpcContext,
        request: StartSandboxRequest,
    ) -> ttrpc::Result<StartSandboxResponse> {
        self.check(&request.sandbox_id)?;
        let started = self
            .pod
            .sandboxer
            .start(&request.sandbox_id)
            .await
            .map_err(grpc_error)?;
        self.pod.started(&started.address);
        tracing::info!(sandbox_id = %request.sandbox_id, pid = started.pid, address = %started.address, "sandbox started");
        let mut response = StartSandboxResponse::new();
        response.pid = started.pid;
        response.created_at = started.created_at.as_ref().map(convert_back).into();
        Ok(response)
    }

    async fn platform(
        &self,
        _ctx: &TtrpcContext,
        request: PlatformRequest,
    ) -> ttrpc::Result<PlatformResponse> {
        self.check(&request.sandbox_id)?;
        let answer = self
            .pod
            .sandboxer
            .platform(&request.sandbox_id)
            .await
            .map_err(grpc_error)?;
        let mut response = PlatformResponse::new();
        response.platform = answer.platform.as_ref().map(convert_back).into();
        Ok(response)
    }

    async fn stop_sandbox(
        &self,
        _ctx: &TtrpcContext,
        request: StopSandboxRequest,
    ) -> ttrpc::Result<StopSandboxResponse> {
        self.check(&request.sandbox_id)?;
        self.pod
            .sandboxer
            .stop(&request.sandbox_id, request.timeout_secs)
            .await
            .map_err(grpc_error)?;
        Ok(StopSandboxResponse::new())
    }

    async fn wait_sandbox(
        &self,
        _ctx: &TtrpcContext,
        request: WaitSandboxRequest,
    ) -> ttrpc::Result<WaitSandboxResponse> {
        self.check(&request.sandbox_id)?;
        let answer = self
            .pod
            .sandboxer
            .wait(&request.sandbox_id)
            .await
            .map_err(grpc_error)?;
        let mut response = WaitSandboxResponse::new();
        response.exit_status = answer.exit_status;
        response.exited_at = answer.exited_at.as_ref().map(convert_back).into();
        Ok(response)
    }

    async fn sandbox_status(
        &self,
        _ctx: &TtrpcContext,
        request: SandboxStatusRequest,
    ) -> ttrpc::Result<SandboxStatusResponse> {
        self.check(&request.sandbox_id)?;
        let answer = self
            .pod
            .sandboxer
            .status(&request.sandbox_id)
            .await
            .map_err(grpc_error)?;
        let mut response = SandboxStatusResponse::new();
        response.sandbox_id = answer.sandbox_id;
        response.pid = answer.pid;
        response.state = answer.state;
        response.info = answer.info;
        response.created_at = answer.created_at.as_ref().map(convert_back).into();
        response.exited_at = answer.exited_at.as_ref().map(convert_back).into();
        response.extra = answer.extra.as_ref().map(convert_back).into();
        Ok(response)
    }

    async fn ping_sandbox(
        &self,
        _ctx: &TtrpcContext,
        request: PingRequest,
    ) -> ttrpc::Result<PingResponse> {
        self.check(&request.sandbox_id)?;
        self.pod
            .sandboxer
            .status(&request.sandbox_id)
            .await
            .map_err(grpc_error)?;
        Ok(PingResponse::new())
    }

    async fn shutdown_sandbox(
        &self,
        _ctx: &TtrpcContext,
        request: ShutdownSandboxRequest,
    ) -> ttrpc::Result<ShutdownSandboxResponse> {
        self.check(&request.sandbox_id)?;
        self.pod.shutdown().await.map_err(grpc_error)?;
        Ok(ShutdownSandboxResponse::new())
    }

    async fn sandbox_metrics(
        &self,
        _ctx: &TtrpcContext,
        request: SandboxMetricsRequest,
    ) -> ttrpc::Result<SandboxMetricsResponse> {
        self.check(&request.sandbox_id)?;
        let answer = self
            .pod
            .sandboxer
            .metrics(&request.sandbox_id)
            .await
            .map_err(grpc_error)?;
        let mut response = SandboxMetricsResponse::new();
        response.metrics = answer.metrics.as_ref().map(convert_back).into();
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use containerd_shim_protos::types::mount::Mount;

    use super::*;

    #[test]
    fn nested_messages_cross_by_their_encoding() {
        let mount = Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            target: "/t".into(),
            options: vec!["lowerdir=/a".into()],
            ..Default::default()
        };
        let crossed: kuasar_sandbox::api::types::Mount = convert(&mount);
        assert_eq!(crossed.r#type, "overlay");
        assert_eq!(crossed.options, ["lowerdir=/a"]);
        let back: Mount = convert_back(&crossed);
        assert_eq!(back, mount);
    }
}
