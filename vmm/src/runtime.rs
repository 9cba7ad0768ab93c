//! Pods in microVMs: each pod's VM is booted when the pod starts, and every container
//! operation is carried to the guest agent's Task API.
//!
//! The host keeps what containerd's requests name on the host: it shares each
//! container's bundle into the guest ([`crate::share`]), carries stdio across
//! ([`crate::stdio`]) and learns exits from the agent's `Wait`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use async_trait::async_trait;
use containerd_shim_protos::api::{
    CreateTaskRequest, DeleteRequest, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest,
    ResizePtyRequest, ResumeRequest, StartRequest, StateRequest, StatsRequest, UpdateTaskRequest,
    WaitRequest,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::shim_async::{Client, TaskClient};
use containerd_shim_protos::types::task::Status;
use kuasar_sandbox::error::{Error, Result};
use kuasar_sandbox::io::Console;
use kuasar_sandbox::process::{self, ProcessId};
use kuasar_sandbox::reaper::{ExitReceiver, ExitStatus};
use kuasar_sandbox::task::{
    ContainerRuntime, CreateContainer, ExecProcess, KillTarget, PodContext, Spawned,
};
use kuasar_sandbox::task::{RecoverContainer, RecoveredContainer, RecoveredProcess, RunState};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use vmm_task::api::agent::{
    CheckRequest, Interface, Route, SetupSandboxRequest, SyncClockRequest, WaitOomRequest,
};
use vmm_task::api::agent_ttrpc::AgentClient;

use crate::config::VmmSection;
use crate::hypervisor::qemu::Qemu;
use crate::hypervisor::{Accelerator, Hypervisor, NetworkSpec, Share, VmSpec, VsockSpec};
use crate::network::{self, PodNetwork};
use crate::stdio::StdioPorts;

/// The guest kernel's command line, tuned for boot time under emulation (see
/// docs/architecture.md); the TSC frequency, the sandbox id and the configured
/// parameters are added per VM.
pub const GUEST_CMDLINE: &str = "console=ttyS0 quiet panic=-1 no_timer_check tsc=reliable \
    8250.nr_uarts=1 random.trust_cpu=on mitigations=off cryptomgr.notests rodata=off \
    lsm=lockdown,capability audit=0 pci=off initcall_blacklist=init_kprobe_trace,\
    load_system_certificate_list,crypto_kdf108_init,init_zswap,init_ima,init_encrypted,\
    init_blk_tracer";

/// CRI's annotation naming a container's sandbox.
const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

/// Timeout of one agent request (but `Wait`, which lasts as long as the process).
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long QEMU gets to quit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// How long a KVM probe boot may take before `auto` settles on TCG.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Exit code reported for a process whose exit the agent could not tell.
const UNKNOWN_EXIT: i32 = 255;

/// Length of the sandbox id prefix naming a VM's directory: unix socket paths inside it
/// must stay short.
const VM_DIR_NAME_LEN: usize = 16;

/// The record of a running VM in its directory, for a restarted sandboxer.
const VM_RECORD: &str = "vm.json";

/// How long a restarted sandboxer tries to reach the agent of a running VM.
const AGENT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// What a restarted sandboxer needs to take a running VM over.
#[derive(Debug, Serialize, Deserialize)]
struct VmRecord {
    spec: VmSpec,
    qemu: ProcessId,
    vsock: Option<ProcessId>,
    /// The pod's network namespace and the interface the VM took over.
    netns: PathBuf,
    interface: String,
}

/// The pod's network namespace and what the VM takes over of it.
struct PodNet {
    netns: PathBuf,
    network: PodNetwork,
}

/// A VM whose agent answered.
struct Booted {
    qemu: Qemu,
    client: Client,
    times: BootTimes,
}

/// Where a VM's boot time went, for the pod's start log line.
#[derive(Debug, Clone, Copy)]
struct BootTimes {
    /// From the start of the boot until QEMU was spawned (its vsock backend included).
    spawn: Duration,
    /// From the start of the boot until the agent answered its health check.
    agent_answered: Duration,
    /// The guest kernel's boot until it ran the agent (guest uptime at the agent's start).
    kernel_to_init: Duration,
    /// Guest uptime when the agent answered: the agent's own start-up is the difference.
    guest_uptime: Duration,
}

/// Runs each pod in a VM and its containers through the VM's agent.
pub struct VmRuntime {
    settings: VmmSection,
    /// One directory per VM: QEMU's sockets and logs, and the shared directory.
    vms_dir: PathBuf,
    /// The host's TSC frequency, which every guest is told.
    tsc_khz: u64,
    /// The accelerator `auto` settled on, once probed.
    accelerator: tokio::sync::Mutex<Option<Accelerator>>,
    pods: Mutex<HashMap<String, Arc<Vm>>>,
    /// The VM of each container.
    containers: Mutex<HashMap<String, Arc<Vm>>>,
}

/// A pod's running VM.
struct Vm {
    id: String,
    dir: PathBuf,
    /// The pod's network namespace and the interface the VM took over.
    netns: PathBuf,
    interface: String,
    hypervisor: tokio::sync::Mutex<Qemu>,
    tasks: TaskClient,
    agent: AgentClient,
    stdio: StdioPorts,
    /// Exec ids by the guest pid the agent reported for them.
    execs: Mutex<HashMap<u32, String>>,
    /// Set once QEMU has ended: the guest and every process in it are gone.
    gone: AtomicBool,
}

impl Vm {
    fn share_dir(&self) -> PathBuf {
        share_dir(&self.dir)
    }

    fn staging_dir(&self) -> PathBuf {
        staging_dir(&self.dir)
    }

    fn is_gone(&self) -> bool {
        self.gone.load(Ordering::SeqCst)
    }
}

/// Where the streams a VM's stdio ports copy are recorded.
fn stdio_records(vm_dir: &Path) -> PathBuf {
    vm_dir.join("stdio")
}

fn share_dir(vm_dir: &Path) -> PathBuf {
    vm_dir.join("share")
}

/// Where container directories are put together before they are shared: the guest
/// cannot see it.
fn staging_dir(vm_dir: &Path) -> PathBuf {
    vm_dir.join("staging")
}

fn context() -> ttrpc::context::Context {
    ttrpc::context::with_duration(AGENT_TIMEOUT)
}

/// The agent's error as the Task API reports it, with what was asked.
fn agent_error(what: &str, err: ttrpc::Error) -> Error {
    match err {
        ttrpc::Error::RpcStatus(status) => {
            let message = format!("{what}: {}", status.message());
            match status.code() {
                ttrpc::Code::NOT_FOUND => Error::NotFound(message),
                ttrpc::Code::ALREADY_EXISTS => Error::AlreadyExists(message),
                ttrpc::Code::INVALID_ARGUMENT => Error::InvalidArgument(message),
                ttrpc::Code::FAILED_PRECONDITION => Error::FailedPrecondition(message),
                ttrpc::Code::UNIMPLEMENTED => Error::Unimplemented(message),
                _ => Error::internal(message),
            }
        }
        other => Error::internal(format!("{what}: the guest agent did not answer: {other}")),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl VmRuntime {
    /// VMs as `settings` describe them, their directories under `vms_dir`.
    pub fn new(settings: VmmSection, vms_dir: PathBuf) -> anyhow::Result<Self> {
        settings.validate()?;
        std::fs::create_dir_all(&vms_dir)
            .with_context(|| format!("create {}", vms_dir.display()))?;
        let accelerator = match settings.accelerator {
            Accelerator::Auto => None,
            fixed => Some(fixed),
        };
        Ok(Self {
            settings,
            vms_dir,
            tsc_khz: host_tsc_khz(),
            accelerator: tokio::sync::Mutex::new(accelerator),
            pods: Default::default(),
            containers: Default::default(),
        })
    }

    fn vm_dir(&self, sandbox_id: &str) -> PathBuf {
        let name: String = sandbox_id.chars().take(VM_DIR_NAME_LEN).collect();
        self.vms_dir.join(name)
    }

    fn vm_of(&self, container_id: &str) -> Result<Arc<Vm>> {
        lock(&self.containers)
            .get(container_id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {container_id:?}")))
    }

    fn spec(&self, pod: &PodContext, net: &PodNet, dir: &Path, accelerator: Accelerator) -> VmSpec {
        let settings = &self.settings;
        let mut cmdline = format!(
            "{GUEST_CMDLINE} tsc_early_khz={} {}={}",
            self.tsc_khz,
            vmm_task::SANDBOX_PARAM,
            pod.id
        );
        if !settings.kernel_params.trim().is_empty() {
            cmdline.push(' ');
            cmdline.push_str(settings.kernel_params.trim());
        }
        VmSpec {
            id: pod.id.clone(),
            kernel: settings.kernel.clone(),
            initrd: settings.initrd.clone(),
            cmdline,
            memory_mib: settings.memory_mib,
            vcpus: settings.vcpus,
            accelerator,
            run_dir: dir.to_path_buf(),
            shares: vec![Share {
                tag: vmm_task::SHARE_TAG.into(),
                path: share_dir(dir),
            }],
            vsock: Some(VsockSpec::new(settings.vhost_vsock.clone())),
            network: Some(NetworkSpec {
                netns: net.netns.clone(),
                tap: network::TAP.into(),
                mac: net.network.interface.mac.clone(),
            }),
        }
    }

    /// Boots a VM for `pod` and connects to its agent. A VM that fails is stopped.
    async fn boot(
        &self,
        pod: &PodContext,
        net: &PodNet,
        dir: &Path,
        accelerator: Accelerator,
        timeout: Duration,
    ) -> anyhow::Result<Booted> {
        let began = Instant::now();
        let mut qemu = Qemu::new(
            self.spec(pod, net, dir, accelerator),
            self.settings.hypervisor.clone(),
        );
        qemu.start().await?;
        let spawned = began.elapsed();
        // While the guest boots.
        if let Err(err) = network::connect_tap(&net.netns, &net.network.interface).await {
            if let Err(stop) = qemu.stop(STOP_GRACE).await {
                tracing::warn!(sandbox_id = %pod.id, error = format!("{stop:#}"), "cannot stop a VM whose network failed");
            }
            return Err(err.context("connect the VM to the pod's network"));
        }
        let uds = qemu.vsock_uds().context("the VM has no vsock device")?;
        let serial = qemu.agent_address();
        let connected = Arc::new(Mutex::new(None));
        let slot = connected.clone();
        let probe = Box::pin(async move {
            agent_announced(&serial).await?;
            // The boot's own watch reports a timeout; the probe outlasts it.
            let stream =
                crate::vsock::connect_with_retry(&uds, vmm_task::AGENT_PORT, timeout * 2).await?;
            let client = Client::new(ttrpc::r#async::transport::Socket::from(stream));
            let check = AgentClient::new(client.clone())
                .check(context(), &CheckRequest::new())
                .await
                .context("the agent's health check")?;
            *lock(&slot) = Some((client, check));
            anyhow::Ok(())
        });
        qemu.wait_ready(probe, timeout).await?;
        let answered = began.elapsed();
        let (client, check) = lock(&connected)
            .take()
            .context("the agent connected but no client was kept")?;
        let times = BootTimes {
            spawn: spawned,
            agent_answered: answered,
            kernel_to_init: Duration::from_millis(check.started_at_uptime_ms),
            guest_uptime: Duration::from_millis(check.uptime_ms),
        };
        Ok(Booted {
            qemu,
            client,
            times,
        })
    }

    /// The accelerator for the next VM. `auto` boots the first pod's VM with KVM and, if
    /// that guest does not come up, settles on TCG for this and every later VM.
    async fn boot_resolving_accelerator(
        &self,
        pod: &PodContext,
        net: &PodNet,
        dir: &Path,
    ) -> anyhow::Result<Booted> {
        let timeout = self.settings.boot_timeout();
        let mut resolved = self.accelerator.lock().await;
        if let Some(accelerator) = *resolved {
            drop(resolved);
            return self.boot(pod, net, dir, accelerator, timeout).await;
        }
        match self
            .boot(
                pod,
                net,
                dir,
                Accelerator::Kvm,
                timeout.min(KVM_PROBE_TIMEOUT),
            )
            .await
        {
            Ok(booted) => {
                tracing::info!("accelerator auto: KVM runs guests here");
                *resolved = Some(Accelerator::Kvm);
                Ok(booted)
            }
            Err(err) => {
                tracing::warn!(error = format!("{err:#}"), "accelerator auto: KVM cannot run the guest, falling back to TCG (software emulation, slow)");
                *resolved = Some(Accelerator::Tcg);
                drop(resolved);
                self.boot(pod, net, dir, Accelerator::Tcg, timeout).await
            }
        }
    }

    /// Asks the agent about process `exec_id` (empty: the init) of a container and
    /// watches its exit.
    async fn recover_process(
        vm: &Arc<Vm>,
        container_id: &str,
        exec_id: &str,
    ) -> Result<RecoveredProcess> {
        let request = StateRequest {
            id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        let state = vm
            .tasks
            .state(context(), &request)
            .await
            .map_err(|err| agent_error(&format!("state of container {container_id:?}"), err))?;
        let state_now = match state.status.enum_value_or_default() {
            Status::CREATED => RunState::Created,
            Status::PAUSED | Status::PAUSING => RunState::Paused,
            _ => RunState::Running,
        };
        Ok(RecoveredProcess {
            pid: state.pid,
            state: state_now,
            exit: Self::watch_exit(vm, container_id, exec_id),
        })
    }

    /// Ends the processes of a VM the sandboxer could not take over after a restart:
    /// those its record names and, for a VM whose boot the earlier run never finished,
    /// any process whose command line names the VM's directory (QEMU and its vsock
    /// backend do).
    async fn stop_recorded_vm(&self, id: &str) {
        let dir = self.vm_dir(id);
        let record = kuasar_sandbox::state::read_json::<VmRecord>(&dir.join(VM_RECORD)).ok();
        let mut processes: Vec<ProcessId> = process::naming(&format!("{}/", dir.display()));
        if let Some(record) = &record {
            processes.push(record.qemu);
            processes.extend(record.vsock);
        }
        if processes.is_empty() {
            return;
        }
        for process in &processes {
            process.signal(Signal::SIGKILL);
        }
        for process in &processes {
            if !process.wait_gone(STOP_GRACE).await {
                tracing::warn!(sandbox_id = %id, pid = process.pid, "process of a VM did not exit after SIGKILL");
            }
        }
        if let Some(record) = &record {
            network::disconnect(&record.netns, &record.interface).await;
        }
        tracing::info!(sandbox_id = %id, processes = processes.len(), "VM left by an earlier run ended");
    }

    /// Removes what a VM left in `dir`: mounts first, then the files.
    fn remove_vm_dir(dir: &Path) -> anyhow::Result<()> {
        if !dir.exists() {
            return Ok(());
        }
        crate::share::unmount_below(dir)?;
        crate::share::ensure_unmounted(dir)?;
        std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))
    }

    /// Watches the exit of process `exec_id` (empty: the init) of `container_id`.
    fn watch_exit(vm: &Arc<Vm>, container_id: &str, exec_id: &str) -> ExitReceiver {
        let (sender, receiver) = oneshot::channel();
        let tasks = vm.tasks.clone();
        let request = WaitRequest {
            id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        tokio::spawn(async move {
            let status = match tasks
                .wait(ttrpc::context::Context::default(), &request)
                .await
            {
                Ok(response) => ExitStatus {
                    code: response.exit_status as i32,
                    at: response
                        .exited_at
                        .as_ref()
                        .map(|t| {
                            SystemTime::UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos as u32)
                        })
                        .unwrap_or_else(SystemTime::now),
                },
                Err(err) => {
                    tracing::warn!(container_id = %request.id, exec_id = %request.exec_id, error = %err, "lost the agent while waiting for a process");
                    ExitStatus::now(UNKNOWN_EXIT)
                }
            };
            let _ = sender.send(status);
        });
        receiver
    }
}

/// Forwards the OOM kills the agent reports for container `id` until it is deleted.
fn watch_oom(vm: &Vm, id: &str) -> kuasar_sandbox::oom::OomReceiver {
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let agent = vm.agent.clone();
    let mut request = WaitOomRequest {
        container_id: id.to_string(),
        ..Default::default()
    };
    tokio::spawn(async move {
        // Ends with an error once the container is deleted or the VM is gone.
        while let Ok(response) = agent
            .wait_oom(ttrpc::context::Context::default(), &request)
            .await
        {
            for _ in request.seen..response.kills {
                if sender.send(()).is_err() {
                    return;
                }
            }
            request.seen = response.kills;
        }
    });
    receiver
}

/// Waits until the agent writes its ready line on the VM's virtio-serial port (a unix
/// socket QEMU serves at `serial`).
async fn agent_announced(serial: &Path) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;

    // QEMU creates the socket a moment after it starts.
    let stream = loop {
        match tokio::net::UnixStream::connect(serial).await {
            Ok(stream) => break stream,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let mut lines = tokio::io::BufReader::new(stream).lines();
    while let Some(line) = lines
        .next_line()
        .await
        .with_context(|| format!("read the agent's port {}", serial.display()))?
    {
        if line.trim() == vmm_task::READY_LINE {
            return Ok(());
        }
    }
    anyhow::bail!(
        "the agent's port {} closed before the agent was ready",
        serial.display()
    )
}

/// The container's sandbox id, from the CRI annotation in its spec.
fn sandbox_of(spec: &serde_json::Value, bundle: &Path) -> Result<String> {
    spec.pointer(&format!(
        "/annotations/{}",
        SANDBOX_ID_ANNOTATION.replace('/', "~1")
    ))
    .and_then(serde_json::Value::as_str)
    .map(str::to_string)
    .ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{}/config.json has no {SANDBOX_ID_ANNOTATION} annotation: the container's pod \
             is unknown",
            bundle.display()
        ))
    })
}

/// The host's TSC frequency in kHz, which an emulated guest cannot measure in time.
pub fn host_tsc_khz() -> u64 {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|cpuinfo| {
            cpuinfo
                .lines()
                .find(|line| line.starts_with("cpu MHz"))
                .and_then(|line| line.split(':').nth(1))
                .and_then(|mhz| mhz.trim().parse::<f64>().ok())
        })
        .map(|mhz| (mhz * 1000.0) as u64)
        .unwrap_or(2_000_000)
}

/// Watches the VM's processes: once QEMU ends, the VM is marked gone and the returned
/// receiver (the pod's exit) fires; a helper process (the vsock backend) that ends
/// leaves the VM unreachable, so QEMU is ended with it.
fn watch_vm(vm: &Arc<Vm>, qemu: ProcessId, helper_pids: Vec<u32>) -> anyhow::Result<ExitReceiver> {
    let qemu_pid = qemu.pid;
    let qemu_end = process::watch_end(qemu_pid)?;
    for helper in helper_pids {
        let helper_end = process::watch_end(helper)?;
        let vm = vm.clone();
        tokio::spawn(async move {
            if helper_end.await.is_ok() && !vm.is_gone() {
                tracing::error!(sandbox_id = %vm.id, pid = helper, "a helper process of the VM ended: the VM is stopped");
                qemu.signal(Signal::SIGKILL);
            }
        });
    }
    let (sender, receiver) = oneshot::channel();
    let vm = vm.clone();
    tokio::spawn(async move {
        let status = qemu_end
            .await
            .unwrap_or_else(|_| ExitStatus::now(UNKNOWN_EXIT));
        vm.gone.store(true, Ordering::SeqCst);
        tracing::info!(sandbox_id = %vm.id, pid = qemu_pid, "the VM's hypervisor ended");
        let _ = sender.send(status);
    });
    Ok(receiver)
}

#[async_trait]
impl ContainerRuntime for VmRuntime {
    async fn create(&self, container: &CreateContainer) -> Result<Spawned> {
        let id = &container.id;
        let spec = crate::share::load_spec(&container.bundle)
            .map_err(|err| Error::InvalidArgument(format!("{err:#}")))?;
        let sandbox_id = sandbox_of(&spec, &container.bundle)?;
        let vm = lock(&self.pods).get(&sandbox_id).cloned().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "pod {sandbox_id:?} of container {id:?} has no running VM"
            ))
        })?;
        let share = vm.share_dir();
        let bundle = crate::share::prepare(&share, &vm.staging_dir(), id, spec, &container.rootfs)
            .await
            .map_err(|err| {
                Error::Internal(
                    err.context(format!("share container {id:?} with VM {sandbox_id:?}")),
                )
            })?;
        let created = async {
            let stdio = vm.stdio.bridge(&container.stdio).map_err(Error::Internal)?;
            let request = CreateTaskRequest {
                id: id.clone(),
                bundle: bundle.display().to_string(),
                terminal: stdio.terminal,
                stdin: stdio.stdin,
                stdout: stdio.stdout,
                stderr: stdio.stderr,
                ..Default::default()
            };
            vm.tasks.create(context(), &request).await.map_err(|err| {
                agent_error(
                    &format!("create container {id:?} in VM {sandbox_id:?}"),
                    err,
                )
            })
        }
        .await;
        let response = match created {
            Ok(response) => response,
            Err(err) => {
                if let Err(cleanup) = crate::share::remove(&share, id) {
                    tracing::warn!(container_id = %id, error = format!("{cleanup:#}"), "cannot unshare a container that failed");
                }
                return Err(err);
            }
        };
        lock(&self.containers).insert(id.clone(), vm.clone());
        tracing::info!(%sandbox_id, container_id = %id, guest_pid = response.pid, "container created in the VM");
        Ok(Spawned {
            pid: response.pid,
            exit: Self::watch_exit(&vm, id, ""),
            console: None,
            oom: Some(watch_oom(&vm, id)),
        })
    }

    async fn start(&self, id: &str) -> Result<Option<Console>> {
        let vm = self.vm_of(id)?;
        let request = StartRequest {
            id: id.to_string(),
            ..Default::default()
        };
        vm.tasks
            .start(context(), &request)
            .await
            .map_err(|err| agent_error(&format!("start container {id:?}"), err))?;
        Ok(None)
    }

    async fn exec(&self, process: &ExecProcess) -> Result<Spawned> {
        let id = &process.container_id;
        let vm = self.vm_of(id)?;
        let spec = crate::share::guest_process(&process.spec)
            .map_err(|err| Error::InvalidArgument(format!("{err:#}")))?;
        let stdio = vm.stdio.bridge(&process.stdio).map_err(Error::Internal)?;
        let request = ExecProcessRequest {
            id: id.clone(),
            exec_id: process.exec_id.clone(),
            terminal: stdio.terminal,
            stdin: stdio.stdin,
            stdout: stdio.stdout,
            stderr: stdio.stderr,
            spec: Some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
                value: spec,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let what = format!("exec {:?} in container {id:?}", process.exec_id);
        vm.tasks
            .exec(context(), &request)
            .await
            .map_err(|err| agent_error(&what, err))?;
        let start = StartRequest {
            id: id.clone(),
            exec_id: process.exec_id.clone(),
            ..Default::default()
        };
        let started = vm
            .tasks
            .start(context(), &start)
            .await
            .map_err(|err| agent_error(&what, err))?;
        lock(&vm.execs).insert(started.pid, process.exec_id.clone());
        Ok(Spawned {
            pid: started.pid,
            exit: Self::watch_exit(&vm, id, &process.exec_id),
            console: None,
            oom: None,
        })
    }

    async fn kill(&self, id: &str, target: KillTarget, signal: u32) -> Result<()> {
        let vm = self.vm_of(id)?;
        if vm.is_gone() {
            // Its processes ended with the VM.
            return Err(Error::NotFound(format!(
                "container {id:?}: the VM of its pod is gone"
            )));
        }
        let mut request = KillRequest {
            id: id.to_string(),
            signal,
            ..Default::default()
        };
        match target {
            KillTarget::Init { all } => request.all = all,
            KillTarget::Exec(pid) => {
                request.exec_id = lock(&vm.execs).get(&pid).cloned().ok_or_else(|| {
                    Error::NotFound(format!("exec process {pid} of container {id:?}"))
                })?;
            }
        }
        vm.tasks
            .kill(context(), &request)
            .await
            .map(drop)
            .map_err(|err| agent_error(&format!("signal {signal} to container {id:?}"), err))
    }

    async fn delete(&self, id: &str) -> Result<()> {
        let vm = self.vm_of(id)?;
        let request = DeleteRequest {
            id: id.to_string(),
            ..Default::default()
        };
        let deleted = if vm.is_gone() {
            Ok(Default::default())
        } else {
            vm.tasks.delete(context(), &request).await
        };
        match deleted {
            Ok(_) => {}
            Err(err) => match agent_error(&format!("delete container {id:?}"), err) {
                Error::NotFound(_) => {}
                err => return Err(err),
            },
        }
        crate::share::remove(&vm.share_dir(), id).map_err(Error::Internal)?;
        lock(&self.containers).remove(id);
        Ok(())
    }

    async fn pause(&self, id: &str) -> Result<()> {
        let vm = self.vm_of(id)?;
        let request = PauseRequest {
            id: id.to_string(),
            ..Default::default()
        };
        vm.tasks
            .pause(context(), &request)
            .await
            .map(drop)
            .map_err(|err| agent_error(&format!("pause container {id:?}"), err))
    }

    async fn resume(&self, id: &str) -> Result<()> {
        let vm = self.vm_of(id)?;
        let request = ResumeRequest {
            id: id.to_string(),
            ..Default::default()
        };
        vm.tasks
            .resume(context(), &request)
            .await
            .map(drop)
            .map_err(|err| agent_error(&format!("resume container {id:?}"), err))
    }

    async fn update(&self, id: &str, resources: &[u8]) -> Result<()> {
        let vm = self.vm_of(id)?;
        let request = UpdateTaskRequest {
            id: id.to_string(),
            resources: Some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
                value: resources.to_vec(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        vm.tasks
            .update(context(), &request)
            .await
            .map(drop)
            .map_err(|err| agent_error(&format!("update container {id:?}"), err))
    }

    async fn stats(&self, id: &str) -> Result<Any> {
        let vm = self.vm_of(id)?;
        let request = StatsRequest {
            id: id.to_string(),
            ..Default::default()
        };
        let response = vm
            .tasks
            .stats(context(), &request)
            .await
            .map_err(|err| agent_error(&format!("stats of container {id:?}"), err))?;
        Ok(response.stats.into_option().unwrap_or_default())
    }

    async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let vm = self.vm_of(id)?;
        let request = PidsRequest {
            id: id.to_string(),
            ..Default::default()
        };
        let response = vm
            .tasks
            .pids(context(), &request)
            .await
            .map_err(|err| agent_error(&format!("processes of container {id:?}"), err))?;
        Ok(response.processes.iter().map(|p| p.pid).collect())
    }

    async fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let vm = self.vm_of(id)?;
        let request = ResizePtyRequest {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            width,
            height,
            ..Default::default()
        };
        vm.tasks
            .resize_pty(context(), &request)
            .await
            .map(drop)
            .map_err(|err| agent_error(&format!("resize the terminal of container {id:?}"), err))
    }

    async fn start_pod(&self, pod: &PodContext) -> Result<Option<ExitReceiver>> {
        let missing = self.settings.missing_image_files();
        if !missing.is_empty() {
            return Err(Error::internal(format!(
                "the guest image is incomplete: missing {} (build it with `make guest`)",
                missing.join(", ")
            )));
        }
        let Some(netns) = pod.netns.clone() else {
            return Err(Error::InvalidArgument(format!(
                "pod {:?} asks for the host's network, which a VM cannot share: \
                 run host-network pods with another runtime handler",
                pod.id
            )));
        };
        let network = network::inspect(&netns).await.map_err(|err| {
            Error::Internal(err.context(format!("read the network of pod {:?}", pod.id)))
        })?;
        let net = PodNet { netns, network };
        let dir = self.vm_dir(&pod.id);
        // A directory left by a sandboxer that died belongs to no running VM now.
        Self::remove_vm_dir(&dir).map_err(Error::Internal)?;
        std::fs::create_dir_all(share_dir(&dir))
            .with_context(|| format!("create {}", dir.display()))?;

        let began = Instant::now();
        let Booted {
            qemu,
            client,
            times,
        } = self
            .boot_resolving_accelerator(pod, &net, &dir)
            .await
            .map_err(|err| {
                Error::Internal(err.context(format!("boot the VM of pod {:?}", pod.id)))
            })?;
        let (spec, qemu_id, vsock_id) = qemu.record()?;
        let pid = qemu_id.pid;
        let helper_pids = qemu.helper_pids();
        let uds = qemu.vsock_uds().context("the VM has no vsock device")?;
        let record = VmRecord {
            spec,
            qemu: qemu_id,
            vsock: vsock_id,
            netns: net.netns.clone(),
            interface: net.network.interface.name.clone(),
        };
        let vm = Arc::new(Vm {
            id: pod.id.clone(),
            dir: dir.clone(),
            netns: net.netns.clone(),
            interface: net.network.interface.name.clone(),
            hypervisor: tokio::sync::Mutex::new(qemu),
            tasks: TaskClient::new(client.clone()),
            agent: AgentClient::new(client.clone()),
            stdio: StdioPorts::new(uds, stdio_records(&dir), pod.fifo_keeper.clone())?,
            execs: Default::default(),
            gone: AtomicBool::new(false),
        });
        lock(&self.pods).insert(pod.id.clone(), vm.clone());
        kuasar_sandbox::state::write_json(&dir.join(VM_RECORD), &record).map_err(|err| {
            Error::Internal(err.context(format!("record the VM of pod {:?}", pod.id)))
        })?;

        let agent = AgentClient::new(client);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let clock = SyncClockRequest {
            host_time_ns: now.as_nanos() as i64,
            ..Default::default()
        };
        agent
            .sync_clock(context(), &clock)
            .await
            .map_err(|err| agent_error("set the guest clock", err))?;
        let interface = &net.network.interface;
        let setup = SetupSandboxRequest {
            sandbox_id: pod.id.clone(),
            hostname: pod.hostname.clone(),
            interfaces: vec![Interface {
                mac: interface.mac.clone(),
                addresses: interface.addresses.clone(),
                mtu: interface.mtu,
                ..Default::default()
            }],
            routes: net
                .network
                .routes
                .iter()
                .map(|route| Route {
                    destination: route.destination.clone(),
                    gateway: route.gateway.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        agent
            .setup_sandbox(context(), &setup)
            .await
            .map_err(|err| agent_error("set up the guest", err))?;
        let total = began.elapsed();
        tracing::info!(
            sandbox_id = %pod.id,
            pid,
            start_ms = total.as_millis() as u64,
            qemu_spawn_ms = times.spawn.as_millis() as u64,
            agent_answered_ms = times.agent_answered.as_millis() as u64,
            kernel_to_agent_ms = times.kernel_to_init.as_millis() as u64,
            guest_uptime_ms = times.guest_uptime.as_millis() as u64,
            "VM running, agent answering"
        );
        watch_vm(&vm, qemu_id, helper_pids)
            .map(Some)
            .map_err(Error::Internal)
    }

    fn recoverable(&self) -> bool {
        true
    }

    async fn recover_pod(&self, pod: &PodContext) -> Result<Option<ExitReceiver>> {
        let dir = self.vm_dir(&pod.id);
        let record: VmRecord =
            kuasar_sandbox::state::read_json(&dir.join(VM_RECORD)).map_err(Error::Internal)?;
        let qemu = Qemu::adopt(
            record.spec,
            self.settings.hypervisor.clone(),
            record.qemu,
            record.vsock,
        )
        .map_err(Error::Internal)?;
        let uds = qemu.vsock_uds().context("the VM has no vsock device")?;
        let stream =
            crate::vsock::connect_with_retry(&uds, vmm_task::AGENT_PORT, AGENT_RECONNECT_TIMEOUT)
                .await
                .map_err(|err| {
                    Error::Internal(err.context(format!("reach the agent of pod {:?}", pod.id)))
                })?;
        let client = Client::new(ttrpc::r#async::transport::Socket::from(stream));
        let agent = AgentClient::new(client.clone());
        let check = agent
            .check(context(), &CheckRequest::new())
            .await
            .map_err(|err| agent_error("the agent's health check", err))?;
        let helper_pids = qemu.helper_pids();
        let vm = Arc::new(Vm {
            id: pod.id.clone(),
            dir: dir.clone(),
            netns: record.netns,
            interface: record.interface,
            hypervisor: tokio::sync::Mutex::new(qemu),
            tasks: TaskClient::new(client),
            agent,
            stdio: StdioPorts::recover(uds, stdio_records(&dir), pod.fifo_keeper.clone())
                .map_err(Error::Internal)?,
            execs: Default::default(),
            gone: AtomicBool::new(false),
        });
        lock(&self.pods).insert(pod.id.clone(), vm.clone());
        tracing::info!(sandbox_id = %pod.id, pid = record.qemu.pid, guest_uptime_ms = check.uptime_ms, "VM taken over");
        watch_vm(&vm, record.qemu, helper_pids)
            .map(Some)
            .map_err(Error::Internal)
    }

    async fn recover_container(&self, container: &RecoverContainer) -> Result<RecoveredContainer> {
        let id = &container.id;
        let spec = crate::share::load_spec(&container.bundle)
            .map_err(|err| Error::InvalidArgument(format!("{err:#}")))?;
        let sandbox_id = sandbox_of(&spec, &container.bundle)?;
        let vm = lock(&self.pods).get(&sandbox_id).cloned().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "pod {sandbox_id:?} of container {id:?} has no running VM"
            ))
        })?;
        let init = Self::recover_process(&vm, id, "").await?;
        let mut execs = Vec::new();
        for exec_id in &container.execs {
            match Self::recover_process(&vm, id, exec_id).await {
                Ok(process) => {
                    lock(&vm.execs).insert(process.pid, exec_id.clone());
                    execs.push((exec_id.clone(), process));
                }
                Err(err) => {
                    tracing::warn!(container_id = %id, %exec_id, error = %err, "exec process not recovered")
                }
            }
        }
        lock(&self.containers).insert(id.clone(), vm.clone());
        Ok(RecoveredContainer {
            init,
            execs,
            oom: Some(watch_oom(&vm, id)),
        })
    }

    async fn stop_pod(&self, id: &str) -> Result<()> {
        let vm = lock(&self.pods).remove(id);
        if vm.is_none() {
            self.stop_recorded_vm(id).await;
        }
        if let Some(vm) = &vm {
            lock(&self.containers).retain(|_, v| !Arc::ptr_eq(v, vm));
            vm.hypervisor
                .lock()
                .await
                .stop(STOP_GRACE)
                .await
                .map_err(|err| {
                    Error::Internal(err.context(format!("stop the VM of pod {id:?}")))
                })?;
            network::disconnect(&vm.netns, &vm.interface).await;
            tracing::info!(sandbox_id = %vm.id, "VM stopped");
        }
        Self::remove_vm_dir(&self.vm_dir(id)).map_err(Error::Internal)
    }
}
