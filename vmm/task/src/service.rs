//! The agent's own service: health, clock and the pod's guest settings.

use std::sync::Arc;

use async_trait::async_trait;
use nix::sys::time::TimeSpec;
use nix::time::{clock_gettime, clock_settime, ClockId};
use ttrpc::r#async::TtrpcContext;
use vmm_task::api::agent::{
    CheckRequest, CheckResponse, SetupSandboxRequest, SetupSandboxResponse, SyncClockRequest,
    SyncClockResponse, WaitOomRequest, WaitOomResponse,
};
use vmm_task::api::agent_ttrpc::Agent;

use crate::oom::OomEvents;

/// Serves [`Agent`].
#[derive(Debug)]
pub struct AgentService {
    /// The guest's uptime when the agent started, in milliseconds.
    started_at_uptime_ms: u64,
    /// OOM kills of the containers.
    ooms: Arc<OomEvents>,
}

impl AgentService {
    /// The service of an agent that started at guest uptime `started_at_uptime_ms`.
    pub fn new(started_at_uptime_ms: u64, ooms: Arc<OomEvents>) -> Self {
        Self {
            started_at_uptime_ms,
            ooms,
        }
    }
}

/// The guest's uptime in milliseconds.
pub fn uptime_ms() -> nix::Result<u64> {
    clock_gettime(ClockId::CLOCK_BOOTTIME).map(|t| (nanos(t) / 1_000_000) as u64)
}

fn internal(what: &str, err: impl std::fmt::Display) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(
        ttrpc::Code::INTERNAL,
        format!("{what}: {err}"),
    ))
}

fn invalid(message: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::INVALID_ARGUMENT, message))
}

fn nanos(time: TimeSpec) -> i64 {
    time.tv_sec() * 1_000_000_000 + time.tv_nsec()
}

#[async_trait]
impl Agent for AgentService {
    async fn check(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        let uptime = uptime_ms().map_err(|e| internal("read uptime", e))?;
        Ok(CheckResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: uptime,
            started_at_uptime_ms: self.started_at_uptime_ms,
            ..Default::default()
        })
    }

    async fn sync_clock(
        &self,
        _ctx: &TtrpcContext,
        req: SyncClockRequest,
    ) -> ttrpc::Result<SyncClockResponse> {
        if req.host_time_ns <= 0 {
            return Err(invalid(format!(
                "host time {} ns is not a time",
                req.host_time_ns
            )));
        }
        let previous =
            clock_gettime(ClockId::CLOCK_REALTIME).map_err(|e| internal("read the clock", e))?;
        let host = TimeSpec::new(
            req.host_time_ns / 1_000_000_000,
            req.host_time_ns % 1_000_000_000,
        );
        clock_settime(ClockId::CLOCK_REALTIME, host).map_err(|e| internal("set the clock", e))?;
        tracing::debug!(
            drift_ns = nanos(previous) - req.host_time_ns,
            "guest clock set"
        );
        Ok(SyncClockResponse {
            previous_guest_time_ns: nanos(previous),
            ..Default::default()
        })
    }

    async fn setup_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: SetupSandboxRequest,
    ) -> ttrpc::Result<SetupSandboxResponse> {
        if !req.hostname.is_empty() {
            nix::unistd::sethostname(&req.hostname)
                .map_err(|e| internal(&format!("set hostname {:?}", req.hostname), e))?;
        }
        if !req.resolv_conf.is_empty() {
            std::fs::write("/etc/resolv.conf", &req.resolv_conf)
                .map_err(|e| internal("write /etc/resolv.conf", e))?;
        }
        for interface in &req.interfaces {
            crate::net::configure(interface).await.map_err(|e| {
                internal(
                    &format!("configure interface {}", interface.mac),
                    format!("{e:#}"),
                )
            })?;
        }
        for route in &req.routes {
            crate::net::add_route(route)
                .await
                .map_err(|e| internal("add route", format!("{e:#}")))?;
        }
        tracing::info!(sandbox_id = %req.sandbox_id, hostname = %req.hostname, interfaces = req.interfaces.len(), "guest set up for the pod");
        Ok(SetupSandboxResponse::default())
    }

    async fn wait_oom(
        &self,
        _ctx: &TtrpcContext,
        req: WaitOomRequest,
    ) -> ttrpc::Result<WaitOomResponse> {
        match self.ooms.wait(&req.container_id, req.seen).await {
            Some(kills) => Ok(WaitOomResponse {
                kills,
                ..Default::default()
            }),
            None => Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::NOT_FOUND,
                format!("container {:?}", req.container_id),
            ))),
        }
    }
}
