//! The ttrpc Task service of one sandbox and the server it runs on.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim_protos::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest,
    PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest, StartResponse,
    StateRequest, StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest, WaitRequest,
    WaitResponse,
};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::EnumOrUnknown;
use containerd_shim_protos::shim_async::{create_task, Task};
use containerd_shim_protos::types::task::{ProcessInfo, Status};
use tokio::sync::watch;
use ttrpc::r#async::TtrpcContext;

use super::{
    ContainerRuntime, CreateContainer, ExecProcess, KillTarget, Mount, RecoverContainer, RunState,
    Spawned,
};
use crate::error::{Error, Result};
use crate::events::{timestamp, EventPublisher, TaskEvent};
use crate::id;
use crate::io::{self, Console, Stdio};
use crate::reaper::ExitStatus;

/// Metadata key carrying the containerd namespace of a ttrpc request.
const NAMESPACE_KEY: &str = "containerd-namespace-ttrpc";

/// How long Delete waits for a killed process to be reaped.
const DELETE_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the exit of a SIGKILLed process with its memory watched waits for the OOM
/// notice that may explain it.
const OOM_NOTICE_GRACE: Duration = Duration::from_millis(200);

/// The Task API of one sandbox, over a [`ContainerRuntime`].
pub struct TaskService<R> {
    sandbox_id: String,
    runtime: Arc<R>,
    events: EventPublisher,
    containers: Arc<Mutex<HashMap<String, Container>>>,
    /// Ids whose creation or deletion is under way: one at a time per id, while different
    /// containers are created and deleted concurrently.
    busy: Arc<Mutex<HashSet<String>>>,
    /// Where each container is recorded for a restarted sandboxer, for runtimes whose
    /// containers outlive it.
    records: Option<PathBuf>,
}

/// What a restarted sandboxer needs to serve a container again: what containerd told
/// about it. Its processes' state comes from the runtime.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ContainerRecord {
    id: String,
    namespace: String,
    bundle: String,
    stdio: Stdio,
    /// Stdio of the exec processes that were started, by exec id.
    execs: std::collections::BTreeMap<String, Stdio>,
}

/// Holds an id in [`TaskService::busy`] until dropped.
struct Busy {
    ids: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.ids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.id);
    }
}

struct Container {
    namespace: String,
    bundle: String,
    init: Process,
    execs: HashMap<String, Exec>,
}

struct Exec {
    spec: Vec<u8>,
    stdio: Stdio,
    /// Set when the exec process exits; created with the exec so that a Wait arriving
    /// before Start has something to wait on.
    exit: watch::Sender<Option<ExitStatus>>,
    process: Option<Process>,
}

struct Process {
    pid: u32,
    stdio: Stdio,
    state: RunState,
    exit: watch::Receiver<Option<ExitStatus>>,
    console: Option<Console>,
}

impl Process {
    fn exited(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    fn status(&self) -> Status {
        match (self.exited(), self.state) {
            (Some(_), _) => Status::STOPPED,
            (None, RunState::Created) => Status::CREATED,
            (None, RunState::Running) => Status::RUNNING,
            (None, RunState::Paused) => Status::PAUSED,
        }
    }
}

impl<R: ContainerRuntime> TaskService<R> {
    /// A task service for the containers of sandbox `sandbox_id`.
    pub fn new(sandbox_id: &str, runtime: Arc<R>, events: EventPublisher) -> Self {
        Self {
            sandbox_id: sandbox_id.to_string(),
            runtime,
            events,
            containers: Default::default(),
            busy: Default::default(),
            records: None,
        }
    }

    /// Records every container in `dir` from now on, so that [`TaskService::recover`]
    /// finds them after a restart.
    pub fn with_records(mut self, dir: PathBuf) -> anyhow::Result<Self> {
        use anyhow::Context;
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        self.records = Some(dir);
        Ok(self)
    }

    /// The task service of a sandbox served by an earlier run of the sandboxer: every
    /// container recorded in `dir` that the runtime still knows, its processes watched
    /// again. A container the runtime cannot find is forgotten, with a warning.
    pub async fn recover(
        sandbox_id: &str,
        runtime: Arc<R>,
        events: EventPublisher,
        dir: PathBuf,
    ) -> anyhow::Result<Self> {
        let service = Self::new(sandbox_id, runtime, events).with_records(dir.clone())?;
        let entries = std::fs::read_dir(&dir)
            .map_err(|err| anyhow::anyhow!("read {}: {err}", dir.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|ext| ext != "json") {
                continue;
            }
            let recovered = match crate::state::read_json::<ContainerRecord>(&path) {
                Ok(record) => service.recover_container(record).await,
                Err(err) => Err(err),
            };
            if let Err(err) = recovered {
                tracing::warn!(%sandbox_id, record = %path.display(), error = format!("{err:#}"), "container not recovered: forgotten");
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(service)
    }

    async fn recover_container(&self, record: ContainerRecord) -> anyhow::Result<()> {
        let request = RecoverContainer {
            id: record.id.clone(),
            bundle: PathBuf::from(&record.bundle),
            execs: record.execs.keys().cloned().collect(),
        };
        let recovered = self.runtime.recover_container(&request).await?;
        let (id, namespace) = (&record.id, &record.namespace);
        let spawned = Spawned {
            pid: recovered.init.pid,
            exit: recovered.init.exit,
            console: None,
            oom: recovered.oom,
        };
        let mut init = self.monitor(spawned, id, "", namespace);
        init.stdio = record.stdio.clone();
        init.state = recovered.init.state;
        let mut execs = HashMap::new();
        for (exec_id, process) in recovered.execs {
            let stdio = record.execs.get(&exec_id).cloned().unwrap_or_default();
            let (sender, receiver) = watch::channel(None);
            self.monitor_into(
                process.exit,
                None,
                sender.clone(),
                process.pid,
                id,
                &exec_id,
                namespace,
            );
            execs.insert(
                exec_id,
                Exec {
                    spec: Vec::new(),
                    stdio: stdio.clone(),
                    exit: sender,
                    process: Some(Process {
                        pid: process.pid,
                        stdio,
                        state: process.state,
                        exit: receiver,
                        console: None,
                    }),
                },
            );
        }
        // An exec session reading its input (crictl exec -i, kubectl exec -it) lost it with
        // the earlier sandboxer, and its client is gone: it is ended rather than left
        // waiting for input forever.
        for (exec_id, exec) in &execs {
            let Some(process) = &exec.process else {
                continue;
            };
            if exec.stdio.stdin.is_empty() && !exec.stdio.terminal {
                continue;
            }
            tracing::warn!(sandbox_id = %self.sandbox_id, container_id = %id, %exec_id, "an interactive exec cannot outlive the sandboxer: it is killed");
            let killed = self
                .runtime
                .kill(id, KillTarget::Exec(process.pid), libc::SIGKILL as u32)
                .await;
            if let Err(err) = killed {
                tracing::warn!(sandbox_id = %self.sandbox_id, container_id = %id, %exec_id, error = %err, "cannot kill an interactive exec");
            }
        }
        tracing::info!(sandbox_id = %self.sandbox_id, container_id = %id, pid = init.pid, state = ?init.state, execs = execs.len(), "container recovered");
        self.lock().insert(
            id.clone(),
            Container {
                namespace: record.namespace,
                bundle: record.bundle,
                init,
                execs,
            },
        );
        Ok(())
    }

    /// Writes container `id`'s record (or removes it once the container is gone).
    fn save(&self, id: &str) {
        let Some(dir) = &self.records else {
            return;
        };
        let path = dir.join(format!("{id}.json"));
        let record = self.lock().get(id).map(|c| ContainerRecord {
            id: id.to_string(),
            namespace: c.namespace.clone(),
            bundle: c.bundle.clone(),
            stdio: c.init.stdio.clone(),
            execs: c
                .execs
                .iter()
                .filter(|(_, exec)| exec.process.is_some())
                .map(|(exec_id, exec)| (exec_id.clone(), exec.stdio.clone()))
                .collect(),
        });
        let written = match record {
            None => match std::fs::remove_file(&path) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err.into()),
                _ => Ok(()),
            },
            Some(record) => crate::state::write_json(&path, &record),
        };
        if let Err(err) = written {
            tracing::warn!(sandbox_id = %self.sandbox_id, container_id = %id, error = format!("{err:#}"), "cannot record the container: a restarted sandboxer will not know it");
        }
    }

    /// The runtime the service drives.
    pub fn runtime(&self) -> &Arc<R> {
        &self.runtime
    }

    /// Ids of the containers the service knows.
    pub fn container_ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Kills every container of the sandbox and deletes it; used when the sandbox stops.
    pub async fn kill_all(&self, grace: Duration) {
        let ids = self.container_ids();
        for id in &ids {
            if self.exit_of(id).is_none() {
                let _ = self
                    .runtime
                    .kill(id, KillTarget::Init { all: true }, libc::SIGTERM as u32)
                    .await;
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        for id in &ids {
            let Some(mut exit) = self.lock().get(id).map(|c| c.init.exit.clone()) else {
                continue;
            };
            let exited = tokio::time::timeout_at(deadline, exit.wait_for(Option::is_some))
                .await
                .is_ok_and(|waited| waited.is_ok());
            if !exited {
                let _ = self
                    .runtime
                    .kill(id, KillTarget::Init { all: true }, libc::SIGKILL as u32)
                    .await;
            }
        }
        for id in ids {
            let _ = self.remove_container(&id).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Container>> {
        self.containers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks `id` as being created or deleted, unless it is already; taken while the
    /// container table is locked, so that the two agree.
    fn claim(&self, id: &str) -> Option<Busy> {
        let mut busy = self
            .busy
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        busy.insert(id.to_string()).then(|| Busy {
            ids: self.busy.clone(),
            id: id.to_string(),
        })
    }

    fn exit_of(&self, id: &str) -> Option<ExitStatus> {
        self.lock().get(id).and_then(|c| c.init.exited())
    }

    /// Creates the container even when the caller hangs up meanwhile (a killed shim, a
    /// closed connection): a creation dropped halfway would leave the engine's state, a
    /// cgroup and mounts behind. A container created for a caller that is gone is removed
    /// again, since nobody will ever ask for it.
    async fn create_to_completion(&self, container: CreateContainer) -> Result<Spawned> {
        let runtime = self.runtime.clone();
        let sandbox_id = self.sandbox_id.clone();
        let (answer, answered) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let created = runtime.create(&container).await;
            if let Err(Ok(_unclaimed)) = answer.send(created) {
                let id = &container.id;
                tracing::warn!(%sandbox_id, container_id = %id, "container created for a caller that is gone: removing it");
                let _ = runtime
                    .kill(id, KillTarget::Init { all: true }, libc::SIGKILL as u32)
                    .await;
                if let Err(err) = runtime.delete(id).await {
                    tracing::warn!(%sandbox_id, container_id = %id, error = %err, "cannot remove an unclaimed container");
                }
            }
        });
        answered.await.map_err(|_| {
            Error::Internal(anyhow::anyhow!(
                "the creation of a container in sandbox {} ended without an answer",
                self.sandbox_id
            ))
        })?
    }

    /// Publishes the exit of a process when it happens and records it for waiters.
    fn monitor(
        &self,
        mut spawned: Spawned,
        container_id: &str,
        exec_id: &str,
        namespace: &str,
    ) -> Process {
        let (sender, receiver) = watch::channel(None);
        let oom = spawned.oom.take();
        self.monitor_into(
            spawned.exit,
            oom,
            sender,
            spawned.pid,
            container_id,
            exec_id,
            namespace,
        );
        Process {
            pid: spawned.pid,
            stdio: Stdio::default(),
            state: RunState::Created,
            exit: receiver,
            console: spawned.console,
        }
    }

    /// Records the exit arriving on `exit` in `sender` and publishes it. One task per
    /// process publishes its OOM kills, when `oom` watches them, and then its exit, in that
    /// order: containerd reports a container `OOMKilled` only when the OOM event comes
    /// before the exit.
    #[allow(clippy::too_many_arguments)]
    fn monitor_into(
        &self,
        mut exit: crate::reaper::ExitReceiver,
        mut oom: Option<crate::oom::OomReceiver>,
        sender: watch::Sender<Option<ExitStatus>>,
        pid: u32,
        container_id: &str,
        exec_id: &str,
        namespace: &str,
    ) {
        let events = self.events.clone();
        let sandbox_id = self.sandbox_id.clone();
        let (container_id, exec_id, namespace) = (
            container_id.to_string(),
            exec_id.to_string(),
            namespace.to_string(),
        );
        tokio::spawn(async move {
            let mut oom_killed = false;
            let publish_oom = || {
                tracing::info!(%sandbox_id, %container_id, "container hit its memory limit");
                let event = TaskOOM {
                    container_id: container_id.clone(),
                    ..Default::default()
                };
                events.publish(&namespace, TaskEvent::Oom(event));
            };
            let exit = loop {
                let Some(watched) = oom.as_mut() else {
                    break (&mut exit).await;
                };
                tokio::select! {
                    biased;
                    killed = watched.recv() => match killed {
                        Some(()) => {
                            publish_oom();
                            oom_killed = true;
                        }
                        None => oom = None,
                    },
                    exit = &mut exit => break exit,
                }
            };
            let exit = exit.unwrap_or_else(|_| ExitStatus::now(255));
            // The OOM killer's SIGKILL can be reaped before its notification is read.
            if exit.code == 128 + libc::SIGKILL && !oom_killed {
                if let Some(watched) = oom.as_mut() {
                    while let Ok(Some(())) =
                        tokio::time::timeout(OOM_NOTICE_GRACE, watched.recv()).await
                    {
                        publish_oom();
                    }
                }
            }
            tracing::info!(%sandbox_id, %container_id, %exec_id, pid, exit_code = exit.code, "process exited");
            let _ = sender.send(Some(exit));
            let mut event = TaskExit::new();
            event.container_id = container_id.clone();
            event.id = if exec_id.is_empty() {
                container_id.clone()
            } else {
                exec_id
            };
            event.pid = pid;
            event.exit_status = exit.code as u32;
            event.exited_at = Some(timestamp(exit.at)).into();
            events.publish(&namespace, TaskEvent::Exit(event));
        });
    }

    async fn remove_container(&self, id: &str) -> Result<(u32, ExitStatus, String)> {
        let (pid, mut exit, namespace, stdin, _busy) = {
            let containers = self.lock();
            let container = containers.get(id).ok_or_else(|| container_not_found(id))?;
            let busy = self.claim(id).ok_or_else(|| {
                Error::FailedPrecondition(format!("container {id:?} is being deleted"))
            })?;
            (
                container.init.pid,
                container.init.exit.clone(),
                container.namespace.clone(),
                container.init.stdio.stdin.clone(),
                busy,
            )
        };
        self.runtime.delete(id).await?;
        let waited = tokio::time::timeout(DELETE_EXIT_TIMEOUT, exit.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|waited| waited.ok().and_then(|exit| *exit));
        let exit = match waited {
            Some(exit) => exit,
            None => {
                tracing::warn!(sandbox_id = %self.sandbox_id, container_id = %id, pid, "no exit seen after delete");
                ExitStatus::now(255)
            }
        };
        io::release_stdin(&stdin);
        self.lock().remove(id);
        self.save(id);
        Ok((pid, exit, namespace))
    }
}

impl<R: ContainerRuntime> TaskService<R> {
    /// Pauses (`frozen`) or resumes a container and publishes the matching event.
    async fn set_frozen(&self, id: &str, frozen: bool) -> Result<()> {
        let namespace = self
            .lock()
            .get(id)
            .map(|c| c.namespace.clone())
            .ok_or_else(|| container_not_found(id))?;
        let container_id = id.to_string();
        let (state, event) = if frozen {
            self.runtime.pause(id).await?;
            let event = TaskPaused {
                container_id,
                ..Default::default()
            };
            (RunState::Paused, TaskEvent::Paused(event))
        } else {
            self.runtime.resume(id).await?;
            let event = TaskResumed {
                container_id,
                ..Default::default()
            };
            (RunState::Running, TaskEvent::Resumed(event))
        };
        if let Some(c) = self.lock().get_mut(id) {
            c.init.state = state;
        }
        self.events.publish(&namespace, event);
        Ok(())
    }
}

fn namespace(ctx: &TtrpcContext) -> String {
    ctx.metadata
        .get(NAMESPACE_KEY)
        .and_then(|values| values.first())
        .cloned()
        .unwrap_or_else(|| "default".to_string())
}

fn container_not_found(id: &str) -> Error {
    Error::NotFound(format!("container {id:?}"))
}

fn exec_not_found(id: &str, exec_id: &str) -> Error {
    Error::NotFound(format!("exec {exec_id:?} of container {id:?}"))
}

fn finished(id: &str, exec_id: &str) -> Error {
    let what = if exec_id.is_empty() {
        format!("container {id:?}")
    } else {
        format!("exec {exec_id:?} of container {id:?}")
    };
    Error::NotFound(format!("process of {what}: process already finished;"))
}

#[async_trait]
impl<R: ContainerRuntime> Task for TaskService<R> {
    async fn create(
        &self,
        ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        id::validate("container", &req.id)?;
        if !req.checkpoint.is_empty() {
            return Err(
                Error::Unimplemented("restoring a container from a checkpoint".into()).into(),
            );
        }
        let namespace = namespace(ctx);
        let _busy = {
            let containers = self.lock();
            match self.claim(&req.id) {
                Some(busy) if !containers.contains_key(&req.id) => busy,
                _ => return Err(Error::AlreadyExists(format!("container {:?}", req.id)).into()),
            }
        };

        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let container = CreateContainer {
            id: req.id.clone(),
            bundle: PathBuf::from(&req.bundle),
            rootfs: req
                .rootfs
                .iter()
                .map(|m| Mount {
                    fs_type: m.type_.clone(),
                    source: m.source.clone(),
                    options: m.options.clone(),
                })
                .collect(),
            stdio: stdio.clone(),
        };
        let spawned = self.create_to_completion(container).await?;
        let mut init = self.monitor(spawned, &req.id, "", &namespace);
        init.stdio = stdio;
        let pid = init.pid;
        self.lock().insert(
            req.id.clone(),
            Container {
                namespace: namespace.clone(),
                bundle: req.bundle.clone(),
                init,
                execs: HashMap::new(),
            },
        );
        self.save(&req.id);
        tracing::info!(sandbox_id = %self.sandbox_id, container_id = %req.id, pid, "container created");

        let mut event = TaskCreate::new();
        event.container_id = req.id.clone();
        event.bundle = req.bundle.clone();
        event.rootfs = req.rootfs.clone();
        event.io = Some(TaskIO {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
            ..Default::default()
        })
        .into();
        event.pid = pid;
        self.events.publish(&namespace, TaskEvent::Create(event));

        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        if req.exec_id.is_empty() {
            let (pid, namespace) = {
                let containers = self.lock();
                let container = containers
                    .get(&req.id)
                    .ok_or_else(|| container_not_found(&req.id))?;
                if container.init.state != RunState::Created || container.init.exited().is_some() {
                    return Err(Error::FailedPrecondition(format!(
                        "container {:?} is not in created state",
                        req.id
                    ))
                    .into());
                }
                (container.init.pid, container.namespace.clone())
            };
            let console = self.runtime.start(&req.id).await?;
            if let Some(container) = self.lock().get_mut(&req.id) {
                container.init.state = RunState::Running;
                if console.is_some() {
                    container.init.console = console;
                }
            }
            tracing::info!(sandbox_id = %self.sandbox_id, container_id = %req.id, pid, "container started");
            let mut event = TaskStart::new();
            event.container_id = req.id;
            event.pid = pid;
            self.events.publish(&namespace, TaskEvent::Start(event));
            return Ok(StartResponse {
                pid,
                ..Default::default()
            });
        }

        let (process, namespace) = {
            let containers = self.lock();
            let container = containers
                .get(&req.id)
                .ok_or_else(|| container_not_found(&req.id))?;
            if container.init.exited().is_some() {
                return Err(Error::FailedPrecondition(format!(
                    "container {:?} has exited",
                    req.id
                ))
                .into());
            }
            let exec = container
                .execs
                .get(&req.exec_id)
                .ok_or_else(|| exec_not_found(&req.id, &req.exec_id))?;
            if exec.process.is_some() {
                return Err(Error::FailedPrecondition(format!(
                    "exec {:?} of container {:?} already started",
                    req.exec_id, req.id
                ))
                .into());
            }
            let process = ExecProcess {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                spec: exec.spec.clone(),
                stdio: exec.stdio.clone(),
            };
            (process, container.namespace.clone())
        };
        let spawned = match self.runtime.exec(&process).await {
            Ok(spawned) => spawned,
            Err(err) => {
                // Waiters learn that the process will never run.
                if let Some(exec) = self
                    .lock()
                    .get(&req.id)
                    .and_then(|c| c.execs.get(&req.exec_id))
                {
                    exec.exit.send_replace(Some(ExitStatus::now(255)));
                }
                return Err(err.into());
            }
        };
        let pid = spawned.pid;
        let sender = {
            let mut containers = self.lock();
            let exec = containers
                .get_mut(&req.id)
                .and_then(|c| c.execs.get_mut(&req.exec_id))
                .ok_or_else(|| exec_not_found(&req.id, &req.exec_id))?;
            exec.process = Some(Process {
                pid,
                stdio: process.stdio,
                state: RunState::Running,
                exit: exec.exit.subscribe(),
                console: spawned.console,
            });
            exec.exit.clone()
        };
        self.monitor_into(
            spawned.exit,
            None,
            sender,
            pid,
            &req.id,
            &req.exec_id,
            &namespace,
        );
        self.save(&req.id);
        tracing::info!(sandbox_id = %self.sandbox_id, container_id = %req.id, exec_id = %req.exec_id, pid, "exec started");
        let mut event = TaskExecStarted::new();
        event.container_id = req.id;
        event.exec_id = req.exec_id;
        event.pid = pid;
        self.events
            .publish(&namespace, TaskEvent::ExecStarted(event));
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        let containers = self.lock();
        let container = containers
            .get(&req.id)
            .ok_or_else(|| container_not_found(&req.id))?;
        let (pid, status, stdio, exit) = if req.exec_id.is_empty() {
            let init = &container.init;
            (init.pid, init.status(), &init.stdio, init.exited())
        } else {
            let exec = container
                .execs
                .get(&req.exec_id)
                .ok_or_else(|| exec_not_found(&req.id, &req.exec_id))?;
            match &exec.process {
                Some(p) => (p.pid, p.status(), &p.stdio, p.exited()),
                None => (0, Status::CREATED, &exec.stdio, None),
            }
        };
        let mut response = StateResponse::new();
        response.id = req.id.clone();
        response.exec_id = req.exec_id.clone();
        response.bundle = container.bundle.clone();
        response.pid = pid;
        response.status = EnumOrUnknown::new(status);
        response.stdin = stdio.stdin.clone();
        response.stdout = stdio.stdout.clone();
        response.stderr = stdio.stderr.clone();
        response.terminal = stdio.terminal;
        if let Some(exit) = exit {
            response.exit_status = exit.code as u32;
            response.exited_at = Some(timestamp(exit.at)).into();
        }
        Ok(response)
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: DeleteRequest,
    ) -> ttrpc::Result<DeleteResponse> {
        if req.exec_id.is_empty() {
            let (pid, exit, namespace) = self.remove_container(&req.id).await?;
            tracing::info!(sandbox_id = %self.sandbox_id, container_id = %req.id, "container deleted");
            let mut event = TaskDelete::new();
            event.container_id = req.id.clone();
            event.id = req.id;
            event.pid = pid;
            event.exit_status = exit.code as u32;
            event.exited_at = Some(timestamp(exit.at)).into();
            self.events.publish(&namespace, TaskEvent::Delete(event));
            return Ok(DeleteResponse {
                pid,
                exit_status: exit.code as u32,
                exited_at: Some(timestamp(exit.at)).into(),
                ..Default::default()
            });
        }

        let mut containers = self.lock();
        let container = containers
            .get_mut(&req.id)
            .ok_or_else(|| container_not_found(&req.id))?;
        let exec = container
            .execs
            .get(&req.exec_id)
            .ok_or_else(|| exec_not_found(&req.id, &req.exec_id))?;
        let (pid, exit) = match &exec.process {
            None => (0, ExitStatus::now(0)),
            Some(p) => match p.exited() {
                Some(exit) => (p.pid, exit),
                None => {
                    return Err(Error::FailedPrecondition(format!(
                        "exec {:?} of container {:?} is still running",
                        req.exec_id, req.id
                    ))
                    .into())
                }
            },
        };
        io::release_stdin(&exec.stdio.stdin);
        container.execs.remove(&req.exec_id);
        drop(containers);
        self.save(&req.id);
        Ok(DeleteResponse {
            pid,
            exit_status: exit.code as u32,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        if !self.lock().contains_key(&req.id) {
            return Err(container_not_found(&req.id).into());
        }
        let processes = self.runtime.pids(&req.id).await?;
        Ok(PidsResponse {
            processes: processes
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> ttrpc::Result<Empty> {
        self.set_frozen(&req.id, true).await?;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> ttrpc::Result<Empty> {
        self.set_frozen(&req.id, false).await?;
        Ok(Empty::new())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        let target = {
            let containers = self.lock();
            let container = containers
                .get(&req.id)
                .ok_or_else(|| container_not_found(&req.id))?;
            if req.exec_id.is_empty() {
                if container.init.exited().is_some() && !req.all {
                    return Err(finished(&req.id, "").into());
                }
                KillTarget::Init { all: req.all }
            } else {
                let exec = container
                    .execs
                    .get(&req.exec_id)
                    .ok_or_else(|| exec_not_found(&req.id, &req.exec_id))?;
                match &exec.process {
                    Some(p) if p.exited().is_none() => KillTarget::Exec(p.pid),
                    Some(_) => return Err(finished(&req.id, &req.exec_id).into()),
                    None => {
                        return Err(Error::FailedPrecondition(format!(
                            "exec {:?} of container {:?} is not started",
                            req.exec_id, req.id
                        ))
                        .into())
                    }
                }
            }
        };
        tracing::info!(sandbox_id = %self.sandbox_id, container_id = %req.id, exec_id = %req.exec_id, signal = req.signal, all = req.all, "kill");
        self.runtime.kill(&req.id, target, req.signal).await?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        id::validate("exec", &req.exec_id)?;
        let spec = req
            .spec
            .as_ref()
            .map(|any| any.value.clone())
            .unwrap_or_default();
        if spec.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "exec {:?} has no process spec",
                req.exec_id
            ))
            .into());
        }
        let namespace = {
            let mut containers = self.lock();
            let container = containers
                .get_mut(&req.id)
                .ok_or_else(|| container_not_found(&req.id))?;
            if container.init.exited().is_some() {
                return Err(Error::FailedPrecondition(format!(
                    "container {:?} has exited",
                    req.id
                ))
                .into());
            }
            if container.execs.contains_key(&req.exec_id) {
                return Err(Error::AlreadyExists(format!(
                    "exec {:?} of container {:?}",
                    req.exec_id, req.id
                ))
                .into());
            }
            let stdio = Stdio {
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
                terminal: req.terminal,
            };
            let exit = watch::channel(None).0;
            container.execs.insert(
                req.exec_id.clone(),
                Exec {
                    spec,
                    stdio,
                    exit,
                    process: None,
                },
            );
            container.namespace.clone()
        };
        let mut event = TaskExecAdded::new();
        event.container_id = req.id;
        event.exec_id = req.exec_id;
        self.events.publish(&namespace, TaskEvent::ExecAdded(event));
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        let console = {
            let containers = self.lock();
            let container = containers
                .get(&req.id)
                .ok_or_else(|| container_not_found(&req.id))?;
            let process = if req.exec_id.is_empty() {
                Some(&container.init)
            } else {
                container
                    .execs
                    .get(&req.exec_id)
                    .ok_or_else(|| exec_not_found(&req.id, &req.exec_id))?
                    .process
                    .as_ref()
            };
            process.map(|p| (p.console.clone(), p.stdio.terminal))
        };
        match console {
            Some((Some(console), _)) => {
                console.resize(req.width, req.height).map_err(Error::from)?
            }
            // The terminal is the runtime's own (inside a VM, say).
            Some((None, true)) => {
                self.runtime
                    .resize_pty(&req.id, &req.exec_id, req.width, req.height)
                    .await?
            }
            _ => {
                return Err(Error::FailedPrecondition(format!(
                    "process of container {:?} has no terminal",
                    req.id
                ))
                .into())
            }
        }
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        // Stdin is a FIFO copy that ends when containerd closes its writer; nothing to do
        // beyond checking that the process exists.
        let containers = self.lock();
        let container = containers
            .get(&req.id)
            .ok_or_else(|| container_not_found(&req.id))?;
        if !req.exec_id.is_empty() && !container.execs.contains_key(&req.exec_id) {
            return Err(exec_not_found(&req.id, &req.exec_id).into());
        }
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        if !self.lock().contains_key(&req.id) {
            return Err(container_not_found(&req.id).into());
        }
        let resources = req
            .resources
            .as_ref()
            .map(|any| any.value.clone())
            .unwrap_or_default();
        if resources.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "update of container {:?} has no resources",
                req.id
            ))
            .into());
        }
        self.runtime.update(&req.id, &resources).await?;
        tracing::info!(sandbox_id = %self.sandbox_id, container_id = %req.id, "resources updated");
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let mut exit = {
            let containers = self.lock();
            let container = containers
                .get(&req.id)
                .ok_or_else(|| container_not_found(&req.id))?;
            if req.exec_id.is_empty() {
                container.init.exit.clone()
            } else {
                let exec = container
                    .execs
                    .get(&req.exec_id)
                    .ok_or_else(|| exec_not_found(&req.id, &req.exec_id))?;
                exec.exit.subscribe()
            }
        };
        let exit = exit
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::internal(format!("exit of container {:?} was lost", req.id)))?
            .unwrap_or_else(|| ExitStatus::now(255));
        Ok(WaitResponse {
            exit_status: exit.code as u32,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        if !self.lock().contains_key(&req.id) {
            return Err(container_not_found(&req.id).into());
        }
        let stats = self.runtime.stats(&req.id).await?;
        Ok(StatsResponse {
            stats: Some(stats).into(),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> ttrpc::Result<ConnectResponse> {
        let task_pid = self
            .lock()
            .get(&req.id)
            .map(|c| c.init.pid)
            .unwrap_or_default();
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: "3".into(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        // The sandboxer, not containerd, decides when a sandbox's task server goes away.
        Ok(Empty::new())
    }
}

/// A ttrpc server exposing one sandbox's [`TaskService`] on a unix socket.
pub struct TaskServer {
    server: Mutex<ttrpc::r#async::Server>,
    socket: PathBuf,
}

impl TaskServer {
    /// Serves `service` on the unix socket `socket`, replacing a stale socket file.
    pub async fn start<R: ContainerRuntime>(
        socket: &Path,
        service: Arc<TaskService<R>>,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;

        if socket.as_os_str().len() >= 108 {
            anyhow::bail!(
                "task socket path {} is too long for a unix socket",
                socket.display()
            );
        }
        match std::fs::remove_file(socket) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(err)
                    .with_context(|| format!("remove stale socket {}", socket.display()))
            }
        }
        let address = format!("unix://{}", socket.display());
        let mut server = ttrpc::r#async::Server::new()
            .bind(&address)
            .with_context(|| format!("bind task socket {}", socket.display()))?
            .register_service(create_task(service));
        server
            .start()
            .await
            .with_context(|| format!("serve task socket {}", socket.display()))?;
        Ok(Self {
            server: Mutex::new(server),
            socket: socket.to_path_buf(),
        })
    }

    /// The address containerd dials: `ttrpc+unix://<socket>`.
    pub fn address(&self) -> String {
        format!("ttrpc+unix://{}", self.socket.display())
    }

    /// Stops serving and removes the socket.
    pub async fn shutdown(self) {
        let mut server = self
            .server
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let _ = server.shutdown().await;
        let _ = std::fs::remove_file(&self.socket);
    }
}
