//! The one pod a shim serves: its sandbox in the sandboxer, the sandbox's Task API address,
//! and, in pod-sandbox mode, the pause container's task that stands for the sandbox.
//!
//! The pause task's calls become Sandbox API calls: create (with start, since containerd
//! needs the pid the pod's containers join at create) and start, wait, kill (stop) and
//! delete (shutdown). Every other container's task calls pass through to the sandboxer.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use containerd_shim_protos::api::{
    ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteResponse, KillRequest,
    PidsResponse, StartResponse, StateResponse, StatsResponse, WaitResponse,
};
use containerd_shim_protos::events::task::{TaskCreate, TaskDelete, TaskExit, TaskStart};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{EnumOrUnknown, Message};
use containerd_shim_protos::types::task::{ProcessInfo, Status};
use kuasar_sandbox::api::sandbox::ControllerCreateRequest;
use kuasar_sandbox::events::{timestamp, EventPublisher, TaskEvent};
use prost::Message as _;
use tokio::sync::{watch, Notify};
use ttrpc::{Code, Response};

use crate::controller::Sandboxer;
use crate::forward::{status_of, status_of_grpc, status_response, TaskUpstream};
use crate::pause;

/// How long the shim stays once its pod is gone, for containerd's last calls, unless
/// containerd asks it to go first.
const LINGER: Duration = Duration::from_secs(1);

/// Time for the answer to containerd's last call to leave before the shim exits.
const LAST_ANSWER: Duration = Duration::from_millis(50);

/// Exit code reported for a sandbox whose exit the sandboxer could not tell.
const UNKNOWN_EXIT: u32 = 255;

/// An exit: status and time.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    pub status: u32,
    pub at: SystemTime,
}

#[derive(Debug, Default)]
struct PauseTask {
    bundle: PathBuf,
    pid: u32,
    created: bool,
    deleted: bool,
}

/// The pod of one shim.
pub struct Pod {
    /// The sandbox id: the pod's, and its pause container's in pod-sandbox mode.
    pub id: String,
    namespace: String,
    pub sandboxer: Sandboxer,
    pub upstream: TaskUpstream,
    events: EventPublisher,
    pause: Mutex<PauseTask>,
    exit: watch::Sender<Option<Exit>>,
    gone: watch::Sender<bool>,
    /// Whether the sandboxer created the sandbox (and may hold something of it).
    created: AtomicBool,
    /// containerd asked the shim to go.
    leave: Notify,
}

impl Pod {
    pub fn new(id: &str, namespace: &str, sandboxer: Sandboxer, events: EventPublisher) -> Self {
        Self {
            id: id.to_string(),
            namespace: namespace.to_string(),
            upstream: TaskUpstream::new(sandboxer.clone(), id),
            sandboxer,
            events,
            pause: Mutex::new(PauseTask::default()),
            exit: watch::channel(None).0,
            gone: watch::channel(false).0,
            created: AtomicBool::new(false),
            leave: Notify::new(),
        }
    }

    /// Creates the sandbox in the sandboxer.
    pub async fn create(&self, request: ControllerCreateRequest) -> Result<(), tonic::Status> {
        self.sandboxer.create(request).await?;
        self.created.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Removes the sandbox from the sandboxer, if it was ever created there; the pod is gone
    /// then.
    pub async fn shutdown(&self) -> Result<(), tonic::Status> {
        if self.created.load(Ordering::SeqCst) {
            match self.sandboxer.shutdown(&self.id).await {
                Ok(()) => {}
                Err(status) if status.code() == tonic::Code::NotFound => {}
                Err(status) => return Err(status),
            }
        }
        self.set_gone();
        Ok(())
    }

    /// containerd's Task API `Shutdown`: the shim goes once its pod is gone, or when it has
    /// none (its creation failed).
    pub fn shutdown_requested(&self) {
        if !self.created.load(Ordering::SeqCst) || self.is_gone() {
            self.set_gone();
            self.leave.notify_one();
        }
    }

    /// Resolves once the pod is gone (shut down or its pause task deleted) and containerd
    /// has had [`LINGER`] for its last calls.
    pub async fn gone(&self) {
        self.marked_gone().await;
        tokio::select! {
            _ = tokio::time::sleep(LINGER) => {}
            _ = self.leave.notified() => tokio::time::sleep(LAST_ANSWER).await,
        }
    }

    /// Resolves once the pod is marked gone.
    pub async fn marked_gone(&self) {
        let mut gone = self.gone.subscribe();
        let _ = gone.wait_for(|gone| *gone).await;
    }

    /// Marks the pod as gone: the shim exits soon.
    pub fn set_gone(&self) {
        if !self.gone.send_replace(true) {
            tracing::info!(sandbox_id = %self.id, "pod gone, the shim exits");
        }
    }

    /// Whether the pod is gone.
    pub fn is_gone(&self) -> bool {
        *self.gone.borrow()
    }

    /// Records the sandbox's Task API address from a Start answer.
    pub fn started(&self, address: &str) {
        self.upstream.set_address(address);
    }

    /// Records the sandbox's Task API address and watches the sandbox until it exits, for
    /// the pause task that stands for it.
    fn started_with_pause(self: &std::sync::Arc<Self>, address: &str) {
        self.started(address);
        let pod = self.clone();
        tokio::spawn(async move {
            let exit = match pod.sandboxer.wait(&pod.id).await {
                Ok(answer) => Exit {
                    status: answer.exit_status,
                    at: answer
                        .exited_at
                        .and_then(|t| SystemTime::try_from(t).ok())
                        .unwrap_or_else(SystemTime::now),
                },
                Err(status) => {
                    tracing::warn!(sandbox_id = %pod.id, error = %status.message(), "waiting for the sandbox failed");
                    Exit {
                        status: UNKNOWN_EXIT,
                        at: SystemTime::now(),
                    }
                }
            };
            tracing::info!(sandbox_id = %pod.id, exit_status = exit.status, "sandbox exited");
            pod.exit.send_replace(Some(exit));
            let pause = {
                let pause = pod.pause.lock().unwrap_or_else(|e| e.into_inner());
                pause.created.then_some(pause.pid)
            };
            if let Some(pid) = pause {
                pod.publish(TaskEvent::Exit(TaskExit {
                    container_id: pod.id.clone(),
                    id: pod.id.clone(),
                    pid,
                    exit_status: exit.status,
                    exited_at: Some(timestamp(exit.at)).into(),
                    ..Default::default()
                }));
            }
        });
    }

    /// The sandbox's exit, once it has exited.
    async fn wait_exit(&self) -> Exit {
        let mut exit = self.exit.subscribe();
        let value = exit.wait_for(Option::is_some).await.map(|e| *e);
        value.ok().flatten().unwrap_or(Exit {
            status: UNKNOWN_EXIT,
            at: SystemTime::now(),
        })
    }

    /// Answers a Task API call on the pause container (`method`, raw `payload`).
    pub async fn pause_call(self: &std::sync::Arc<Self>, method: &str, payload: &[u8]) -> Response {
        let result = match method {
            "Create" => self.pause_create(payload).await,
            "Start" => self.pause_start(),
            "Wait" => self.pause_wait().await,
            "State" => self.pause_state(),
            "Kill" => self.pause_kill(payload).await,
            "Delete" => self.pause_delete().await,
            "Pids" => self.pause_pids(),
            "Connect" => self.pause_connect(),
            "Stats" => self.pause_stats().await,
            other => Err(status_of(
                Code::FAILED_PRECONDITION,
                format!(
                    "{other} on sandbox {}: the pod's sandbox runs no processes of its own",
                    self.id
                ),
            )),
        };
        match result {
            Ok(payload) => {
                let mut response = Response::new();
                response.payload = payload;
                response
            }
            Err(status) => status_response(status),
        }
    }

    async fn pause_create(
        self: &std::sync::Arc<Self>,
        payload: &[u8],
    ) -> Result<Vec<u8>, ttrpc::Status> {
        let request = CreateTaskRequest::parse_from_bytes(payload).map_err(|e| {
            status_of(
                Code::INVALID_ARGUMENT,
                format!("bad CreateTaskRequest: {e}"),
            )
        })?;
        let bundle = PathBuf::from(&request.bundle);
        let spec = pause::read_spec(&bundle)
            .map_err(|e| status_of(Code::INVALID_ARGUMENT, format!("{e:#}")))?;
        let (config, netns_path) = pause::pod_of(&self.id, &spec);
        tracing::info!(sandbox_id = %self.id, netns = %netns_path, "creating the sandbox of a pause container");

        self.create(ControllerCreateRequest {
            sandbox_id: self.id.clone(),
            options: Some(prost_types::Any {
                type_url: pause::POD_CONFIG_TYPE_URL.to_string(),
                value: config.encode_to_vec(),
            }),
            netns_path,
            annotations: spec.annotations().clone().unwrap_or_default(),
            ..Default::default()
        })
        .await
        .map_err(status_of_grpc)?;
        let started = match self.sandboxer.start(&self.id).await {
            Ok(started) => started,
            Err(status) => {
                if let Err(e) = self.shutdown().await {
                    tracing::warn!(sandbox_id = %self.id, error = %e.message(), "cannot remove a sandbox that failed to start");
                }
                return Err(status_of_grpc(status));
            }
        };
        self.started_with_pause(&started.address);
        {
            let mut pause = self.pause.lock().unwrap_or_else(|e| e.into_inner());
            pause.bundle = bundle.clone();
            pause.pid = started.pid;
            pause.created = true;
        }
        self.publish(TaskEvent::Create(TaskCreate {
            container_id: self.id.clone(),
            bundle: request.bundle.clone(),
            pid: started.pid,
            ..Default::default()
        }));
        let response = CreateTaskResponse {
            pid: started.pid,
            ..Default::default()
        };
        Ok(encode(&response))
    }

    fn pause_start(&self) -> Result<Vec<u8>, ttrpc::Status> {
        let pid = self.pause_pid()?;
        self.publish(TaskEvent::Start(TaskStart {
            container_id: self.id.clone(),
            pid,
            ..Default::default()
        }));
        Ok(encode(&StartResponse {
            pid,
            ..Default::default()
        }))
    }

    async fn pause_wait(&self) -> Result<Vec<u8>, ttrpc::Status> {
        self.pause_pid()?;
        let exit = self.wait_exit().await;
        Ok(encode(&WaitResponse {
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        }))
    }

    fn pause_state(&self) -> Result<Vec<u8>, ttrpc::Status> {
        let (pid, bundle) = {
            let pause = self.pause.lock().unwrap_or_else(|e| e.into_inner());
            if !pause.created || pause.deleted {
                return Err(self.no_pause_task());
            }
            (pause.pid, pause.bundle.clone())
        };
        let exit = *self.exit.borrow();
        let mut response = StateResponse {
            id: self.id.clone(),
            bundle: bundle.to_string_lossy().into_owned(),
            pid,
            status: EnumOrUnknown::new(if exit.is_some() {
                Status::STOPPED
            } else {
                Status::RUNNING
            }),
            ..Default::default()
        };
        if let Some(exit) = exit {
            response.exit_status = exit.status;
            response.exited_at = Some(timestamp(exit.at)).into();
        }
        Ok(encode(&response))
    }

    async fn pause_kill(&self, payload: &[u8]) -> Result<Vec<u8>, ttrpc::Status> {
        let request = KillRequest::parse_from_bytes(payload)
            .map_err(|e| status_of(Code::INVALID_ARGUMENT, format!("bad KillRequest: {e}")))?;
        self.pause_pid()?;
        if !ends_a_pause_process(request.signal) {
            tracing::info!(sandbox_id = %self.id, signal = request.signal, "signal to the pause container ignored, as a pause process does");
            return Ok(Vec::new());
        }
        tracing::info!(sandbox_id = %self.id, signal = request.signal, "pause container killed: stopping the sandbox");
        self.sandboxer
            .stop(&self.id, 0)
            .await
            .map_err(status_of_grpc)?;
        Ok(Vec::new())
    }

    async fn pause_delete(&self) -> Result<Vec<u8>, ttrpc::Status> {
        let pid = self.pause_pid()?;
        self.shutdown().await.map_err(status_of_grpc)?;
        let exit = (*self.exit.borrow()).unwrap_or(Exit {
            status: UNKNOWN_EXIT,
            at: SystemTime::now(),
        });
        self.pause.lock().unwrap_or_else(|e| e.into_inner()).deleted = true;
        self.publish(TaskEvent::Delete(TaskDelete {
            container_id: self.id.clone(),
            pid,
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        }));
        Ok(encode(&DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        }))
    }

    fn pause_pids(&self) -> Result<Vec<u8>, ttrpc::Status> {
        let pid = self.pause_pid()?;
        Ok(encode(&PidsResponse {
            processes: vec![ProcessInfo {
                pid,
                ..Default::default()
            }],
            ..Default::default()
        }))
    }

    /// The pause task's resource usage is the sandbox's: the sandboxer's metrics of it.
    async fn pause_stats(&self) -> Result<Vec<u8>, ttrpc::Status> {
        self.pause_pid()?;
        let answer = self
            .sandboxer
            .metrics(&self.id)
            .await
            .map_err(status_of_grpc)?;
        let stats = answer
            .metrics
            .and_then(|metric| metric.data)
            .map(|data| crate::sandbox::convert_back(&data));
        Ok(encode(&StatsResponse {
            stats: stats.into(),
            ..Default::default()
        }))
    }

    fn pause_connect(&self) -> Result<Vec<u8>, ttrpc::Status> {
        let pid = self.pause_pid()?;
        Ok(encode(&ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: pid,
            ..Default::default()
        }))
    }

    fn pause_pid(&self) -> Result<u32, ttrpc::Status> {
        let pause = self.pause.lock().unwrap_or_else(|e| e.into_inner());
        if !pause.created || pause.deleted {
            return Err(self.no_pause_task());
        }
        Ok(pause.pid)
    }

    fn no_pause_task(&self) -> ttrpc::Status {
        status_of(Code::NOT_FOUND, format!("task {} not found", self.id))
    }

    fn publish(&self, event: TaskEvent) {
        self.events.publish(&self.namespace, event);
    }
}

fn encode<M: Message>(message: &M) -> Vec<u8> {
    message.write_to_bytes().unwrap_or_default()
}

/// A wall-clock time as a protobuf timestamp.
pub fn now() -> Timestamp {
    timestamp(SystemTime::now())
}

/// Whether `signal` ends a pause process: every signal does but those whose default action
/// is to ignore them or to stop the process (a pause process catches only the ones that
/// end it anyway), and 0, which only asks whether the process exists.
fn ends_a_pause_process(signal: u32) -> bool {
    use nix::sys::signal::Signal;
    let harmless = [
        Signal::SIGCHLD,
        Signal::SIGCONT,
        Signal::SIGURG,
        Signal::SIGWINCH,
        Signal::SIGSTOP,
        Signal::SIGTSTP,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
    ];
    signal != 0 && !harmless.iter().any(|s| *s as u32 == signal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_signals_that_end_a_pause_process_stop_the_sandbox() {
        for ending in [libc::SIGKILL, libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            assert!(ends_a_pause_process(ending as u32), "signal {ending}");
        }
        for harmless in [
            0,
            libc::SIGWINCH,
            libc::SIGCHLD,
            libc::SIGCONT,
            libc::SIGSTOP,
        ] {
            assert!(!ends_a_pause_process(harmless as u32), "signal {harmless}");
        }
    }
}
