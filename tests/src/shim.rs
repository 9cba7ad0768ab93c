//! Pods through the shim binary `containerd-shim-kuasar-<family>-v2` on the containerd modes
//! that launch a shim: containerd 2.x with `sandboxer = "shim"`, 1.7 with `sandbox_mode =
//! "shim"`, and 1.6/1.7's default pod-sandbox mode (a pause container per pod).
//!
//! A shim harness is an ordinary [`Harness`] (its sandboxers, CNI, images, cleanup) whose
//! containerd is one of those versions, configured with a handler `kuasar-<family>-shim` per
//! family; each handler's runtime options name a shim configuration file in the run
//! directory that points the shim at the harness's sandboxer of that family.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use k8s_cri::v1::{ContainerState, DnsConfig, KeyValue, PodSandboxState};

use crate::config::CNI_BIN_DIR;
use crate::cri::text;
use crate::harness::{family_binary, EnvOf, Harness, HarnessOptions, Layout, Pod, RUNC_HANDLER};
use crate::images::{BUSYBOX_IMAGE, PAUSE_IMAGE, WASM_IMAGE};
use crate::terminal::{exec_on_terminal, TerminalSession, TERMINAL_CHECK};

/// The sandbox families, each with its own shim binary name.
pub const FAMILIES: [&str; 4] = ["runc", "wasm", "quark", "vmm"];

/// How long a pod's shim may take to go once its pod is removed.
pub const SHIM_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// A microVM's first container may wait for the guest to boot (software emulation here).
const KERNEL_EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// A containerd release and the way its CRI runs pods on a shim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShimMode {
    /// containerd 2.1.9, CRI runtime `sandboxer = "shim"`: the shim serves the Sandbox API.
    Containerd2Shim,
    /// containerd 1.7.24 with `sandbox_mode = "shim"` (and `ENABLE_CRI_SANDBOXES`): the shim
    /// serves the Sandbox API.
    Containerd17Shim,
    /// containerd 1.7.24's default pod-sandbox mode: the pause container's task is the
    /// sandbox.
    Containerd17PodSandbox,
    /// containerd 1.6.20 (pod-sandbox mode only).
    Containerd16PodSandbox,
}

impl ShimMode {
    /// The containerd version the mode runs.
    pub fn version(self) -> &'static str {
        match self {
            ShimMode::Containerd2Shim => "2.1.9",
            ShimMode::Containerd17Shim | ShimMode::Containerd17PodSandbox => "1.7.24",
            ShimMode::Containerd16PodSandbox => "1.6.20",
        }
    }

    /// Harness options running this mode's containerd; the caller picks the sandboxers.
    pub fn harness_options(self) -> Result<HarnessOptions> {
        let bin_dir = match self {
            ShimMode::Containerd2Shim => None,
            _ => Some(older_containerd_dir(self.version())?),
        };
        let config: fn(&Layout) -> String = match self {
            ShimMode::Containerd2Shim => containerd2_shim_config,
            ShimMode::Containerd17Shim => containerd17_shim_config,
            ShimMode::Containerd17PodSandbox | ShimMode::Containerd16PodSandbox => {
                containerd1_pod_sandbox_config
            }
        };
        let env: EnvOf = match self {
            ShimMode::Containerd17Shim => containerd17_shim_env,
            _ => shim_env,
        };
        let shim_dir = shim_binary("runc")?
            .parent()
            .map(Path::to_path_buf)
            .context("the shim binary has no directory")?;
        Ok(HarnessOptions {
            containerd_config: Some(config),
            containerd_bin_dir: bin_dir,
            containerd_env: Some(env),
            containerd_path: vec![shim_dir],
            ..Default::default()
        })
    }
}

/// Environment variable running every harness on a shim mode (`containerd2`,
/// `containerd17-shim`, `containerd17`, `containerd16`), with the families' own handlers
/// (`kuasar-<family>`) going through their shims: the families' own end-to-end tests then
/// run unchanged on that path.
pub const SHIM_MODE_ENV: &str = "KUASAR_SHIM_MODE";

impl ShimMode {
    /// The mode named `name` in [`SHIM_MODE_ENV`].
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "containerd2" => ShimMode::Containerd2Shim,
            "containerd17-shim" => ShimMode::Containerd17Shim,
            "containerd17" => ShimMode::Containerd17PodSandbox,
            "containerd16" => ShimMode::Containerd16PodSandbox,
            other => anyhow::bail!(
                "{SHIM_MODE_ENV}={other:?}: expected containerd2, containerd17-shim, \
                 containerd17 or containerd16"
            ),
        })
    }

    /// The mode [`SHIM_MODE_ENV`] names, if it is set.
    pub fn from_env() -> Result<Option<Self>> {
        match std::env::var(SHIM_MODE_ENV) {
            Ok(name) if !name.is_empty() => Self::parse(&name).map(Some),
            _ => Ok(None),
        }
    }
}

/// `options` on the containerd of the mode [`SHIM_MODE_ENV`] names, with the families' own
/// handlers going through the shims, unless the options choose a containerd configuration of
/// their own; and whether they do run on a shim mode.
pub fn options_from_env(options: HarnessOptions) -> Result<(HarnessOptions, bool)> {
    let Some(mode) = ShimMode::from_env()? else {
        return Ok((options, false));
    };
    if options.containerd_config.is_some() {
        return Ok((options, false));
    }
    let base = mode.harness_options()?;
    let config: fn(&Layout) -> String = match mode {
        ShimMode::Containerd2Shim => containerd2_shim_config_native_names,
        ShimMode::Containerd17Shim => containerd17_shim_config_native_names,
        _ => containerd1_pod_sandbox_config_native_names,
    };
    Ok((
        HarnessOptions {
            containerd_config: Some(config),
            containerd_bin_dir: base.containerd_bin_dir,
            containerd_env: base.containerd_env,
            containerd_path: base.containerd_path,
            ..options
        },
        true,
    ))
}

/// Whether `cmdline` is a pod's shim.
pub fn is_shim(cmdline: &str) -> bool {
    cmdline.contains("containerd-shim-kuasar-") && cmdline.ends_with("serve")
}

/// The CRI runtime handler of `family`'s shim.
pub fn shim_handler(family: &str) -> String {
    format!("kuasar-{family}-shim")
}

/// The shim binary of `family`: `$KUASAR_SHIM_<FAMILY>` or next to the test binaries.
pub fn shim_binary(family: &str) -> Result<PathBuf> {
    let binary = family_binary(
        &format!("containerd-shim-kuasar-{family}-v2"),
        &format!("KUASAR_SHIM_{}", family.to_uppercase()),
    )?;
    // containerd takes a runtime path only when it is absolute.
    std::path::absolute(&binary)
        .with_context(|| format!("cannot make {} absolute", binary.display()))
}

/// containerd's environment, inherited by the shims: each family's shim configuration file
/// (containerd 2.x's CRI gives a shim of a sandbox's containers no runtime options of a
/// type other than runc's).
pub fn shim_env(layout: &Layout) -> Vec<(String, String)> {
    FAMILIES
        .iter()
        .map(|family| {
            (
                format!("KUASAR_{}_SHIM_CONFIG", family.to_uppercase()),
                shim_config_file(layout, family)
                    .to_string_lossy()
                    .into_owned(),
            )
        })
        .collect()
}

/// [`shim_env`], and `ENABLE_CRI_SANDBOXES`: containerd 1.7 reads `sandbox_mode` only in its
/// experimental CRI server.
pub fn containerd17_shim_env(layout: &Layout) -> Vec<(String, String)> {
    let mut env = shim_env(layout);
    env.push(("ENABLE_CRI_SANDBOXES".into(), "1".into()));
    env
}

/// The shim configuration file of `family` in the run directory.
pub fn shim_config_file(layout: &Layout, family: &str) -> PathBuf {
    layout.run_dir.join(format!("kuasar-shim-{family}.toml"))
}

/// Starts a harness on `mode` with `options`' sandboxers and writes the shims'
/// configuration files.
pub async fn start(mode: ShimMode, options: HarnessOptions) -> Result<Harness> {
    for family in FAMILIES {
        shim_binary(family)?;
    }
    let base = mode.harness_options()?;
    let harness = Harness::start_with(HarnessOptions {
        containerd_config: base.containerd_config,
        containerd_bin_dir: base.containerd_bin_dir,
        containerd_env: base.containerd_env,
        containerd_path: base.containerd_path,
        ..options
    })
    .await?;
    write_shim_configs(harness.layout())?;
    Ok(harness)
}

/// Writes every family's shim configuration, pointing at the harness's sandboxer sockets.
pub fn write_shim_configs(layout: &Layout) -> Result<()> {
    for family in FAMILIES {
        let config = format!(
            "sandboxer_address = {}\nlog_level = \"debug\"\n",
            quote(&sandboxer_socket(layout, family).to_string_lossy())
        );
        let path = shim_config_file(layout, family);
        std::fs::write(&path, config)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// The harness's sandboxer socket of `family`.
pub fn sandboxer_socket(layout: &Layout, family: &str) -> PathBuf {
    match family {
        "wasm" => layout.wasm_socket.clone(),
        "quark" => layout.quark_socket.clone(),
        "vmm" => layout.vmm_socket.clone(),
        _ => layout.sandboxer_socket.clone(),
    }
}

/// The unpacked containerd `version` of `scripts/setup.sh`.
pub fn older_containerd_dir(version: &str) -> Result<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .join(format!(".cache/containerd-{version}/usr/bin"));
    ensure!(
        dir.join("containerd").is_file() && dir.join("ctr").is_file(),
        "no containerd {version} in {} (run scripts/setup.sh)",
        dir.display()
    );
    Ok(dir)
}

/// containerd 2.x's configuration of the harness plus a shim-mode handler per family. The
/// handlers have no `options`: CRI would pass them as a type its own task options cannot
/// amend, and container creation fails; the shims find their configuration through
/// [`shim_env`].
pub fn containerd2_shim_config(layout: &Layout) -> String {
    let mut config = crate::config::containerd_config(layout);
    for family in FAMILIES {
        config.push_str(&format!(
            r#"
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.{handler}]
runtime_type = {runtime_type}
runtime_path = {path}
sandboxer = "shim"
"#,
            handler = quote(&shim_handler(family)),
            runtime_type = quote(&format!("io.containerd.kuasar-{family}.v2")),
            path = quote(&shim_path(family)),
        ));
    }
    config
}

/// containerd 2.x's configuration of the harness with the families' own handlers going
/// through their shims (`sandboxer = "shim"` instead of the proxy plugins).
pub fn containerd2_shim_config_native_names(layout: &Layout) -> String {
    let mut config = crate::config::containerd_config(layout);
    for family in FAMILIES {
        config = config.replace(
            &format!("sandboxer = {}", quote(family)),
            "sandboxer = \"shim\"",
        );
    }
    config
}

/// [`containerd17_shim_config`] with the families' own handler names.
pub fn containerd17_shim_config_native_names(layout: &Layout) -> String {
    containerd1_config(layout, Some("shim"), native_handler)
}

/// [`containerd1_pod_sandbox_config`] with the families' own handler names.
pub fn containerd1_pod_sandbox_config_native_names(layout: &Layout) -> String {
    containerd1_config(layout, None, native_handler)
}

/// The family's own CRI runtime handler, `kuasar-<family>`.
fn native_handler(family: &str) -> String {
    format!("kuasar-{family}")
}

/// containerd 1.7's configuration with shim-mode handlers.
pub fn containerd17_shim_config(layout: &Layout) -> String {
    containerd1_config(layout, Some("shim"), shim_handler)
}

/// containerd 1.6 or 1.7's configuration with pod-sandbox (pause container) handlers.
pub fn containerd1_pod_sandbox_config(layout: &Layout) -> String {
    containerd1_config(layout, None, shim_handler)
}

/// A containerd 1.x configuration (version 2) keeping everything under the run directory,
/// with containerd's own runc shim as [`RUNC_HANDLER`] and a handler per family's shim.
fn containerd1_config(
    layout: &Layout,
    sandbox_mode: Option<&str>,
    handler: fn(&str) -> String,
) -> String {
    let s = |p: &Path| quote(&p.to_string_lossy());
    let mut config = format!(
        r#"version = 2
root = {root}
state = {state}
temp = {temp}
disabled_plugins = [
  "io.containerd.nri.v1.nri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
address = {grpc}

[ttrpc]
address = {ttrpc}

[debug]
level = "debug"

[plugins."io.containerd.internal.v1.opt"]
path = {opt}

[plugins."io.containerd.grpc.v1.cri"]
sandbox_image = {pause}
restrict_oom_score_adj = true
netns_mounts_under_state_dir = true
enable_selinux = false

[plugins."io.containerd.grpc.v1.cri".registry]
config_path = {registry}

[plugins."io.containerd.grpc.v1.cri".cni]
bin_dir = {cni_bin}
conf_dir = {cni_conf}
max_conf_num = 1

[plugins."io.containerd.grpc.v1.cri".containerd]
snapshotter = "overlayfs"
default_runtime_name = {runc_handler}

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{runc_handler}]
runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{runc_handler}.options]
BinaryName = "runc"
Root = {runc_root}
SystemdCgroup = false
"#,
        root = s(&layout.containerd_root),
        state = s(&layout.containerd_state),
        temp = s(&layout.containerd_temp),
        grpc = s(&layout.containerd_socket),
        ttrpc = s(&layout.containerd_ttrpc_socket),
        opt = s(&layout.containerd_opt),
        pause = quote(PAUSE_IMAGE),
        registry = s(&layout.registry_dir),
        cni_bin = quote(CNI_BIN_DIR),
        cni_conf = s(&layout.cni_conf_dir),
        runc_handler = quote(RUNC_HANDLER),
        runc_root = s(&layout.runc_root),
    );
    for family in FAMILIES {
        let mode = sandbox_mode
            .map(|mode| format!("sandbox_mode = {}\n", quote(mode)))
            .unwrap_or_default();
        config.push_str(&format!(
            r#"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{handler}]
runtime_type = {runtime_type}
runtime_path = {path}
{mode}
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{handler}.options]
ConfigPath = {config_path}
"#,
            handler = quote(&handler(family)),
            runtime_type = quote(&format!("io.containerd.kuasar-{family}.v2")),
            path = quote(&shim_path(family)),
            config_path = quote(&shim_config_file(layout, family).to_string_lossy()),
        ));
    }
    config
}

fn shim_path(family: &str) -> String {
    shim_binary(family)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("containerd-shim-kuasar-{family}-v2"))
}

/// The pids of the pods' shim processes of this run.
pub fn shim_pids(layout: &Layout) -> Vec<u32> {
    crate::cleanup::run_processes(layout, &[])
        .into_iter()
        .filter(|(_, cmdline)| is_shim(cmdline))
        .map(|(pid, _)| pid)
        .collect()
}

/// A pod's whole CRI lifecycle on `handler`, the runc family's way: ready with an IP, a
/// container's logs and exit code, exec with output and exit codes, the pod's hostname,
/// a stopped container's exit code, the pod stopped and removed, and nothing of it left,
/// its shim included.
pub async fn runc_lifecycle(h: &Harness, handler: &str) -> Result<()> {
    let mut config = h.pod_config("web-0")?;
    config.dns_config = Some(DnsConfig {
        servers: vec!["10.231.0.53".into()],
        searches: vec!["pods.kuasar.test".into()],
        options: vec!["ndots:3".into()],
    });
    let id = h.cri().run_pod(&config, handler).await?;
    let pod = Pod { id, config };
    let status = h.cri().pod_status(&pod.id).await?;
    ensure!(
        status.state == PodSandboxState::SandboxReady as i32,
        "pod not ready: {status:?}"
    );
    ensure!(
        status.network.map(|n| !n.ip.is_empty()).unwrap_or(false),
        "pod has no IP"
    );
    ensure!(
        shim_pids(h.layout()).len() == 1,
        "not one shim for the pod: {:?}",
        shim_pids(h.layout())
    );

    let echo = h.container_config(
        "echo",
        BUSYBOX_IMAGE,
        &["sh", "-c", "echo hello from kuasar; echo oops >&2; exit 3"],
    );
    let echo_id = h.start_container(&pod, &echo).await?;
    let exited = h
        .cri()
        .wait_container_exited(&echo_id, EXIT_TIMEOUT)
        .await?;
    ensure!(
        exited.exit_code == 3,
        "exit code {} instead of 3",
        exited.exit_code
    );
    let log = h.container_log(&pod, &echo)?;
    ensure!(
        log.contains("hello from kuasar\n") && log.contains("oops\n"),
        "unexpected log {log:?}"
    );

    let sleeper = h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
    let sleeper_id = h.start_container(&pod, &sleeper).await?;
    let running = h.cri().container_status(&sleeper_id).await?;
    ensure!(
        running.state == ContainerState::ContainerRunning as i32,
        "sleeper not running: {running:?}"
    );
    ensure!(
        shim_pids(h.layout()).len() == 1,
        "the pod's containers do not share its shim: {:?}",
        shim_pids(h.layout())
    );

    let exec = h.cri().exec_sync(&sleeper_id, &["hostname"], 10).await?;
    ensure!(
        exec.exit_code == 0 && text(&exec.stdout) == "web-0",
        "hostname: {exec:?}"
    );
    let exec = h
        .cri()
        .exec_sync(&sleeper_id, &["cat", "/etc/resolv.conf"], 10)
        .await?;
    let resolv = text(&exec.stdout);
    ensure!(
        resolv.contains("nameserver 10.231.0.53")
            && resolv.contains("search pods.kuasar.test")
            && resolv.contains("options ndots:3"),
        "the pod's DNS settings: {resolv:?}"
    );
    let exec = h
        .cri()
        .exec_sync(
            &sleeper_id,
            &["sh", "-c", "echo out; echo err >&2; exit 5"],
            10,
        )
        .await?;
    ensure!(exec.exit_code == 5, "exec exit code {}", exec.exit_code);
    ensure!(
        text(&exec.stdout) == "out" && text(&exec.stderr) == "err",
        "exec output {exec:?}"
    );

    // What `crictl exec -it <id> sh` does: CRI Exec, then the streaming session.
    let TerminalSession { output, status } = exec_on_terminal(
        h.cri(),
        &sleeper_id,
        &["sh"],
        (100, 30),
        TERMINAL_CHECK,
        EXIT_TIMEOUT,
    )
    .await?;
    ensure!(
        output.contains("/dev/pts/") && output.contains("30 100") && output.contains("tty-ok-42"),
        "terminal exec output {output:?}"
    );
    ensure!(
        status.contains("NonZeroExitCode") && status.contains("\"3\""),
        "terminal exec status {status:?}"
    );

    h.cri().stop_container(&sleeper_id, 10).await?;
    let stopped = h.cri().container_status(&sleeper_id).await?;
    ensure!(
        stopped.state == ContainerState::ContainerExited as i32 && stopped.exit_code == 143,
        "sleeper after stop: state {} exit code {}",
        crate::cri::state_name(stopped.state),
        stopped.exit_code
    );
    h.cri().remove_container(&echo_id).await?;

    h.cri().stop_pod(&pod.id).await?;
    let status = h.cri().pod_status(&pod.id).await?;
    ensure!(
        status.state == PodSandboxState::SandboxNotready as i32,
        "pod still ready after stop"
    );
    remove_pod_and_wait(h, &pod).await
}

/// The harness options starting `family`'s sandboxer.
pub fn family_options(family: &str) -> HarnessOptions {
    let mut options = HarnessOptions::default();
    match family {
        "wasm" => options.wasm_sandboxer = true,
        "quark" => options.quark_sandboxer = true,
        "vmm" => options.vmm_sandboxer = true,
        _ => options.sandboxer = true,
    }
    options
}

/// Runs `family`'s lifecycle ([`runc_lifecycle`], [`wasm_lifecycle`] or
/// [`kernel_lifecycle`]) through its shim on `mode`, in a harness of its own.
pub async fn family_lifecycle(mode: ShimMode, family: &'static str) -> Result<()> {
    start(mode, family_options(family))
        .await?
        .run(async move |h: &Harness| {
            let handler = shim_handler(family);
            match family {
                "runc" => runc_lifecycle(h, &handler).await,
                "wasm" => wasm_lifecycle(h, &handler).await,
                _ => kernel_lifecycle(h, &handler, family).await,
            }
        })
        .await
}

/// The wasm family's lifecycle: modules' arguments, environment, output and exit codes, a
/// module exec'd next to a running one, a stopped module's exit code, the pod removed.
pub async fn wasm_lifecycle(h: &Harness, handler: &str) -> Result<()> {
    let pod = h.run_pod("wasm-0", handler).await?;
    let status = h.cri().pod_status(&pod.id).await?;
    ensure!(
        status.state == PodSandboxState::SandboxReady as i32,
        "pod not ready: {status:?}"
    );

    let mut hello = h.container_config("hello", WASM_IMAGE, &[]);
    hello.args = vec!["first".into(), "second arg".into()];
    hello.envs = vec![KeyValue {
        key: "GREETING".into(),
        value: "hi there".into(),
    }];
    let hello_id = h.start_container(&pod, &hello).await?;
    let exited = h
        .cri()
        .wait_container_exited(&hello_id, EXIT_TIMEOUT)
        .await?;
    ensure!(
        exited.exit_code == 0,
        "hello exit code {}",
        exited.exit_code
    );
    let log = h.container_log(&pod, &hello)?;
    for line in [
        "hello from wasm",
        "arg[1]=first",
        "arg[2]=second arg",
        "GREETING=hi there",
        "hello on stderr",
    ] {
        ensure!(log.contains(line), "log lacks {line:?}: {log:?}");
    }

    let exit = h.container_config("exit", WASM_IMAGE, &["/exit.wasm", "42"]);
    let exit_id = h.start_container(&pod, &exit).await?;
    let exited = h
        .cri()
        .wait_container_exited(&exit_id, EXIT_TIMEOUT)
        .await?;
    ensure!(exited.exit_code == 42, "exit code {}", exited.exit_code);

    let sleeper = h.container_config("sleeper", WASM_IMAGE, &["/sleeper.wasm"]);
    let sleeper_id = h.start_container(&pod, &sleeper).await?;
    ensure!(
        shim_pids(h.layout()).len() == 1,
        "the pod's containers do not share its shim: {:?}",
        shim_pids(h.layout())
    );
    let exec = h
        .cri()
        .exec_sync(&sleeper_id, &["/hello.wasm", "from-exec"], 10)
        .await?;
    let out = text(&exec.stdout);
    ensure!(
        exec.exit_code == 0 && out.contains("arg[1]=from-exec"),
        "exec: {exec:?}"
    );
    let exec = h
        .cri()
        .exec_sync(&sleeper_id, &["/exit.wasm", "9"], 10)
        .await?;
    ensure!(exec.exit_code == 9, "exec exit code {}", exec.exit_code);

    h.cri().stop_container(&sleeper_id, 10).await?;
    let stopped = h.cri().container_status(&sleeper_id).await?;
    ensure!(
        stopped.state == ContainerState::ContainerExited as i32 && stopped.exit_code == 143,
        "sleeper after stop: state {} exit code {}",
        crate::cri::state_name(stopped.state),
        stopped.exit_code
    );
    remove_pod_and_wait(h, &pod).await
}

/// The lifecycle of a family with a kernel of its own (`quark`: gVisor's application
/// kernel; `vmm`: the microVM's guest kernel): a container sees that kernel, not the
/// host's, with the pod's hostname, its output and exit code; exec, stop, removal.
pub async fn kernel_lifecycle(h: &Harness, handler: &str, family: &str) -> Result<()> {
    let name = format!("{family}-0");
    let pod = h.run_pod(&name, handler).await?;
    let status = h.cri().pod_status(&pod.id).await?;
    ensure!(
        status.state == PodSandboxState::SandboxReady as i32,
        "pod not ready: {status:?}"
    );

    let kernel = h.container_config(
        "kernel",
        BUSYBOX_IMAGE,
        &[
            "sh",
            "-c",
            "cat /proc/version; hostname; echo to stderr >&2; exit 3",
        ],
    );
    let kernel_id = h.start_container(&pod, &kernel).await?;
    let exited = h
        .cri()
        .wait_container_exited(&kernel_id, KERNEL_EXIT_TIMEOUT)
        .await?;
    let log = h.container_log(&pod, &kernel)?;
    ensure!(
        exited.exit_code == 3,
        "exit code {} instead of 3; log {log:?}",
        exited.exit_code
    );
    let host_version = std::fs::read_to_string("/proc/version")?;
    let version = log
        .lines()
        .find(|l| l.starts_with("Linux version"))
        .unwrap_or_default();
    ensure!(
        !version.is_empty() && version != host_version.trim(),
        "the container does not see a kernel of its own: {log:?}"
    );
    if family == "quark" {
        ensure!(
            version.starts_with("Linux version 4.4.0 "),
            "not gVisor's kernel: {version:?}"
        );
    }
    ensure!(
        log.lines().any(|l| l == name),
        "hostname is not the pod's: {log:?}"
    );
    ensure!(log.contains("to stderr\n"), "stderr not logged: {log:?}");

    let sleeper = h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
    let sleeper_id = h.start_container(&pod, &sleeper).await?;
    ensure!(
        shim_pids(h.layout()).len() == 1,
        "the pod's containers do not share its shim: {:?}",
        shim_pids(h.layout())
    );
    let exec = h
        .cri()
        .exec_sync(
            &sleeper_id,
            &["sh", "-c", "echo out; echo err >&2; exit 5"],
            30,
        )
        .await?;
    ensure!(
        exec.exit_code == 5 && text(&exec.stdout) == "out" && text(&exec.stderr) == "err",
        "exec: {exec:?}"
    );

    h.cri().stop_container(&sleeper_id, 10).await?;
    let stopped = h.cri().container_status(&sleeper_id).await?;
    ensure!(
        stopped.state == ContainerState::ContainerExited as i32 && stopped.exit_code == 143,
        "sleeper after stop: state {} exit code {}",
        crate::cri::state_name(stopped.state),
        stopped.exit_code
    );
    h.cri().stop_pod(&pod.id).await?;
    let status = h.cri().pod_status(&pod.id).await?;
    ensure!(
        status.state == PodSandboxState::SandboxNotready as i32,
        "pod still ready after stop"
    );
    remove_pod_and_wait(h, &pod).await
}

/// Removes `pod` through CRI and waits until nothing of it is left, its shim included.
pub async fn remove_pod_and_wait(h: &Harness, pod: &Pod) -> Result<()> {
    h.cri().stop_pod(&pod.id).await?;
    h.cri().remove_pod(&pod.id).await?;
    ensure!(
        h.cri().list_pods().await?.is_empty(),
        "pods remain after removal"
    );
    ensure!(
        h.cri().list_containers(None).await?.is_empty(),
        "containers remain after removal"
    );
    h.wait_for_no_leftovers(SHIM_EXIT_TIMEOUT)
        .await
        .context("after removing the pod")
}

/// `value` as a TOML basic string.
fn quote(value: &str) -> String {
    toml::Value::String(value.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shim_configs_parse_as_toml_with_a_handler_per_family() {
        let layout = Layout::new(Path::new("/tmp/kuasar-t/7"), 7);
        let v2: toml::Table = containerd2_shim_config(&layout).parse().unwrap();
        let runtimes = &v2["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"];
        let v1: toml::Table = containerd17_shim_config(&layout).parse().unwrap();
        let v1_runtimes = &v1["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
        let pod_sandbox: toml::Table = containerd1_pod_sandbox_config(&layout).parse().unwrap();
        for family in FAMILIES {
            let handler = shim_handler(family);
            assert_eq!(runtimes[&handler]["sandboxer"].as_str(), Some("shim"));
            assert!(runtimes[&handler].get("options").is_none());
            assert_eq!(v1_runtimes[&handler]["sandbox_mode"].as_str(), Some("shim"));
            assert_eq!(
                v1_runtimes[&handler]["options"]["ConfigPath"].as_str(),
                Some(format!("/tmp/kuasar-t/7/kuasar-shim-{family}.toml").as_str())
            );
            let runtime = &pod_sandbox["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
                ["runtimes"][&handler];
            assert_eq!(
                runtime["runtime_type"].as_str(),
                Some(format!("io.containerd.kuasar-{family}.v2").as_str())
            );
            assert!(runtime.get("sandbox_mode").is_none());
        }
        let env = containerd17_shim_env(&layout);
        assert!(env.contains(&(
            "KUASAR_RUNC_SHIM_CONFIG".to_string(),
            "/tmp/kuasar-t/7/kuasar-shim-runc.toml".to_string()
        )));
        assert!(env.contains(&("ENABLE_CRI_SANDBOXES".to_string(), "1".to_string())));
    }
}
