//! One isolated containerd 2.1.9 (and optionally the runc, wasm and quark sandboxers) per test.
//!
//! Every [`Harness`] owns a run directory `/tmp/kuasar-t/<id>` holding containerd's root, state,
//! sockets, configuration and logs, the sandboxer's socket and state, the CNI configuration and
//! the test images. `<id>` (1..=250) also names the CNI bridge `kuasar-t<id>`, its subnet
//! `10.231.<id>.0/24` and the pods' cgroup parent `/kuasar-test-<id>`, so harnesses of parallel
//! tests and of other test processes never share anything. A run whose process died is
//! recognised by its `owner` file and removed by the next harness that starts.

use std::fs;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, LinuxContainerConfig, LinuxPodSandboxConfig,
    PodSandboxConfig, PodSandboxMetadata,
};

use crate::cleanup;
use crate::config;
use crate::cri::{self, CriClient};
use crate::images;

/// Directory holding the run directories of all harnesses.
pub const BASE_DIR: &str = "/tmp/kuasar-t";

/// CRI runtime handler of containerd's own runc shim (`io.containerd.runc.v2`).
pub const RUNC_HANDLER: &str = "runc";

/// CRI runtime handler served by the runc sandboxer.
pub const KUASAR_RUNC_HANDLER: &str = "kuasar-runc";

/// Name of the sandboxer's proxy plugin in containerd's configuration.
pub const SANDBOXER_NAME: &str = "runc";

/// Environment variable naming the sandboxer binary to run.
pub const SANDBOXER_ENV: &str = "KUASAR_RUNC_SANDBOXER";

/// CRI runtime handler served by the wasm sandboxer.
pub const KUASAR_WASM_HANDLER: &str = "kuasar-wasm";

/// Name of the wasm sandboxer's proxy plugin in containerd's configuration.
pub const WASM_SANDBOXER_NAME: &str = "wasm";

/// Environment variable naming the wasm sandboxer binary to run.
pub const WASM_SANDBOXER_ENV: &str = "KUASAR_WASM_SANDBOXER";

/// CRI runtime handler served by the quark sandboxer (gVisor's runsc).
pub const KUASAR_QUARK_HANDLER: &str = "kuasar-quark";

/// Name of the quark sandboxer's proxy plugin in containerd's configuration.
pub const QUARK_SANDBOXER_NAME: &str = "quark";

/// Environment variable naming the quark sandboxer binary to run.
pub const QUARK_SANDBOXER_ENV: &str = "KUASAR_QUARK_SANDBOXER";

/// CRI runtime handler served by the vmm sandboxer (a QEMU microVM per pod).
pub const KUASAR_VMM_HANDLER: &str = "kuasar-vmm";

/// Name of the vmm sandboxer's proxy plugin in containerd's configuration.
pub const VMM_SANDBOXER_NAME: &str = "vmm";

/// Environment variable naming the vmm sandboxer binary to run.
pub const VMM_SANDBOXER_ENV: &str = "KUASAR_VMM_SANDBOXER";

/// Environment variable naming the directory of the guest image (`vmlinux`,
/// `initramfs.cpio`); `.cache/guest` of the workspace by default.
pub const GUEST_DIR_ENV: &str = "KUASAR_GUEST_DIR";

/// CRI runtime handler of containerd's own runc shim with runsc as its runtime binary (the
/// way gVisor runs without its own shim): the quark family's baseline.
pub const RUNSC_HANDLER: &str = "runsc";

/// Environment variable naming the runsc binary the quark sandboxer is given.
pub const RUNSC_ENV: &str = "KUASAR_RUNSC";

/// Environment variable naming the directory of the containerd binaries.
pub const CONTAINERD_DIR_ENV: &str = "KUASAR_CONTAINERD_DIR";

/// Namespace of the test pods.
pub const POD_NAMESPACE: &str = "kuasar-test";

const MAX_RUN_ID: u32 = 250;
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const TEARDOWN_CRI_TIMEOUT: Duration = Duration::from_secs(90);
const LOG_TAIL_LINES: usize = 60;
/// How long [`Harness::leftovers`] gives pods' shims, the last of a run's processes, to go.
const SHIM_EXIT_GRACE: Duration = Duration::from_secs(3);
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Serialises the choice of run ids and the removal of stale runs within this process.
static ALLOCATION: Mutex<()> = Mutex::new(());
static HARNESS_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Where everything of one run lives. Paths are absolute; socket paths stay short.
#[derive(Debug, Clone)]
pub struct Layout {
    pub id: u32,
    pub run_dir: PathBuf,
    pub containerd_root: PathBuf,
    pub containerd_state: PathBuf,
    pub containerd_temp: PathBuf,
    pub containerd_opt: PathBuf,
    pub containerd_socket: PathBuf,
    pub containerd_ttrpc_socket: PathBuf,
    pub containerd_config: PathBuf,
    pub containerd_log: PathBuf,
    pub registry_dir: PathBuf,
    pub runc_root: PathBuf,
    /// runsc's state for [`RUNSC_HANDLER`] pods.
    pub runsc_v2_root: PathBuf,
    /// The runtime binary [`RUNSC_HANDLER`] runs: runsc with the harness's global flags.
    pub runsc_v2_binary: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub ipam_dir: PathBuf,
    pub sandboxer_socket: PathBuf,
    pub sandboxer_state: PathBuf,
    pub sandboxer_config: PathBuf,
    pub sandboxer_log: PathBuf,
    pub wasm_socket: PathBuf,
    pub wasm_state: PathBuf,
    pub wasm_config: PathBuf,
    pub wasm_log: PathBuf,
    pub quark_socket: PathBuf,
    pub quark_state: PathBuf,
    pub quark_config: PathBuf,
    pub quark_log: PathBuf,
    pub vmm_socket: PathBuf,
    pub vmm_state: PathBuf,
    pub vmm_config: PathBuf,
    pub vmm_log: PathBuf,
    pub pod_log_dir: PathBuf,
    pub images_dir: PathBuf,
    pub owner_file: PathBuf,
    pub bridge: String,
    pub network_name: String,
    pub subnet: String,
    pub cgroup_parent: String,
}

impl Layout {
    /// The layout of run `id` in `run_dir`.
    pub fn new(run_dir: &Path, id: u32) -> Self {
        let at = |name: &str| run_dir.join(name);
        Self {
            id,
            run_dir: run_dir.to_path_buf(),
            containerd_root: at("root"),
            containerd_state: at("state"),
            containerd_temp: at("tmp"),
            containerd_opt: at("opt"),
            containerd_socket: at("containerd.sock"),
            containerd_ttrpc_socket: at("containerd.sock.ttrpc"),
            containerd_config: at("containerd.toml"),
            containerd_log: at("containerd.log"),
            registry_dir: at("certs.d"),
            runc_root: at("runc"),
            runsc_v2_root: at("runsc-v2"),
            runsc_v2_binary: at("runsc-v2.sh"),
            cni_conf_dir: at("cni/net.d"),
            ipam_dir: at("cni/ipam"),
            sandboxer_socket: at("runc-sandboxer.sock"),
            sandboxer_state: at("runc-sandboxer"),
            sandboxer_config: at("runc-sandboxer.toml"),
            sandboxer_log: at("runc-sandboxer.log"),
            wasm_socket: at("wasm-sandboxer.sock"),
            wasm_state: at("wasm-sandboxer"),
            wasm_config: at("wasm-sandboxer.toml"),
            wasm_log: at("wasm-sandboxer.log"),
            quark_socket: at("quark-sandboxer.sock"),
            quark_state: at("quark-sandboxer"),
            quark_config: at("quark-sandboxer.toml"),
            quark_log: at("quark-sandboxer.log"),
            vmm_socket: at("vmm-sandboxer.sock"),
            vmm_state: at("vmm-sandboxer"),
            vmm_config: at("vmm-sandboxer.toml"),
            vmm_log: at("vmm-sandboxer.log"),
            pod_log_dir: at("pods"),
            images_dir: at("images"),
            owner_file: at("owner"),
            bridge: format!("kuasar-t{id}"),
            network_name: format!("kuasar-t{id}"),
            subnet: format!("10.231.{id}.0/24"),
            cgroup_parent: format!("/kuasar-test-{id}"),
        }
    }

    /// CRI's state directory inside containerd's state.
    pub fn cri_state_dir(&self) -> PathBuf {
        self.containerd_state.join("io.containerd.grpc.v1.cri")
    }

    /// Where CRI mounts the pods' network namespaces.
    pub fn netns_dir(&self) -> PathBuf {
        self.cri_state_dir().join("netns")
    }

    /// runsc's state of the quark sandboxer's sandboxes: `--root` is left at its default
    /// inside the sandboxer's state directory.
    pub fn quark_runsc_root(&self) -> PathBuf {
        self.quark_state.join("runsc")
    }

    /// Task bundles containerd keeps for the containers of namespace `k8s.io`.
    pub fn task_bundle_dir(&self) -> PathBuf {
        self.containerd_state
            .join("io.containerd.runtime.v2.task")
            .join("k8s.io")
    }
}

/// Environment variables (name, value) of a daemon, from the run's layout.
pub type EnvOf = fn(&Layout) -> Vec<(String, String)>;

/// What a harness starts besides containerd.
#[derive(Debug, Clone, Default)]
pub struct HarnessOptions {
    /// Start the runc sandboxer and let containerd reach it through the proxy plugin. Without
    /// it only the [`RUNC_HANDLER`] baseline works.
    pub sandboxer: bool,
    /// Start the wasm sandboxer too: pods can run on [`KUASAR_WASM_HANDLER`]. Implies
    /// `wasm_image`.
    pub wasm_sandboxer: bool,
    /// Import [`images::WASM_IMAGE`], with or without the wasm sandboxer.
    pub wasm_image: bool,
    /// The wasm sandboxer binary to run instead of the one [`wasm_sandboxer_binary`] finds.
    pub wasm_sandboxer_binary: Option<PathBuf>,
    /// Start the quark sandboxer too: pods can run on [`KUASAR_QUARK_HANDLER`].
    pub quark_sandboxer: bool,
    /// The `[quark]` settings to give the quark sandboxer instead of
    /// [`QuarkSettings::for_host`]'s.
    pub quark_sandboxer_config: Option<QuarkSettings>,
    /// Start the vmm sandboxer too: pods can run on [`KUASAR_VMM_HANDLER`].
    pub vmm_sandboxer: bool,
    /// Further `[vmm]` settings (TOML lines) for the vmm sandboxer; later keys win over
    /// the harness's own.
    pub vmm_settings: Option<String>,
    /// The containerd configuration to write instead of [`config::containerd_config`]'s.
    pub containerd_config: Option<fn(&Layout) -> String>,
    /// The directory of the containerd and ctr binaries to run instead of
    /// [`containerd_bin_dir`]'s.
    pub containerd_bin_dir: Option<PathBuf>,
    /// Further environment variables of containerd, from the run's layout.
    pub containerd_env: Option<EnvOf>,
    /// Directories searched before the containerd binaries' on containerd's `PATH` (where
    /// it finds shim binaries).
    pub containerd_path: Vec<PathBuf>,
}

/// The quark sandboxer's own settings, its `[quark]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarkSettings {
    /// The runsc binary.
    pub runsc: PathBuf,
    /// runsc's `--platform`.
    pub platform: String,
    /// Whose network stack serves the pods' network namespaces: `sandbox` (gVisor's own) or
    /// `host` (the host kernel's, inside the pod's network namespace).
    pub network: String,
    /// Further runsc global flags.
    pub flags: Vec<String>,
}

impl QuarkSettings {
    /// The runsc that [`runsc_binary`] finds, as [`QuarkSettings::with_runsc`] runs it.
    pub fn for_host() -> Result<Self> {
        Ok(Self::with_runsc(runsc_binary()?))
    }

    /// Runs `runsc` on the `systrap` platform and the `host` network stack, with no further
    /// flags. runsc 20240729 cannot use its own stack on Linux 6.11 and later: it takes every
    /// network namespace for the host's ("cannot run with network enabled in root network
    /// namespace").
    pub fn with_runsc(runsc: PathBuf) -> Self {
        Self {
            runsc,
            platform: "systrap".to_string(),
            network: "host".to_string(),
            flags: Vec::new(),
        }
    }
}

/// A pod the harness ran: its id and the configuration it was run with.
#[derive(Debug, Clone)]
pub struct Pod {
    pub id: String,
    pub config: PodSandboxConfig,
}

/// Everything of a run still present on the host.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Leftovers {
    pub processes: Vec<String>,
    pub mounts: Vec<PathBuf>,
    pub netns: Vec<PathBuf>,
    pub cgroups: Vec<PathBuf>,
    pub task_bundles: Vec<PathBuf>,
    pub runc_state: Vec<PathBuf>,
    pub runsc_state: Vec<PathBuf>,
    pub sandboxer_state: Vec<PathBuf>,
    pub cni: Vec<PathBuf>,
    pub bridge: Option<String>,
}

impl Leftovers {
    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

impl std::fmt::Display for Leftovers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_empty() {
            return write!(f, "no leftovers");
        }
        let paths = |v: &[PathBuf]| {
            v.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
        };
        let groups = [
            ("processes", self.processes.clone()),
            ("mounts", paths(&self.mounts)),
            ("network namespaces", paths(&self.netns)),
            ("cgroups", paths(&self.cgroups)),
            ("task bundles", paths(&self.task_bundles)),
            ("runc state", paths(&self.runc_state)),
            ("runsc state", paths(&self.runsc_state)),
            ("sandboxer state", paths(&self.sandboxer_state)),
            ("CNI state", paths(&self.cni)),
            ("bridge", self.bridge.iter().cloned().collect()),
        ];
        for (what, items) in groups.iter().filter(|(_, items)| !items.is_empty()) {
            writeln!(f, "{what}:")?;
            for item in items {
                writeln!(f, "  {item}")?;
            }
        }
        Ok(())
    }
}

/// A running containerd (and sandboxer) with everything under one run directory; tears itself
/// down when dropped.
pub struct Harness {
    layout: Layout,
    containerd: Option<Daemon>,
    sandboxer: Option<Daemon>,
    wasm_sandboxer: Option<Daemon>,
    quark_sandboxer: Option<Daemon>,
    vmm_sandboxer: Option<Daemon>,
    cri: Option<CriClient>,
    /// containerd's own client, of the containerd this harness runs.
    ctr: PathBuf,
    pods: AtomicU32,
    torn_down: bool,
}

impl Harness {
    /// Starts containerd with only the [`RUNC_HANDLER`] baseline usable.
    pub async fn start() -> Result<Self> {
        Self::start_with(HarnessOptions::default()).await
    }

    /// Starts the sandboxer and containerd: pods can run on [`KUASAR_RUNC_HANDLER`] too.
    pub async fn start_with_sandboxer() -> Result<Self> {
        Self::start_with(HarnessOptions {
            sandboxer: true,
            ..Default::default()
        })
        .await
    }

    /// Starts the wasm sandboxer and containerd: pods can run on [`KUASAR_WASM_HANDLER`].
    pub async fn start_with_wasm_sandboxer() -> Result<Self> {
        Self::start_with(HarnessOptions {
            wasm_sandboxer: true,
            ..Default::default()
        })
        .await
    }

    /// Starts the quark sandboxer and containerd: pods can run on [`KUASAR_QUARK_HANDLER`].
    pub async fn start_with_quark_sandboxer() -> Result<Self> {
        Self::start_with(HarnessOptions {
            quark_sandboxer: true,
            ..Default::default()
        })
        .await
    }

    /// Starts the vmm sandboxer and containerd: pods can run on [`KUASAR_VMM_HANDLER`].
    pub async fn start_with_vmm_sandboxer() -> Result<Self> {
        Self::start_with(HarnessOptions {
            vmm_sandboxer: true,
            ..Default::default()
        })
        .await
    }

    /// Starts what `options` asks for and waits until CRI reports runtime and network ready.
    pub async fn start_with(options: HarnessOptions) -> Result<Self> {
        // `KUASAR_SHIM_MODE` sends the families' handlers through their shims.
        let (options, shim_mode) = crate::shim::options_from_env(options)?;
        let layout = allocate_run()?;
        let mut harness = Self {
            layout,
            containerd: None,
            sandboxer: None,
            wasm_sandboxer: None,
            quark_sandboxer: None,
            vmm_sandboxer: None,
            cri: None,
            ctr: PathBuf::new(),
            pods: AtomicU32::new(0),
            torn_down: false,
        };
        if let Err(e) = harness.boot(&options).await {
            harness.print_log_tails();
            return Err(e.context(format!(
                "cannot start the test harness in {}",
                harness.layout.run_dir.display()
            )));
        }
        if shim_mode {
            crate::shim::write_shim_configs(&harness.layout)?;
        }
        Ok(harness)
    }

    /// Runs `body` against the harness, prints the daemons' log tails when it fails, then tears
    /// the harness down and checks that nothing of the run is left on the host.
    pub async fn run<T>(self, body: impl AsyncFnOnce(&Harness) -> Result<T>) -> Result<T> {
        self.run_mut(async |h: &mut Harness| body(h).await).await
    }

    /// [`Harness::run`] for a body that changes the harness (restarts a daemon, say).
    pub async fn run_mut<T>(
        mut self,
        body: impl AsyncFnOnce(&mut Harness) -> Result<T>,
    ) -> Result<T> {
        // On the heap: the futures of long test bodies are too large for a test thread's
        // stack.
        let result = Box::pin(body(&mut self)).await;
        if let Err(e) = &result {
            eprintln!("test failed: {e:#}");
            self.print_log_tails();
        }
        let layout = self.layout.clone();
        let teardown = self.teardown_inner();
        let value = result?;
        teardown?;
        let left = leftovers_of(&layout, &[])?;
        ensure!(left.is_empty(), "the run left on the host:\n{left}");
        Ok(value)
    }

    /// The CRI client connected to this harness's containerd.
    pub fn cri(&self) -> &CriClient {
        self.cri
            .as_ref()
            .expect("a started harness has a CRI client")
    }

    /// Paths and names of this run.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The cgroup parent (cgroupfs path) that [`Harness::pod_config`] gives the pods.
    pub fn cgroup_parent(&self) -> &str {
        &self.layout.cgroup_parent
    }

    /// PID of containerd.
    pub fn containerd_pid(&self) -> Option<u32> {
        self.containerd.as_ref().map(Daemon::pid)
    }

    /// PID of the sandboxer, when the harness runs one.
    pub fn sandboxer_pid(&self) -> Option<u32> {
        self.sandboxer.as_ref().map(Daemon::pid)
    }

    /// PID of the wasm sandboxer, when the harness runs one.
    pub fn wasm_sandboxer_pid(&self) -> Option<u32> {
        self.wasm_sandboxer.as_ref().map(Daemon::pid)
    }

    /// PID of the quark sandboxer, when the harness runs one.
    pub fn quark_sandboxer_pid(&self) -> Option<u32> {
        self.quark_sandboxer.as_ref().map(Daemon::pid)
    }

    /// PID of the vmm sandboxer, when the harness runs one.
    pub fn vmm_sandboxer_pid(&self) -> Option<u32> {
        self.vmm_sandboxer.as_ref().map(Daemon::pid)
    }

    /// A pod configuration with a unique uid, hostname `name`, a log directory in the run
    /// directory (created here) and the run's cgroup parent.
    pub fn pod_config(&self, name: &str) -> Result<PodSandboxConfig> {
        let serial = self.pods.fetch_add(1, Ordering::Relaxed);
        let uid = format!("{name}-{}-{serial}", self.layout.id);
        let log_directory = self
            .layout
            .pod_log_dir
            .join(format!("{POD_NAMESPACE}_{name}_{uid}"));
        fs::create_dir_all(&log_directory)
            .with_context(|| format!("cannot create {}", log_directory.display()))?;

        Ok(PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_string(),
                uid,
                namespace: POD_NAMESPACE.to_string(),
                attempt: 0,
            }),
            hostname: name.to_string(),
            log_directory: log_directory.to_string_lossy().into_owned(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: self.layout.cgroup_parent.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// A container configuration running `command` in `image`, logging to `<name>.log` in the
    /// pod's log directory.
    pub fn container_config(&self, name: &str, image: &str, command: &[&str]) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.to_string(),
                attempt: 0,
            }),
            image: Some(cri::image_spec(image)),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            linux: Some(LinuxContainerConfig::default()),
            ..Default::default()
        }
    }

    /// Runs pod `name` (configured by [`Harness::pod_config`]) on `runtime_handler`.
    pub async fn run_pod(&self, name: &str, runtime_handler: &str) -> Result<Pod> {
        let config = self.pod_config(name)?;
        let id = self.cri().run_pod(&config, runtime_handler).await?;
        Ok(Pod { id, config })
    }

    /// Creates and starts container `config` in `pod`; returns its id.
    pub async fn start_container(&self, pod: &Pod, config: &ContainerConfig) -> Result<String> {
        let id = self
            .cri()
            .create_container(&pod.id, config, &pod.config)
            .await?;
        self.cri().start_container(&id).await?;
        Ok(id)
    }

    /// Runs `ctr` against this harness's containerd in CRI's namespace; what it printed.
    pub async fn ctr(&self, args: &[&str]) -> Result<String> {
        let output = tokio::process::Command::new(&self.ctr)
            .arg("--address")
            .arg(&self.layout.containerd_socket)
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .await
            .with_context(|| format!("run {}", self.ctr.display()))?;
        ensure!(
            output.status.success(),
            "ctr {}: {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The plain text container `config` of `pod` has logged so far.
    pub fn container_log(&self, pod: &Pod, config: &ContainerConfig) -> Result<String> {
        cri::read_container_log(&cri::container_log_file(&pod.config, config))
    }

    /// Stops and removes `pod` through CRI, then checks that CRI knows no pod or container
    /// any more and that nothing of any pod is left on the host.
    pub async fn remove_pod_and_check(&self, pod: &Pod) -> Result<()> {
        self.cri().stop_pod(&pod.id).await?;
        self.cri().remove_pod(&pod.id).await?;
        anyhow::ensure!(
            self.cri().list_pods().await?.is_empty(),
            "pods remain after removal"
        );
        anyhow::ensure!(
            self.cri().list_containers(None).await?.is_empty(),
            "containers remain after removal"
        );
        let left = self.leftovers()?;
        anyhow::ensure!(left.is_empty(), "after removing the pod:\n{left}");
        Ok(())
    }

    /// What of this run's pods is still on the host: processes other than containerd and the
    /// sandboxer, mounts, network namespaces, cgroups and runtime state. Empty once every pod
    /// is removed. The CNI bridge belongs to the harness and is not counted here.
    pub fn leftovers(&self) -> Result<Leftovers> {
        let daemons: Vec<u32> = self
            .containerd_pid()
            .into_iter()
            .chain(self.sandboxer_pid())
            .chain(self.wasm_sandboxer_pid())
            .chain(self.quark_sandboxer_pid())
            .chain(self.vmm_sandboxer_pid())
            .collect();
        let mut left = leftovers_of(&self.layout, &daemons)?;
        // A pod's shim (ours, or containerd's runc shim of the baseline) leaves just after
        // containerd removed the pod (an exiting process has no command line any more).
        let leaving = |p: &String| {
            crate::shim::is_shim(p)
                || p.contains("containerd-shim-runc-v2")
                || !p.trim().contains(' ')
        };
        let deadline = Instant::now() + SHIM_EXIT_GRACE;
        while !left.processes.is_empty()
            && left.processes.iter().all(leaving)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
            left = leftovers_of(&self.layout, &daemons)?;
        }
        left.bridge = None;
        Ok(left)
    }

    /// Waits up to `timeout` for [`Harness::leftovers`] to come out empty: a sandboxer may
    /// finish cleaning up just after it answered. Fails with what is still there.
    pub async fn wait_for_no_leftovers(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.leftovers()?;
            if left.is_empty() {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "{timeout:?} later:\n{left}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Prints the last lines of the containerd and sandboxer logs to stderr.
    pub fn print_log_tails(&self) {
        for (name, path) in [
            ("containerd", &self.layout.containerd_log),
            ("runc-sandboxer", &self.layout.sandboxer_log),
            ("wasm-sandboxer", &self.layout.wasm_log),
            ("quark-sandboxer", &self.layout.quark_log),
            ("vmm-sandboxer", &self.layout.vmm_log),
        ] {
            if let Ok(tail) = log_tail(path, LOG_TAIL_LINES) {
                eprintln!(
                    "----- last lines of {name} log {} -----\n{tail}",
                    path.display()
                );
            }
        }
    }

    /// Removes all pods, stops the daemons and removes everything of the run from the host.
    pub fn teardown(mut self) -> Result<()> {
        self.teardown_inner()
    }

    async fn boot(&mut self, options: &HarnessOptions) -> Result<()> {
        let layout = self.layout.clone();
        for dir in [
            &layout.containerd_root,
            &layout.containerd_state,
            &layout.containerd_temp,
            &layout.containerd_opt,
            &layout.registry_dir,
            &layout.runc_root,
            &layout.runsc_v2_root,
            &layout.cni_conf_dir,
            &layout.ipam_dir,
            &layout.sandboxer_state,
            &layout.wasm_state,
            &layout.quark_state,
            &layout.vmm_state,
            &layout.pod_log_dir,
            &layout.images_dir,
        ] {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let containerd_config = options
            .containerd_config
            .unwrap_or(config::containerd_config);
        write_file(&layout.containerd_config, &containerd_config(&layout))?;
        if let Ok(settings) = QuarkSettings::for_host() {
            write_file(&layout.runsc_v2_binary, &config::runsc_wrapper(&settings))?;
            fs::set_permissions(
                &layout.runsc_v2_binary,
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
            .with_context(|| {
                format!(
                    "cannot make {} executable",
                    layout.runsc_v2_binary.display()
                )
            })?;
        }
        write_file(
            &layout.cni_conf_dir.join("10-kuasar-test.conflist"),
            &config::cni_conflist(&layout),
        )?;

        let busybox_tar = layout.images_dir.join("busybox.tar");
        let pause_tar = layout.images_dir.join("pause.tar");
        images::write_busybox_layout(&busybox_tar)?;
        images::write_pause_layout(&pause_tar)?;
        let wasm_tar = layout.images_dir.join("wasm.tar");
        let wasm_image = options.wasm_image || options.wasm_sandboxer;
        if wasm_image {
            images::write_wasm_layout(&wasm_tar)?;
        }

        let bin_dir = match &options.containerd_bin_dir {
            Some(dir) => dir.clone(),
            None => containerd_bin_dir()?,
        };
        let path_env = format!("{}:{SYSTEM_PATH}", bin_dir.display());

        if options.sandboxer {
            write_file(&layout.sandboxer_config, &config::sandboxer_config(&layout))?;
            let binary = sandboxer_binary()?;
            let mut command = Command::new(&binary);
            command.arg("--config").arg(&layout.sandboxer_config);
            let daemon =
                Daemon::spawn("runc-sandboxer", command, &layout.sandboxer_log, &path_env)?;
            self.sandboxer = Some(daemon);
        }

        if options.wasm_sandboxer {
            write_file(&layout.wasm_config, &config::wasm_sandboxer_config(&layout))?;
            let binary = match &options.wasm_sandboxer_binary {
                Some(binary) => {
                    ensure!(
                        binary.is_file(),
                        "wasm-sandboxer binary {} is not a file",
                        binary.display()
                    );
                    binary.clone()
                }
                None => wasm_sandboxer_binary()?,
            };
            let mut command = Command::new(&binary);
            command.arg("--config").arg(&layout.wasm_config);
            let daemon = Daemon::spawn("wasm-sandboxer", command, &layout.wasm_log, &path_env)?;
            self.wasm_sandboxer = Some(daemon);
        }

        if options.quark_sandboxer {
            let settings = match &options.quark_sandboxer_config {
                Some(settings) => settings.clone(),
                None => QuarkSettings::for_host()?,
            };
            write_file(
                &layout.quark_config,
                &config::quark_sandboxer_config(&layout, &settings),
            )?;
            let mut command = Command::new(quark_sandboxer_binary()?);
            command.arg("--config").arg(&layout.quark_config);
            let daemon = Daemon::spawn("quark-sandboxer", command, &layout.quark_log, &path_env)?;
            self.quark_sandboxer = Some(daemon);
        }

        if options.vmm_sandboxer {
            write_file(
                &layout.vmm_config,
                &config::vmm_sandboxer_config(
                    &layout,
                    &guest_dir()?,
                    &vhost_vsock_binary()?,
                    options.vmm_settings.as_deref().unwrap_or_default(),
                ),
            )?;
            let mut command = Command::new(vmm_sandboxer_binary()?);
            command.arg("--config").arg(&layout.vmm_config);
            let daemon = Daemon::spawn("vmm-sandboxer", command, &layout.vmm_log, &path_env)?;
            self.vmm_sandboxer = Some(daemon);
        }

        let mut command = Command::new(bin_dir.join("containerd"));
        command.arg("--config").arg(&layout.containerd_config);
        if let Some(env) = options.containerd_env {
            command.envs(env(&layout));
        }
        let containerd_path: String = options
            .containerd_path
            .iter()
            .map(|dir| format!("{}:", dir.display()))
            .collect();
        self.containerd = Some(Daemon::spawn(
            "containerd",
            command,
            &layout.containerd_log,
            &format!("{containerd_path}{path_env}"),
        )?);

        if let Some(sandboxer) = self.sandboxer.as_mut() {
            wait_for_socket(sandboxer, &layout.sandboxer_socket)?;
        }
        if let Some(sandboxer) = self.wasm_sandboxer.as_mut() {
            wait_for_socket(sandboxer, &layout.wasm_socket)?;
        }
        if let Some(sandboxer) = self.quark_sandboxer.as_mut() {
            wait_for_socket(sandboxer, &layout.quark_socket)?;
        }
        if let Some(sandboxer) = self.vmm_sandboxer.as_mut() {
            wait_for_socket(sandboxer, &layout.vmm_socket)?;
        }
        let containerd = self
            .containerd
            .as_mut()
            .expect("containerd was just spawned");
        wait_for_socket(containerd, &layout.containerd_socket)?;

        let ctr = bin_dir.join("ctr");
        self.ctr = ctr.clone();
        let wasm = wasm_image.then_some(wasm_tar);
        for tarball in [Some(pause_tar), Some(busybox_tar), wasm]
            .into_iter()
            .flatten()
        {
            let (ctr, socket) = (ctr.clone(), layout.containerd_socket.clone());
            tokio::task::spawn_blocking(move || images::import(&ctr, &socket, &tarball))
                .await
                .context("image import task failed")??;
        }

        let cri = CriClient::connect(&layout.containerd_socket).await?;
        wait_until_ready(&cri).await?;
        let mut imported = vec![images::PAUSE_IMAGE, images::BUSYBOX_IMAGE];
        if wasm_image {
            imported.push(images::WASM_IMAGE);
        }
        wait_for_images(&cri, &imported).await?;
        self.cri = Some(cri);
        Ok(())
    }

    fn teardown_inner(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let mut first_error: Option<anyhow::Error> = None;

        if self
            .containerd
            .as_mut()
            .is_some_and(|d| d.exited().is_none())
        {
            if let Err(e) = remove_pods_blocking(&self.layout.containerd_socket) {
                eprintln!("teardown: cannot remove all pods: {e:#}");
                first_error.get_or_insert(e);
            }
        }
        for daemon in [
            self.containerd.as_mut(),
            self.sandboxer.as_mut(),
            self.wasm_sandboxer.as_mut(),
            self.quark_sandboxer.as_mut(),
            self.vmm_sandboxer.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            if let Err(e) = daemon.stop(STOP_TIMEOUT) {
                eprintln!("teardown: {e:#}");
                first_error.get_or_insert(e);
            }
        }
        if let Err(e) = cleanup::remove_run(&self.layout) {
            eprintln!("teardown: {e:#}");
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Kills the vmm sandboxer with SIGKILL, as a crash would, and starts it again with
    /// the same configuration; returns once it serves its socket. Its log goes on in the
    /// same file.
    pub fn restart_vmm_sandboxer(&mut self) -> Result<()> {
        let daemon = self
            .vmm_sandboxer
            .as_mut()
            .context("the harness runs no vmm sandboxer")?;
        if daemon.exited().is_none() {
            cleanup::signal(daemon.pid(), libc::SIGKILL)?;
            daemon
                .child
                .wait()
                .context("cannot reap the killed vmm sandboxer")?;
        }
        let path_env = format!("{}:{SYSTEM_PATH}", containerd_bin_dir()?.display());
        let mut command = Command::new(vmm_sandboxer_binary()?);
        command.arg("--config").arg(&self.layout.vmm_config);
        let mut restarted =
            Daemon::spawn_appending("vmm-sandboxer", command, &self.layout.vmm_log, &path_env)?;
        // The old socket file is still there: wait for the new process to answer on it.
        let socket = self.layout.vmm_socket.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = restarted.exited() {
                bail!("the restarted vmm sandboxer exited: {status}");
            }
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the restarted vmm sandboxer did not serve {} within 30s",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.vmm_sandboxer = Some(restarted);
        Ok(())
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        if std::thread::panicking() {
            self.print_log_tails();
        }
        if let Err(e) = self.teardown_inner() {
            eprintln!(
                "teardown of {} failed: {e:#}",
                self.layout.run_dir.display()
            );
        }
    }
}

/// What of run `layout` is on the host, not counting the processes `daemons`; after a teardown
/// (`daemons` empty) nothing at all should be left, the bridge included.
pub fn leftovers_of(layout: &Layout, daemons: &[u32]) -> Result<Leftovers> {
    let describe = |(pid, cmdline): (u32, String)| format!("{pid} {cmdline}");
    let mut processes: Vec<String> = cleanup::run_processes(layout, daemons)
        .into_iter()
        .map(describe)
        .collect();
    processes.extend(cleanup::cgroup_processes(layout).into_iter().map(describe));
    processes.sort();
    processes.dedup();

    // The cgroup parent itself may stay: it belongs to the run, not to a pod.
    let top_level: Vec<PathBuf> = cleanup::cgroup_dirs(layout)
        .into_iter()
        .filter(|d| !d.ends_with(layout.cgroup_parent.trim_start_matches('/')))
        .collect();

    let ipam_net = layout.ipam_dir.join(&layout.network_name);
    let mut cni: Vec<PathBuf> = cleanup::list_dir(&ipam_net)
        .into_iter()
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name != "lock" && !name.starts_with("last_reserved_ip")
        })
        .collect();
    cni.extend(cleanup::cni_cache_entries(layout));

    Ok(Leftovers {
        processes,
        mounts: cleanup::run_mounts(layout)?,
        netns: cleanup::list_dir(&layout.netns_dir()),
        cgroups: top_level,
        task_bundles: cleanup::list_dir(&layout.task_bundle_dir()),
        runc_state: cleanup::list_dir(&layout.runc_root.join("k8s.io")),
        runsc_state: files_below(&layout.quark_runsc_root())
            .into_iter()
            .chain(files_below(&layout.runsc_v2_root))
            .collect(),
        sandboxer_state: files_below(&layout.sandboxer_state)
            .into_iter()
            // The wasm sandboxer's compiled modules are a cache that outlives pods.
            .chain(
                files_below(&layout.wasm_state)
                    .into_iter()
                    .filter(|f| !f.starts_with(layout.wasm_state.join("modules"))),
            )
            .chain(
                files_below(&layout.quark_state)
                    .into_iter()
                    .filter(|f| !f.starts_with(layout.quark_runsc_root())),
            )
            .chain(files_below(&layout.vmm_state))
            .collect(),
        cni,
        bridge: cleanup::bridge_exists(layout).then(|| layout.bridge.clone()),
    })
}

/// Every entry below `dir` that is not a directory: the sandboxer keeps a few fixed,
/// empty directories of its own, but no file may outlive the pods.
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in cleanup::list_dir(dir) {
        if entry.is_dir() && !entry.is_symlink() {
            files.extend(files_below(&entry));
        } else {
            files.push(entry);
        }
    }
    files
}

/// The directory of the containerd 2.1.9 binaries unpacked by `scripts/setup.sh`, or the one
/// named by [`CONTAINERD_DIR_ENV`].
pub fn containerd_bin_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os(CONTAINERD_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => workspace_dir().join(".cache/containerd-2.1.9/usr/bin"),
    };
    ensure!(
        dir.join("containerd").is_file() && dir.join("ctr").is_file(),
        "no containerd and ctr in {} (run scripts/setup.sh or set {CONTAINERD_DIR_ENV})",
        dir.display()
    );
    Ok(dir)
}

/// The binary `name` of a sandboxer family: `$env` when set, else `name` next to the test
/// binary's profile directory (`target/<profile>`), else in `$CARGO_TARGET_DIR/debug` or the
/// workspace's `target/debug`.
pub fn family_binary(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        ensure!(path.is_file(), "{env}={} is not a file", path.display());
        return Ok(path);
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/<profile>/deps/<test binary>
        if let Some(profile_dir) = exe.parent().and_then(Path::parent) {
            candidates.push(profile_dir.join(name));
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join("target"));
    candidates.push(target.join("debug").join(name));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow!(
                "{name} not found in {candidates:?}: build it (cargo build --workspace --bins) \
                 or set {env}"
            )
        })
}

/// The runc sandboxer binary, found by [`family_binary`] with [`SANDBOXER_ENV`].
pub fn sandboxer_binary() -> Result<PathBuf> {
    family_binary("runc-sandboxer", SANDBOXER_ENV)
}

/// The wasm sandboxer binary, found by [`family_binary`] with [`WASM_SANDBOXER_ENV`].
pub fn wasm_sandboxer_binary() -> Result<PathBuf> {
    family_binary("wasm-sandboxer", WASM_SANDBOXER_ENV)
}

/// The quark sandboxer binary, found by [`family_binary`] with [`QUARK_SANDBOXER_ENV`].
pub fn quark_sandboxer_binary() -> Result<PathBuf> {
    family_binary("quark-sandboxer", QUARK_SANDBOXER_ENV)
}

/// The vmm sandboxer binary, found by [`family_binary`] with [`VMM_SANDBOXER_ENV`].
pub fn vmm_sandboxer_binary() -> Result<PathBuf> {
    family_binary("vmm-sandboxer", VMM_SANDBOXER_ENV)
}

/// The directory of the guest image `make guest` builds, or the one named by
/// [`GUEST_DIR_ENV`].
pub fn guest_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os(GUEST_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => workspace_dir().join(".cache/guest"),
    };
    ensure!(
        dir.join("vmlinux").is_file() && dir.join("initramfs.cpio").is_file(),
        "no guest image (vmlinux, initramfs.cpio) in {} (run make guest or set {GUEST_DIR_ENV})",
        dir.display()
    );
    Ok(dir)
}

/// The vhost-device-vsock binary `scripts/setup.sh` unpacks.
pub fn vhost_vsock_binary() -> Result<PathBuf> {
    let cache = workspace_dir().join(".cache");
    cleanup::list_dir(&cache)
        .into_iter()
        .filter(|dir| {
            dir.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("vhost-device-vsock-"))
        })
        .map(|dir| dir.join("usr/bin/vhost-device-vsock"))
        .find(|binary| binary.is_file())
        .ok_or_else(|| {
            anyhow!(
                "no vhost-device-vsock under {} (run scripts/setup.sh)",
                cache.display()
            )
        })
}

/// The runsc binary unpacked by `scripts/setup.sh`, or the one named by [`RUNSC_ENV`].
pub fn runsc_binary() -> Result<PathBuf> {
    let path = match std::env::var_os(RUNSC_ENV) {
        Some(path) => PathBuf::from(path),
        None => workspace_dir().join(".cache/runsc-20240729/usr/bin/runsc"),
    };
    ensure!(
        path.is_file(),
        "no runsc at {} (run scripts/setup.sh or set {RUNSC_ENV})",
        path.display()
    );
    Ok(path)
}

fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_path_buf()
}

/// Polls `check` every 50 ms until it holds; fails with "`what` within `timeout`" when it
/// does not hold in time.
pub async fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !check() {
        ensure!(Instant::now() < deadline, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A child process whose output goes to a log file.
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &'static str, mut command: Command, log: &Path, path_env: &str) -> Result<Self> {
        let out =
            fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone().context("cannot duplicate log file")?;
        let child = command
            .env("PATH", path_env)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", command.get_program()))?;
        Ok(Self {
            name,
            child,
            log: log.to_path_buf(),
        })
    }

    /// Like [`Daemon::spawn`], appending to `log` instead of starting it afresh.
    fn spawn_appending(
        name: &'static str,
        mut command: Command,
        log: &Path,
        path_env: &str,
    ) -> Result<Self> {
        let out = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let err = out.try_clone().context("cannot duplicate log file")?;
        let child = command
            .env("PATH", path_env)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", command.get_program()))?;
        Ok(Self {
            name,
            child,
            log: log.to_path_buf(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then SIGKILL once `timeout` has passed.
    fn stop(&mut self, timeout: Duration) -> Result<()> {
        if self.exited().is_some() {
            return Ok(());
        }
        cleanup::signal(self.pid(), libc::SIGTERM)?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        cleanup::signal(self.pid(), libc::SIGKILL)?;
        self.child
            .wait()
            .with_context(|| format!("cannot reap {}", self.name))?;
        bail!(
            "{} did not stop within {timeout:?} of SIGTERM and was killed",
            self.name
        )
    }
}

/// Picks a free run id, removing the runs of dead test processes first, and creates the run
/// directory with its owner file.
fn allocate_run() -> Result<Layout> {
    let _guard = ALLOCATION.lock().unwrap_or_else(|e| e.into_inner());
    fs::create_dir_all(BASE_DIR).with_context(|| format!("cannot create {BASE_DIR}"))?;
    remove_stale_runs();

    let routes = ipv4_routes()?;
    let counter = HARNESS_COUNTER.fetch_add(1, Ordering::Relaxed);
    let start = (std::process::id() + counter * 7) % MAX_RUN_ID;
    for offset in 0..MAX_RUN_ID {
        let id = (start + offset) % MAX_RUN_ID + 1;
        let run_dir = Path::new(BASE_DIR).join(id.to_string());
        let layout = Layout::new(&run_dir, id);
        if cleanup::bridge_exists(&layout)
            || !cleanup::cgroup_dirs(&layout).is_empty()
            || routes.iter().any(|(net, len)| overlaps(*net, *len, id))
        {
            continue;
        }
        match fs::create_dir(&run_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("cannot create {}", run_dir.display()))
            }
        }
        write_file(&layout.owner_file, &owner_record(std::process::id())?)?;
        return Ok(layout);
    }
    bail!("no free run id under {BASE_DIR}: all {MAX_RUN_ID} are taken")
}

/// Removes the runs whose owner process is gone (or whose owner file never got written).
fn remove_stale_runs() {
    for run_dir in cleanup::list_dir(Path::new(BASE_DIR)) {
        let Some(id) = run_dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let layout = Layout::new(&run_dir, id);
        let stale = match fs::read_to_string(&layout.owner_file) {
            Ok(record) => !owner_alive(&record),
            Err(_) => fs::metadata(&run_dir)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(300)),
        };
        if stale {
            eprintln!("removing stale test run {}", run_dir.display());
            if let Err(e) = cleanup::remove_run(&layout) {
                eprintln!("cannot fully remove stale run {}: {e:#}", run_dir.display());
            }
        }
    }
}

/// `<pid> <start time>` of process `pid`; the start time tells a reused pid apart.
fn owner_record(pid: u32) -> Result<String> {
    let start =
        process_start_time(pid).with_context(|| format!("cannot read start time of {pid}"))?;
    Ok(format!("{pid} {start}\n"))
}

fn owner_alive(record: &str) -> bool {
    let mut fields = record.split_whitespace();
    let (Some(pid), Some(start)) = (fields.next(), fields.next()) else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    process_start_time(pid).is_some_and(|s| s.to_string() == start)
}

/// Field 22 of `/proc/<pid>/stat`: when the process started, in clock ticks after boot.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; it ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Destinations of the host's IPv4 routes in all tables, as (network, prefix length).
fn ipv4_routes() -> Result<Vec<(u32, u32)>> {
    let output = Command::new("ip")
        .args(["-4", "route", "show", "table", "all"])
        .output()
        .context("cannot run ip route")?;
    ensure!(
        output.status.success(),
        "ip route failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text.lines().filter_map(parse_route_destination).collect())
}

fn parse_route_destination(line: &str) -> Option<(u32, u32)> {
    line.split_whitespace().take(2).find_map(|token| {
        let (addr, len) = token.split_once('/').unwrap_or((token, "32"));
        let addr: std::net::Ipv4Addr = addr.parse().ok()?;
        Some((u32::from(addr), len.parse().ok()?))
    })
}

/// Whether the route `net/len` overlaps the subnet `10.231.<id>.0/24` of run `id`.
fn overlaps(net: u32, len: u32, id: u32) -> bool {
    let ours = u32::from(std::net::Ipv4Addr::new(10, 231, 0, 0)) | (id << 8);
    let common = len.min(24);
    let mask = if common == 0 {
        0
    } else {
        u32::MAX << (32 - common)
    };
    net & mask == ours & mask
}

fn wait_for_socket(daemon: &mut Daemon, socket: &Path) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = daemon.exited() {
            bail!(
                "{} exited ({status}) before serving {}; log {}:\n{}",
                daemon.name,
                socket.display(),
                daemon.log.display(),
                log_tail(&daemon.log, LOG_TAIL_LINES).unwrap_or_default()
            );
        }
        if UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{} does not serve {} after {START_TIMEOUT:?}",
            daemon.name,
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn wait_until_ready(cri: &CriClient) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let status = cri.status().await?;
        let conditions = status.status.map(|s| s.conditions).unwrap_or_default();
        let ready = |kind: &str| conditions.iter().any(|c| c.r#type == kind && c.status);
        if ready("RuntimeReady") && ready("NetworkReady") {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "CRI not ready after {START_TIMEOUT:?}: {conditions:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until CRI's image service knows every image of `names`: it learns of imports from
/// containerd's events, after `ctr images import` has returned.
async fn wait_for_images(cri: &CriClient, names: &[&str]) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    for name in names {
        while cri.image_status(name).await?.image.is_none() {
            ensure!(
                Instant::now() < deadline,
                "CRI does not know the imported image {name} after {START_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Stops and removes every pod through CRI, on a runtime of its own so that it works from
/// `Drop`, inside or outside a test's runtime.
fn remove_pods_blocking(socket: &Path) -> Result<()> {
    let socket = socket.to_path_buf();
    std::thread::spawn(move || -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot build a runtime for teardown")?;
        runtime.block_on(async {
            tokio::time::timeout(TEARDOWN_CRI_TIMEOUT, async {
                CriClient::connect(&socket).await?.remove_all_pods().await
            })
            .await
            .context("removing pods timed out")?
        })
    })
    .join()
    .map_err(|_| anyhow!("the pod removal thread panicked"))?
}

fn write_file(path: &Path, content: &str) -> Result<()> {
    fs::write(path, content).with_context(|| format!("cannot write {}", path.display()))
}

/// Fails with "`what` hangs" when `future` does not finish within `limit`.
pub async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(limit, future)
        .await
        .with_context(|| format!("{what} hangs (no answer within {limit:?})"))
}

/// The last `lines` lines of the file at `path`, reading at most its last 64 KiB.
pub fn log_tail(path: &Path, lines: usize) -> Result<String> {
    const MAX_BYTES: u64 = 64 * 1024;
    let mut file = fs::File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    Ok(all[all.len().saturating_sub(lines)..].join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_overlap() {
        let net = |a, b, c, d| u32::from(std::net::Ipv4Addr::new(a, b, c, d));
        assert!(overlaps(net(10, 0, 0, 0), 8, 5));
        assert!(overlaps(net(10, 231, 5, 0), 24, 5));
        assert!(overlaps(net(10, 231, 5, 7), 32, 5));
        assert!(!overlaps(net(10, 231, 6, 0), 24, 5));
        assert!(overlaps(net(0, 0, 0, 0), 0, 5));
        assert!(!overlaps(net(192, 0, 2, 0), 24, 5));
    }

    #[test]
    fn parses_route_lines() {
        assert_eq!(
            parse_route_destination("192.0.2.0/24 dev eth0 proto kernel"),
            Some((u32::from(std::net::Ipv4Addr::new(192, 0, 2, 0)), 24))
        );
        assert_eq!(
            parse_route_destination("local 127.0.0.1 dev lo table local"),
            Some((u32::from(std::net::Ipv4Addr::new(127, 0, 0, 1)), 32))
        );
        assert_eq!(
            parse_route_destination("default via 192.0.2.1 dev eth0"),
            None
        );
    }

    #[test]
    fn own_process_is_alive() {
        let record = owner_record(std::process::id()).unwrap();
        assert!(owner_alive(&record));
        assert!(!owner_alive("999999999 1"));
    }
}
