//! Pods as a set of Linux namespaces on the host: a [`Sandboxer`] for every family whose
//! containers run as host processes (runc, wasm, application kernels).
//!
//! A pod is a namespace holder process, a cgroup under the pod's cgroup parent, the files
//! CRI mounts into its containers, and a Task API server whose containers a
//! [`ContainerRuntime`] runs in the holder's namespaces (containerd writes those namespace
//! paths into each container's spec from the pid that `start` returns).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use async_trait::async_trait;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::watch;

use crate::cgroup::Cgroup;
use crate::config::Config;
use crate::controller::SandboxState;
use crate::error::{Error, Result};
use crate::events::EventPublisher;
use crate::holder::{self, HolderSpec};
use crate::pod::{PodFiles, PodNamespaces};
use crate::process::ProcessId;
use crate::reaper::ExitReceiver;
use crate::relay::RelaySockets;
use crate::task::{ContainerRuntime, PodContext, TaskServer, TaskService};
use crate::{SandboxExit, SandboxRequest, SandboxStatus, Sandboxer, StartedSandbox};

/// Task API version served to containerd.
const TASK_API_VERSION: u32 = 3;

/// Grace period for containers when a pod is stopped without a timeout.
const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// How long a killed holder may take to be reaped.
const HOLDER_EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Pods whose containers `R` runs as host processes in the pod's namespaces.
pub struct PodSandboxer<R> {
    state_dir: PathBuf,
    cri_root_dir: PathBuf,
    cri_state_dir: PathBuf,
    runtime: Arc<R>,
    events: EventPublisher,
    sandboxes: Mutex<HashMap<String, Arc<PodSandbox<R>>>>,
}

struct PodSandbox<R> {
    request: SandboxRequest,
    created_at: SystemTime,
    /// Where the sandbox's Task API listens; short enough for any sandbox id.
    socket: PathBuf,
    files: PodFiles,
    exit: watch::Sender<Option<SandboxExit>>,
    running: tokio::sync::Mutex<Option<Running<R>>>,
}

struct Running<R> {
    holder_pid: u32,
    /// The task relay containerd dials, for pods that outlive the sandboxer.
    relay: Option<ProcessId>,
    /// Turns true once the holder is reaped, so that its pid is never signalled after.
    holder_exited: watch::Receiver<bool>,
    tasks: Arc<TaskService<R>>,
    server: TaskServer,
    cgroup: Option<Cgroup>,
    address: String,
}

/// What a restarted sandboxer needs to serve a started pod again, for runtimes whose pods
/// outlive it ([`ContainerRuntime::recoverable`]).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct PodRecord {
    id: String,
    netns_path: Option<PathBuf>,
    hostname: String,
    created_at: SystemTime,
    holder: ProcessId,
    relay: Option<ProcessId>,
    /// The pod's cgroup (a cgroupfs path), when it has one.
    cgroup_path: Option<String>,
    /// Set once the pod has started: a pod recorded while starting whose start never
    /// finished (the sandboxer died meanwhile) is ended at recovery.
    started: bool,
}

impl<R: ContainerRuntime> PodSandboxer<R> {
    /// A sandboxer keeping its state under `config.state_dir`, running containers with
    /// `runtime` and publishing task events through `events`.
    pub fn new<F>(config: &Config<F>, runtime: Arc<R>, events: EventPublisher) -> Self {
        Self {
            state_dir: config.state_dir.clone(),
            cri_root_dir: config.containerd.cri_root_dir.clone(),
            cri_state_dir: config.containerd.cri_state_dir.clone(),
            runtime,
            events,
            sandboxes: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<PodSandbox<R>>>> {
        self.sandboxes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Where a recoverable pod's records live.
    fn pod_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("pods").join(id)
    }

    /// The socket of a sandbox's Task API; short enough for any sandbox id.
    fn task_socket(&self, id: &str) -> PathBuf {
        self.state_dir
            .join("sockets")
            .join(format!("{:016x}.sock", fnv1a(id)))
    }

    /// The sockets of a sandbox's task relay.
    fn relay_sockets(&self, id: &str) -> RelaySockets {
        let sockets = self.state_dir.join("sockets");
        let hash = fnv1a(id);
        RelaySockets {
            tasks: sockets.join(format!("{hash:016x}-relay.sock")),
            fifos: sockets.join(format!("{hash:016x}-fifos.sock")),
        }
    }

    fn get(&self, id: &str) -> Result<Arc<PodSandbox<R>>> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("sandbox {id:?}")))
    }

    async fn start_pod(&self, id: &str, sandbox: &PodSandbox<R>) -> anyhow::Result<Running<R>> {
        let pod = sandbox.request.pod.as_ref();
        let namespaces = PodNamespaces::of(pod);
        if let Some(netns) = &sandbox.request.netns_path {
            if !namespaces.host_network && !netns.exists() {
                anyhow::bail!("network namespace {} does not exist", netns.display());
            }
        }
        let hostname = match pod.map(|p| p.hostname.as_str()).filter(|h| !h.is_empty()) {
            Some(name) if !namespaces.host_network => name.to_string(),
            _ => nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        let spec = HolderSpec::for_pod(namespaces, sandbox.request.netns_path.clone(), &hostname);
        let holder = holder::spawn(&spec)
            .await
            .context("start the namespace holder")?;
        let holder_pid = holder.pid;

        let mut cleanup = Cleanup {
            holder_pid: Some(holder_pid),
            cgroup: None,
            files: None,
            records: None,
        };
        let cgroup_parent = pod
            .and_then(|p| p.linux.as_ref())
            .map(|l| l.cgroup_parent.as_str())
            .unwrap_or_default();
        let cgroup_path = (!cgroup_parent.is_empty())
            .then(|| format!("{}/{id}", cgroup_parent.trim_end_matches('/')));
        let netns = sandbox
            .request
            .netns_path
            .clone()
            .filter(|_| !namespaces.host_network);
        // Pods that outlive the sandboxer are recorded from the start, so that a sandboxer
        // dying halfway leaves nothing its successor does not know of.
        let mut record = self.runtime.recoverable().then(|| PodRecord {
            id: id.to_string(),
            netns_path: netns.clone(),
            hostname: hostname.clone(),
            created_at: sandbox.created_at,
            // A holder gone already is recorded as such (start time 0).
            holder: ProcessId {
                pid: holder_pid,
                start_time: crate::process::start_time(holder_pid).unwrap_or_default(),
            },
            relay: None,
            cgroup_path: cgroup_path.clone(),
            started: false,
        });
        if let Some(record) = &record {
            cleanup.records = Some(self.pod_dir(id));
            self.write_record(record)?;
        }
        if !cgroup_parent.is_empty() {
            let cgroup = Cgroup::create(cgroup_parent, id)?;
            cleanup.cgroup = Some(cgroup.clone());
            cgroup.add(holder_pid)?;
        }
        sandbox.files.create(pod, &hostname)?;
        cleanup.files = Some(sandbox.files.clone());

        let mut tasks = TaskService::new(id, self.runtime.clone(), self.events.clone());
        if record.is_some() {
            tasks = tasks.with_records(self.pod_dir(id).join("containers"))?;
        }
        let tasks = Arc::new(tasks);
        let server = TaskServer::start(&sandbox.socket, tasks.clone()).await?;
        let mut address = server.address();
        let relay_sockets = self.relay_sockets(id);
        let relay = if let Some(record) = &mut record {
            match self.start_relay(sandbox, record).await {
                Ok(relay) => {
                    address = format!("ttrpc+unix://{}", relay_sockets.tasks.display());
                    Some(relay)
                }
                Err(err) => {
                    server.shutdown().await;
                    return Err(err);
                }
            }
        } else {
            None
        };

        let context = PodContext {
            id: id.to_string(),
            holder_pid,
            netns,
            hostname: hostname.clone(),
            cgroup_path: cgroup_path.filter(|_| cleanup.cgroup.is_some()),
            fifo_keeper: relay.map(|_| relay_sockets.fifos.clone()),
        };
        let started = match (self.runtime.start_pod(&context).await, &mut record) {
            (Ok(exit), Some(record)) => {
                record.started = true;
                self.write_record(record).map(|()| exit)
            }
            (Ok(exit), None) => Ok(exit),
            (Err(err), _) => Err(anyhow::Error::new(err)),
        };
        let pod_exit = match started {
            Ok(exit) => exit,
            Err(err) => {
                if let Err(stop) = self.runtime.stop_pod(id).await {
                    tracing::warn!(sandbox_id = %id, error = %stop, "cannot clean up a pod that failed to start");
                }
                if let Some(relay) = relay {
                    self.end_relay(id, relay).await;
                }
                server.shutdown().await;
                return Err(err);
            }
        };
        watch_pod_exit(id, sandbox, pod_exit);
        let holder_exited = watch_holder(id, sandbox, holder_pid, holder.exit);
        if let (Some(relay), Some(record)) = (relay, &record) {
            watch_relay(id, sandbox, relay, record.holder);
        }

        let cgroup = cleanup.cgroup.take();
        cleanup.disarm();
        Ok(Running {
            holder_pid,
            relay,
            holder_exited,
            tasks,
            server,
            cgroup,
            address,
        })
    }

    /// Starts the task relay of a pod that outlives the sandboxer and records it.
    async fn start_relay(
        &self,
        sandbox: &PodSandbox<R>,
        record: &mut PodRecord,
    ) -> anyhow::Result<ProcessId> {
        let relay = crate::relay::spawn(&self.relay_sockets(&record.id), &sandbox.socket).await?;
        record.relay = Some(relay);
        if let Err(err) = self.write_record(record) {
            self.end_relay(&record.id, relay).await;
            return Err(err);
        }
        Ok(relay)
    }

    /// Writes the record of a pod that outlives the sandboxer.
    fn write_record(&self, record: &PodRecord) -> anyhow::Result<()> {
        let dir = self.pod_dir(&record.id);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        crate::state::write_json(&dir.join("pod.json"), record)
            .with_context(|| format!("record pod {:?}", record.id))
    }

    /// Finds the pods recorded in `<state_dir>/pods` again. A pod whose processes are
    /// gone is known as stopped, so that containerd can stop and remove it.
    async fn recover_pods(&self) -> anyhow::Result<()> {
        let dir = self.state_dir.join("pods");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(err).with_context(|| format!("read {}", dir.display())),
        };
        // Pods are taken over side by side: one slow VM does not hold the others up.
        let recoveries = entries
            .flatten()
            .map(|entry| self.take_over_pod(entry.path(), entry.file_name()));
        futures::future::join_all(recoveries).await;
        Ok(())
    }

    /// Takes over the pod recorded in `dir`, named `name`.
    async fn take_over_pod(&self, dir: PathBuf, name: std::ffi::OsString) {
        let path = dir.join("pod.json");
        let record: PodRecord = match crate::state::read_json(&path) {
            Ok(record) => record,
            Err(err) => {
                let Some(id) = name
                    .to_str()
                    .filter(|id| crate::id::validate("sandbox", id).is_ok())
                else {
                    tracing::error!(record = %path.display(), error = format!("{err:#}"), "unreadable record of no valid sandbox id: ignored");
                    return;
                };
                tracing::error!(sandbox_id = %id, record = %path.display(), error = format!("{err:#}"), "unreadable pod record: the pod cannot be served again, what it runs is ended and it is known as stopped");
                self.end_unrecorded_pod(id).await;
                let sandbox = Arc::new(PodSandbox {
                    request: SandboxRequest {
                        id: id.to_string(),
                        ..Default::default()
                    },
                    created_at: SystemTime::now(),
                    socket: self.task_socket(id),
                    files: PodFiles::new(&self.cri_root_dir, &self.cri_state_dir, id),
                    exit: watch::channel(None).0,
                    running: Default::default(),
                });
                record_exit(&sandbox.exit, (255, SystemTime::now()));
                self.lock().insert(id.to_string(), sandbox);
                return;
            }
        };
        if crate::id::validate("sandbox", &record.id).is_err()
            || name.to_str() != Some(record.id.as_str())
        {
            tracing::error!(record = %path.display(), "pod record names another pod: ignored");
            return;
        }
        let id = record.id.clone();
        let sandbox = Arc::new(PodSandbox {
            request: SandboxRequest {
                id: id.clone(),
                netns_path: record.netns_path.clone(),
                ..Default::default()
            },
            created_at: record.created_at,
            socket: self.task_socket(&id),
            files: PodFiles::new(&self.cri_root_dir, &self.cri_state_dir, &id),
            exit: watch::channel(None).0,
            running: Default::default(),
        });
        if !record.started {
            // containerd saw its RunPodSandbox fail and has given the pod up.
            tracing::warn!(sandbox_id = %id, "the sandboxer stopped while this pod was starting: what it left is removed");
            self.abandon_pod(&record).await;
            let removed = sandbox
                .files
                .remove()
                .and_then(|()| self.forget_records(&id));
            if let Err(err) = removed {
                tracing::warn!(sandbox_id = %id, error = format!("{err:#}"), "cannot remove what a half-started pod left");
            }
            return;
        }
        match self.resume_pod(&record, &sandbox).await {
            Ok(running) => {
                tracing::info!(sandbox_id = %id, pid = running.holder_pid, address = %running.address, containers = running.tasks.container_ids().len(), "sandbox recovered");
                *sandbox.running.lock().await = Some(running);
            }
            Err(err) => {
                tracing::warn!(sandbox_id = %id, error = format!("{err:#}"), "sandbox not running any more: known as stopped");
                self.abandon_pod(&record).await;
                record_exit(&sandbox.exit, (255, SystemTime::now()));
            }
        }
        self.lock().insert(id, sandbox);
    }

    /// Serves a recorded pod again, if its processes still run.
    async fn resume_pod(
        &self,
        record: &PodRecord,
        sandbox: &PodSandbox<R>,
    ) -> anyhow::Result<Running<R>> {
        let id = &record.id;
        if !record.holder.is_alive() {
            anyhow::bail!("its namespace holder {} is gone", record.holder.pid);
        }
        let holder_exit = crate::process::watch_end(record.holder.pid)?;
        let context = PodContext {
            id: id.clone(),
            holder_pid: record.holder.pid,
            netns: record.netns_path.clone(),
            hostname: record.hostname.clone(),
            cgroup_path: record.cgroup_path.clone(),
            fifo_keeper: Some(self.relay_sockets(id).fifos),
        };
        let pod_exit = self.runtime.recover_pod(&context).await?;
        let tasks = TaskService::recover(
            id,
            self.runtime.clone(),
            self.events.clone(),
            self.pod_dir(id).join("containers"),
        )
        .await?;
        let tasks = Arc::new(tasks);
        let server = TaskServer::start(&sandbox.socket, tasks.clone()).await?;
        let relay = match record.relay {
            Some(relay) if relay.is_alive() => relay,
            _ => {
                tracing::warn!(sandbox_id = %id, "the task relay is gone: containerd's open task connections are lost");
                crate::relay::spawn(&self.relay_sockets(id), &sandbox.socket).await?
            }
        };
        let cgroup = match &record.cgroup_path {
            Some(path) => Some(Cgroup::existing(path)?),
            None => None,
        };
        watch_pod_exit(id, sandbox, pod_exit);
        let holder_exited = watch_holder(id, sandbox, record.holder.pid, holder_exit);
        watch_relay(id, sandbox, relay, record.holder);
        Ok(Running {
            holder_pid: record.holder.pid,
            relay: Some(relay),
            holder_exited,
            tasks,
            server,
            cgroup,
            address: format!("ttrpc+unix://{}", self.relay_sockets(id).tasks.display()),
        })
    }

    /// Ends what a pod whose record is unreadable runs, found without the record: its
    /// relay by the sockets its command line names, its namespace holder (and whatever
    /// else) by the pod's cgroup, which is named by the sandbox id, and what the family
    /// runs for it.
    async fn end_unrecorded_pod(&self, id: &str) {
        let sockets = self.relay_sockets(id);
        let mut processes = crate::process::naming(&sockets.tasks.display().to_string());
        let in_cgroup = crate::process::in_cgroup_named(id);
        let cgroup_path = in_cgroup.first().map(|(_, path)| path.clone());
        processes.extend(in_cgroup.into_iter().map(|(process, _)| process));
        tracing::info!(sandbox_id = %id, processes = processes.len(), "ending what the unrecorded pod runs");
        self.end_leftovers(id, &processes, cgroup_path.as_deref())
            .await;
    }

    /// Kills a pod's task relay, waits until it is gone and removes its sockets.
    async fn end_relay(&self, id: &str, relay: ProcessId) {
        kill_and_wait(relay).await;
        let sockets = self.relay_sockets(id);
        remove_sockets(id, [sockets.tasks, sockets.fifos]);
    }

    /// Ends what is left of a recorded pod that cannot be served again.
    async fn abandon_pod(&self, record: &PodRecord) {
        let processes: Vec<ProcessId> = record.relay.into_iter().chain([record.holder]).collect();
        self.end_leftovers(&record.id, &processes, record.cgroup_path.as_deref())
            .await;
    }

    /// Ends a pod that cannot be served again: `processes` (its relay and holder), what the
    /// family runs for it, its sockets and its cgroup.
    async fn end_leftovers(&self, id: &str, processes: &[ProcessId], cgroup_path: Option<&str>) {
        for process in processes {
            process.signal(Signal::SIGKILL);
        }
        for process in processes {
            if !process.wait_gone(HOLDER_EXIT_TIMEOUT).await {
                tracing::warn!(sandbox_id = %id, pid = process.pid, "process did not exit after SIGKILL");
            }
        }
        if let Err(err) = self.runtime.stop_pod(id).await {
            tracing::warn!(sandbox_id = %id, error = %err, "cannot stop what is left of the pod");
        }
        let relay = self.relay_sockets(id);
        remove_sockets(id, [self.task_socket(id), relay.tasks, relay.fifos]);
        if let Some(path) = cgroup_path {
            if let Err(err) = Cgroup::existing(path).and_then(|cgroup| cgroup.remove()) {
                tracing::warn!(sandbox_id = %id, error = format!("{err:#}"), "cannot remove the pod's cgroup");
            }
        }
    }

    async fn stop_pod(&self, id: &str, running: &Running<R>, grace: Duration) {
        running.tasks.kill_all(grace).await;
        if let Err(err) = self.runtime.stop_pod(id).await {
            tracing::warn!(sandbox_id = %id, error = %err, "cannot stop the pod's own process");
        }
        let mut holder_exited = running.holder_exited.clone();
        if !*holder_exited.borrow() {
            let _ = kill(Pid::from_raw(running.holder_pid as i32), Signal::SIGKILL);
            if tokio::time::timeout(HOLDER_EXIT_TIMEOUT, holder_exited.wait_for(|gone| *gone))
                .await
                .is_err()
            {
                tracing::warn!(sandbox_id = %id, pid = running.holder_pid, "namespace holder did not exit after SIGKILL");
            }
        }
    }
}

/// Kills `process` and waits until it is gone (at most [`HOLDER_EXIT_TIMEOUT`]).
async fn kill_and_wait(process: ProcessId) {
    process.signal(Signal::SIGKILL);
    if !process.wait_gone(HOLDER_EXIT_TIMEOUT).await {
        tracing::warn!(pid = process.pid, "process did not exit after SIGKILL");
    }
}

/// Removes the sockets of pod `id` that are there.
fn remove_sockets<const N: usize>(id: &str, sockets: [PathBuf; N]) {
    for socket in sockets {
        if let Err(err) = std::fs::remove_file(&socket) {
            if err.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(sandbox_id = %id, socket = %socket.display(), error = %err, "cannot remove a socket");
            }
        }
    }
}

/// Ends the pod when its task relay dies while the pod runs: containerd has lost its
/// task connections and takes the pod's containers for exited, so the pod is reported
/// stopped for the kubelet to replace it.
fn watch_relay<R>(id: &str, sandbox: &PodSandbox<R>, relay: ProcessId, holder: ProcessId) {
    let relay_end = match crate::process::watch_end(relay.pid) {
        Ok(end) => end,
        Err(err) => {
            tracing::warn!(sandbox_id = %id, error = format!("{err:#}"), "cannot watch the task relay");
            return;
        }
    };
    let exit = sandbox.exit.clone();
    let sandbox_id = id.to_string();
    tokio::spawn(async move {
        let _ = relay_end.await;
        if holder.is_alive() && exit.borrow().is_none() {
            tracing::error!(%sandbox_id, pid = relay.pid, "the pod's task relay died: containerd lost its task connections, the pod is reported stopped");
            record_exit(&exit, (255, SystemTime::now()));
        }
    });
}

/// Records the pod's exit when the family's pod-wide process (if any) ends.
fn watch_pod_exit<R>(id: &str, sandbox: &PodSandbox<R>, pod_exit: Option<ExitReceiver>) {
    let Some(pod_exit) = pod_exit else {
        return;
    };
    let exit = sandbox.exit.clone();
    let sandbox_id = id.to_string();
    tokio::spawn(async move {
        let status = pod_exit
            .await
            .map(|s| (s.code as u32, s.at))
            .unwrap_or((255, SystemTime::now()));
        tracing::info!(%sandbox_id, exit_code = status.0, "the pod's own process exited");
        record_exit(&exit, status);
    });
}

/// Records the pod's exit when its namespace holder ends; the receiver turns true then.
fn watch_holder<R>(
    id: &str,
    sandbox: &PodSandbox<R>,
    holder_pid: u32,
    holder_exit: ExitReceiver,
) -> watch::Receiver<bool> {
    let exit = sandbox.exit.clone();
    let sandbox_id = id.to_string();
    let (holder_gone, holder_exited) = watch::channel(false);
    tokio::spawn(async move {
        let status = holder_exit
            .await
            .map(|s| (s.code as u32, s.at))
            .unwrap_or((255, SystemTime::now()));
        tracing::info!(%sandbox_id, pid = holder_pid, exit_code = status.0, "namespace holder exited");
        holder_gone.send_replace(true);
        record_exit(&exit, status);
    });
    holder_exited
}

/// Records the first exit of a pod; later ones (its holder after its kernel) are not news.
fn record_exit(exit: &watch::Sender<Option<SandboxExit>>, (code, at): (u32, SystemTime)) {
    exit.send_if_modified(|current| {
        if current.is_some() {
            return false;
        }
        *current = Some(SandboxExit { code, at });
        true
    });
}

/// FNV-1a hash of a sandbox id, naming its socket.
fn fnv1a(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Undoes a half-started pod when dropped armed.
struct Cleanup {
    holder_pid: Option<u32>,
    cgroup: Option<Cgroup>,
    files: Option<PodFiles>,
    /// The pod's record directory.
    records: Option<PathBuf>,
}

impl Cleanup {
    fn disarm(&mut self) {
        self.holder_pid = None;
        self.cgroup = None;
        self.files = None;
        self.records = None;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(pid) = self.holder_pid {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        if let Some(files) = &self.files {
            let _ = files.remove();
        }
        if let Some(records) = &self.records {
            let _ = std::fs::remove_dir_all(records);
        }
        if let Some(cgroup) = self.cgroup.take() {
            // The holder needs a moment to be reaped before its cgroup can go.
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                let _ = cgroup.remove();
            });
        }
    }
}

impl<R: ContainerRuntime> PodSandboxer<R> {
    /// Removes the records of pod `id`, if it has any.
    fn forget_records(&self, id: &str) -> anyhow::Result<()> {
        let dir = self.pod_dir(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(err).with_context(|| format!("remove {}", dir.display())),
        }
    }
}

#[async_trait]
impl<R: ContainerRuntime> Sandboxer for PodSandboxer<R> {
    async fn recover(&self) -> anyhow::Result<()> {
        if !self.runtime.recoverable() {
            return Ok(());
        }
        self.recover_pods().await
    }

    async fn create(&self, request: SandboxRequest) -> Result<()> {
        let id = request.id.clone();
        let socket = self.task_socket(&id);
        let files = PodFiles::new(&self.cri_root_dir, &self.cri_state_dir, &id);
        {
            let mut sandboxes = self.lock();
            if sandboxes.contains_key(&id) {
                return Err(Error::AlreadyExists(format!("sandbox {id:?}")));
            }
            if let Some(dir) = socket.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("create socket directory {}", dir.display()))?;
            }
            let sandbox = PodSandbox {
                request,
                created_at: SystemTime::now(),
                socket,
                files,
                exit: watch::channel(None).0,
                running: Default::default(),
            };
            sandboxes.insert(id.clone(), Arc::new(sandbox));
        }
        tracing::info!(sandbox_id = %id, "sandbox created");
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<StartedSandbox> {
        let sandbox = self.get(id)?;
        let mut running = sandbox.running.lock().await;
        if sandbox.exit.borrow().is_some() {
            return Err(Error::FailedPrecondition(format!(
                "sandbox {id:?} has stopped"
            )));
        }
        if let Some(running) = running.as_ref() {
            return Ok(StartedSandbox {
                pid: running.holder_pid,
                created_at: sandbox.created_at,
                address: running.address.clone(),
                version: TASK_API_VERSION,
                labels: HashMap::new(),
            });
        }
        let started = self
            .start_pod(id, &sandbox)
            .await
            .map_err(|err| Error::Internal(err.context(format!("start sandbox {id:?}"))))?;
        tracing::info!(sandbox_id = %id, pid = started.holder_pid, address = %started.address, "sandbox started");
        let response = StartedSandbox {
            pid: started.holder_pid,
            created_at: sandbox.created_at,
            address: started.address.clone(),
            version: TASK_API_VERSION,
            labels: HashMap::new(),
        };
        *running = Some(started);
        Ok(response)
    }

    async fn stop(&self, id: &str, timeout: Option<Duration>) -> Result<()> {
        let sandbox = self.get(id)?;
        let running = sandbox.running.lock().await;
        if let Some(running) = running.as_ref() {
            self.stop_pod(id, running, timeout.unwrap_or(DEFAULT_STOP_GRACE))
                .await;
        } else if sandbox.exit.borrow().is_none() {
            sandbox.exit.send_replace(Some(SandboxExit {
                code: 0,
                at: SystemTime::now(),
            }));
        }
        tracing::info!(sandbox_id = %id, "sandbox stopped");
        Ok(())
    }

    async fn wait(&self, id: &str) -> Result<SandboxExit> {
        let mut exit = self.get(id)?.exit.subscribe();
        let exit = exit
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::NotFound(format!("sandbox {id:?}")))?;
        Ok(exit.unwrap_or(SandboxExit {
            code: 255,
            at: SystemTime::now(),
        }))
    }

    async fn status(&self, id: &str, verbose: bool) -> Result<SandboxStatus> {
        let sandbox = self.get(id)?;
        let exited = *sandbox.exit.borrow();
        let running = sandbox.running.lock().await;
        let (pid, address) = running
            .as_ref()
            .map(|r| (r.holder_pid, r.address.clone()))
            .unwrap_or_default();
        let state = if running.is_some() && exited.is_none() {
            SandboxState::Ready
        } else {
            SandboxState::NotReady
        };
        let mut info = HashMap::new();
        if verbose {
            info.insert("pid".into(), pid.to_string());
            info.insert("task_address".into(), address.clone());
            if let Some(netns) = &sandbox.request.netns_path {
                info.insert("netns_path".into(), netns.display().to_string());
            }
            if let Some(running) = running.as_ref() {
                info.insert("containers".into(), running.tasks.container_ids().join(","));
            }
        }
        Ok(SandboxStatus {
            pid,
            state,
            info,
            created_at: sandbox.created_at,
            exited_at: exited.map(|e| e.at),
            address,
            version: TASK_API_VERSION,
        })
    }

    /// The usage of the pod's own cgroup (its namespace holder, and whatever the family
    /// runs there for the pod, a VM for the vmm family): what the pause container's
    /// cgroup reports for a pod of containerd's runc shim.
    async fn metrics(&self, id: &str) -> Result<Option<prost_types::Any>> {
        let sandbox = self.get(id)?;
        let running = sandbox.running.lock().await;
        Ok(running
            .as_ref()
            .and_then(|started| started.cgroup.as_ref())
            .map(|cgroup| {
                let metrics = cgroup.metrics();
                prost_types::Any {
                    type_url: metrics.type_url,
                    value: metrics.value,
                }
            }))
    }

    async fn shutdown(&self, id: &str) -> Result<()> {
        let sandbox = self.get(id)?;
        let mut running = sandbox.running.lock().await;
        // Everything that can fail comes before the sandbox is forgotten, so that a
        // failed Shutdown can be retried.
        if let Some(started) = running.as_ref() {
            self.stop_pod(id, started, Duration::ZERO).await;
            if let Some(cgroup) = &started.cgroup {
                cgroup.remove().map_err(|err| {
                    Error::Internal(err.context(format!("shut down sandbox {id:?}")))
                })?;
            }
        }
        if let Some(started) = running.take() {
            if let Some(relay) = started.relay {
                self.end_relay(id, relay).await;
            }
            started.server.shutdown().await;
        }
        sandbox
            .files
            .remove()
            .map_err(|err| Error::Internal(err.context(format!("shut down sandbox {id:?}"))))?;
        self.forget_records(id)
            .map_err(|err| Error::Internal(err.context(format!("shut down sandbox {id:?}"))))?;
        if sandbox.exit.borrow().is_none() {
            sandbox.exit.send_replace(Some(SandboxExit {
                code: 0,
                at: SystemTime::now(),
            }));
        }
        self.lock().remove(id);
        tracing::info!(sandbox_id = %id, "sandbox shut down");
        Ok(())
    }
}
