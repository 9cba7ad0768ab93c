//! The quark sandboxer on a real containerd: every pod is one gVisor (runsc) sandbox whose
//! containers run on gVisor's application kernel instead of the host's. Needs root.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1::{
    ContainerState, LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption, PodSandboxState,
};
use kuasar_tests::cleanup;
use kuasar_tests::cleanup::process_alive;
use kuasar_tests::cri::text;
use kuasar_tests::images::BUSYBOX_IMAGE;
use kuasar_tests::terminal::{exec_on_terminal, TerminalSession};
use kuasar_tests::{
    Harness, HarnessOptions, Pod, QuarkSettings, KUASAR_QUARK_HANDLER, KUASAR_RUNC_HANDLER,
};

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the pod and its containers may take to notice that their sandbox died.
const DEATH_NOTICE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long cleaning up after a pod that failed to start may go on after the failure.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// What gVisor's kernel calls itself in `/proc/version`.
const GVISOR_VERSION_PREFIX: &str = "Linux version 4.4.0 ";

fn host_kernel_version() -> Result<String> {
    Ok(std::fs::read_to_string("/proc/version")
        .context("cannot read the host's /proc/version")?
        .trim()
        .to_string())
}

/// Checks that `version`, a container's `/proc/version`, is gVisor's and not the host's.
fn ensure_gvisor_kernel(version: &str) -> Result<()> {
    ensure!(
        version.starts_with(GVISOR_VERSION_PREFIX),
        "not gVisor's kernel: {version:?}"
    );
    let host = host_kernel_version()?;
    ensure!(
        version != host,
        "the container sees the host's kernel {host:?}"
    );
    Ok(())
}

#[tokio::test]
async fn containers_run_on_the_application_kernel() -> Result<()> {
    Harness::start_with(HarnessOptions {
        sandboxer: true,
        quark_sandboxer: true,
        ..Default::default()
    })
    .await?
    .run(async |h: &Harness| {
        // The same image on the runc family sees the host's kernel.
        let native = h.run_pod("native-0", KUASAR_RUNC_HANDLER).await?;
        let version = h.container_config("version", BUSYBOX_IMAGE, &["cat", "/proc/version"]);
        let version_id = h.start_container(&native, &version).await?;
        h.cri()
            .wait_container_exited(&version_id, EXIT_TIMEOUT)
            .await?;
        let seen = h.container_log(&native, &version)?;
        ensure!(
            seen.trim() == host_kernel_version()?,
            "a runc container sees {seen:?}, not the host's kernel"
        );
        h.remove_pod_and_check(&native).await?;

        let pod = h.run_pod("gvisor-0", KUASAR_QUARK_HANDLER).await?;
        let status = h.cri().pod_status(&pod.id).await?;
        ensure!(
            status.state == PodSandboxState::SandboxReady as i32,
            "pod not ready: {status:?}"
        );
        let ip = status.network.map(|n| n.ip).unwrap_or_default();
        let prefix = h.layout().subnet.trim_end_matches("0/24");
        ensure!(
            ip.starts_with(prefix),
            "pod IP {ip:?} outside {}",
            h.layout().subnet
        );

        let kernel = h.container_config(
            "kernel",
            BUSYBOX_IMAGE,
            &[
                "sh",
                "-c",
                "cat /proc/version; echo dmesg-start; dmesg; echo to stderr >&2; exit 3",
            ],
        );
        let kernel_id = h.start_container(&pod, &kernel).await?;
        let exited = h
            .cri()
            .wait_container_exited(&kernel_id, EXIT_TIMEOUT)
            .await?;
        let log = h.container_log(&pod, &kernel)?;
        ensure!(
            exited.exit_code == 3,
            "exit code {} instead of 3; log {log:?}",
            exited.exit_code
        );
        ensure_gvisor_kernel(log.lines().next().unwrap_or(""))?;
        let dmesg = log
            .split_once("dmesg-start\n")
            .map(|(_, rest)| rest)
            .unwrap_or("");
        ensure!(
            dmesg.contains("Starting gVisor"),
            "dmesg shows no gVisor messages: {log:?}"
        );
        ensure!(log.contains("to stderr\n"), "stderr not logged: {log:?}");

        // The processes of a container live in gVisor's kernel, not in the host's.
        let marker = format!("quark-marker-{}", h.layout().id);
        let looper = h.container_config(
            "looper",
            BUSYBOX_IMAGE,
            &["sh", "-c", "while true; do sleep 1; done", &marker],
        );
        let looper_id = h.start_container(&pod, &looper).await?;
        let ps = h
            .cri()
            .exec_sync(&looper_id, &["ps", "-o", "args"], 10)
            .await?;
        ensure!(
            text(&ps.stdout).contains(&marker),
            "the looping shell is not visible in its container: {ps:?}"
        );
        let on_host: Vec<(u32, String)> = cleanup::host_processes()
            .into_iter()
            .filter(|(_, cmdline)| cmdline.contains(&marker))
            .collect();
        ensure!(
            on_host.is_empty(),
            "container processes run on the host kernel: {on_host:?}"
        );

        let version = h
            .cri()
            .exec_sync(&looper_id, &["cat", "/proc/version"], 10)
            .await?;
        ensure!(version.exit_code == 0, "exec failed: {version:?}");
        ensure_gvisor_kernel(&text(&version.stdout))?;
        let release = h.cri().exec_sync(&looper_id, &["uname", "-r"], 10).await?;
        ensure!(
            text(&release.stdout) == "4.4.0",
            "uname -r in the pod: {release:?}"
        );

        h.remove_pod_and_check(&pod).await
    })
    .await
}

/// Typed into the terminal of an exec'd shell.
const TERMINAL_SCRIPT: &[u8] =
    b"test -t 0 && echo terminal-$((1+1)); i=0; while [ \"$(stty size)\" != \"$((10*2)) $((45*2))\" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done; stty size; echo tty-ok-$((6*7)); exit 3\n";

#[tokio::test]
async fn exec_terminal_stats_and_stop() -> Result<()> {
    Harness::start_with_quark_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("gvisor-1", KUASAR_QUARK_HANDLER).await?;
            // Exits 7 on SIGTERM, within a second of receiving it.
            let shell = h.container_config(
                "shell",
                BUSYBOX_IMAGE,
                &[
                    "sh",
                    "-c",
                    "trap 'exit 7' TERM; while true; do sleep 1; done",
                ],
            );
            let shell_id = h.start_container(&pod, &shell).await?;
            let running = h.cri().container_status(&shell_id).await?;
            ensure!(
                running.state == ContainerState::ContainerRunning as i32,
                "shell not running: {running:?}"
            );

            let exec = h.cri().exec_sync(&shell_id, &["hostname"], 10).await?;
            ensure!(
                exec.exit_code == 0 && text(&exec.stdout) == "gvisor-1",
                "hostname: {exec:?}"
            );
            let exec = h
                .cri()
                .exec_sync(
                    &shell_id,
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
                &shell_id,
                &["sh"],
                (90, 20),
                TERMINAL_SCRIPT,
                EXIT_TIMEOUT,
            )
            .await?;
            // gVisor names no device for a terminal (`tty` says "not a tty"); `test -t` asks
            // the kernel whether stdin is one. The terminal echoes the input, so only the
            // arithmetic's result proves that the shell ran the command.
            ensure!(
                output.contains("terminal-2"),
                "stdin of the exec is no terminal: {output:?}"
            );
            ensure!(
                output.contains("20 90"),
                "terminal size not applied: {output:?}"
            );
            ensure!(
                output.contains("tty-ok-42"),
                "command output missing: {output:?}"
            );
            ensure!(
                status.contains("NonZeroExitCode") && status.contains("\"3\""),
                "exit status {status:?}"
            );

            let stats = h.cri().container_stats(&shell_id).await?;
            let memory = stats
                .memory
                .as_ref()
                .and_then(|m| m.working_set_bytes.as_ref())
                .map(|v| v.value)
                .unwrap_or(0);
            ensure!(memory > 0, "no memory usage reported: {stats:?}");
            ensure!(stats.cpu.is_some(), "no cpu usage reported: {stats:?}");

            h.cri().stop_container(&shell_id, 10).await?;
            let stopped = h.cri().container_status(&shell_id).await?;
            ensure!(
                stopped.state == ContainerState::ContainerExited as i32 && stopped.exit_code == 7,
                "shell after stop: state {} exit code {} (7 when SIGTERM reached its trap)",
                kuasar_tests::cri::state_name(stopped.state),
                stopped.exit_code
            );

            h.remove_pod_and_check(&pod).await
        })
        .await
}

#[tokio::test]
async fn missing_command_fails_clearly_and_the_pod_keeps_running() -> Result<()> {
    Harness::start_with_quark_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("gvisor-2", KUASAR_QUARK_HANDLER).await?;
            let healthy = h.container_config("healthy", BUSYBOX_IMAGE, &["sleep", "3600"]);
            let healthy_id = h.start_container(&pod, &healthy).await?;

            let broken = h.container_config("broken", BUSYBOX_IMAGE, &["/no/such/binary"]);
            let err = h
                .start_container(&pod, &broken)
                .await
                .err()
                .context("a container with a missing command started")?;
            let message = format!("{err:#}");
            ensure!(
                message.contains("/no/such/binary"),
                "error does not name the command: {message}"
            );

            let status = h.cri().pod_status(&pod.id).await?;
            ensure!(
                status.state == PodSandboxState::SandboxReady as i32,
                "pod not ready after a failed container"
            );
            let running = h.cri().container_status(&healthy_id).await?;
            ensure!(
                running.state == ContainerState::ContainerRunning as i32,
                "neighbour stopped: {running:?}"
            );
            let exec = h.cri().exec_sync(&healthy_id, &["true"], 10).await?;
            ensure!(exec.exit_code == 0, "exec in the neighbour: {exec:?}");

            let after = h.container_config("after", BUSYBOX_IMAGE, &["cat", "/proc/version"]);
            let after_id = h.start_container(&pod, &after).await?;
            let exited = h
                .cri()
                .wait_container_exited(&after_id, EXIT_TIMEOUT)
                .await?;
            ensure!(
                exited.exit_code == 0,
                "later container exit code {}",
                exited.exit_code
            );
            ensure_gvisor_kernel(h.container_log(&pod, &after)?.trim())?;

            h.remove_pod_and_check(&pod).await
        })
        .await
}

#[tokio::test]
async fn missing_runsc_binary_fails_the_pod_with_its_path() -> Result<()> {
    let runsc = PathBuf::from("/nonexistent/kuasar/runsc");
    Harness::start_with(HarnessOptions {
        quark_sandboxer: true,
        quark_sandboxer_config: Some(QuarkSettings::with_runsc(runsc.clone())),
        ..Default::default()
    })
    .await?
    .run(async |h: &Harness| {
        let err = h
            .run_pod("no-runsc", KUASAR_QUARK_HANDLER)
            .await
            .err()
            .context("a pod ran with a missing runsc binary")?;
        let message = format!("{err:#}");
        ensure!(
            message.contains(&runsc.display().to_string()),
            "error does not name {}: {message}",
            runsc.display()
        );

        let pid = h.quark_sandboxer_pid().context("no quark sandboxer")?;
        ensure!(
            process_alive(pid),
            "the quark sandboxer died after a failed pod"
        );
        let pods = h.cri().list_pods().await?;
        ensure!(pods.is_empty(), "the failed pod is still listed: {pods:?}");
        h.wait_for_no_leftovers(CLEANUP_TIMEOUT)
            .await
            .context("after the failed pod")
    })
    .await
}

#[tokio::test]
async fn killed_runsc_sandbox_ends_the_pod_and_its_containers() -> Result<()> {
    Harness::start_with_quark_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("gvisor-3", KUASAR_QUARK_HANDLER).await?;
            let mut container_ids = Vec::new();
            for name in ["first", "second"] {
                let config = h.container_config(name, BUSYBOX_IMAGE, &["sleep", "3600"]);
                container_ids.push(h.start_container(&pod, &config).await?);
            }

            let sandbox = runsc_sandbox_pid(h, &pod).await?;
            cleanup::signal(sandbox, libc::SIGKILL)?;

            let deadline = Instant::now() + DEATH_NOTICE_TIMEOUT;
            loop {
                let status = h.cri().pod_status(&pod.id).await?;
                if status.state == PodSandboxState::SandboxNotready as i32 {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "pod still ready {DEATH_NOTICE_TIMEOUT:?} after its runsc sandbox \
                     {sandbox} was killed"
                );
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            for id in &container_ids {
                let deadline = deadline.saturating_duration_since(Instant::now());
                let exited = h
                    .cri()
                    .wait_container_exited(id, deadline)
                    .await
                    .context("after the runsc sandbox was killed")?;
                ensure!(
                    exited.exit_code != 0,
                    "container {id} of the killed sandbox exited with 0"
                );
            }

            h.remove_pod_and_check(&pod).await?;

            // The sandboxer goes on serving new pods.
            let next = h.run_pod("gvisor-4", KUASAR_QUARK_HANDLER).await?;
            let check = h.container_config("check", BUSYBOX_IMAGE, &["cat", "/proc/version"]);
            let check_id = h.start_container(&next, &check).await?;
            let exited = h
                .cri()
                .wait_container_exited(&check_id, EXIT_TIMEOUT)
                .await?;
            ensure!(
                exited.exit_code == 0,
                "container of the next pod exited with {}",
                exited.exit_code
            );
            ensure_gvisor_kernel(h.container_log(&next, &check)?.trim())?;
            h.remove_pod_and_check(&next).await
        })
        .await
}

#[tokio::test]
async fn host_network_pod_runs_and_removed_pods_leave_nothing() -> Result<()> {
    Harness::start_with_quark_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let mut config = h.pod_config("gvisor-host")?;
            config
                .linux
                .get_or_insert_default()
                .security_context
                .get_or_insert_with(LinuxSandboxSecurityContext::default)
                .namespace_options = Some(NamespaceOption {
                network: NamespaceMode::Node as i32,
                ..Default::default()
            });
            let id = h.cri().run_pod(&config, KUASAR_QUARK_HANDLER).await?;
            let host_pod = Pod { id, config };
            let other = h.run_pod("gvisor-5", KUASAR_QUARK_HANDLER).await?;

            let version = h.container_config("version", BUSYBOX_IMAGE, &["cat", "/proc/version"]);
            let version_id = h.start_container(&host_pod, &version).await?;
            let exited = h
                .cri()
                .wait_container_exited(&version_id, EXIT_TIMEOUT)
                .await?;
            let log = h.container_log(&host_pod, &version)?;
            ensure!(
                exited.exit_code == 0,
                "host-network container exited with {}: {log:?}",
                exited.exit_code
            );
            ensure_gvisor_kernel(log.trim())?;

            let sleeper = h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
            h.start_container(&other, &sleeper).await?;

            // Running pods show in every part of the leftovers check that covers them.
            let left = h.leftovers()?;
            ensure!(
                !left.runsc_state.is_empty(),
                "runsc state of running pods not seen:\n{left}"
            );
            ensure!(
                !left.processes.is_empty(),
                "processes of running pods not seen:\n{left}"
            );

            h.cri().stop_pod(&host_pod.id).await?;
            h.cri().remove_pod(&host_pod.id).await?;
            let pods: Vec<String> = h
                .cri()
                .list_pods()
                .await?
                .into_iter()
                .map(|p| p.id)
                .collect();
            ensure!(pods == [other.id.clone()], "pods after removal: {pods:?}");
            h.remove_pod_and_check(&other).await
        })
        .await
}

/// The pid of the runsc sandbox (`runsc-sandbox … boot … <pod id>`) of `pod`, a process of
/// this run; waits for it to show up.
async fn runsc_sandbox_pid(h: &Harness, pod: &Pod) -> Result<u32> {
    let deadline = Instant::now() + DEATH_NOTICE_TIMEOUT;
    loop {
        let found: Vec<(u32, String)> = cleanup::run_processes(h.layout(), &[])
            .into_iter()
            .filter(|(_, cmdline)| {
                let mut args = cmdline.split(' ');
                let sandbox = args.next().is_some_and(|a| a.ends_with("runsc-sandbox"))
                    || args.any(|a| a == "boot");
                sandbox && cmdline.contains(&pod.id)
            })
            .collect();
        match found.as_slice() {
            [(pid, _)] => return Ok(*pid),
            [] if Instant::now() < deadline => tokio::time::sleep(POLL_INTERVAL).await,
            [] => bail!("no runsc sandbox process of pod {} found", pod.id),
            _ => bail!(
                "several runsc sandbox processes of pod {}: {found:?}",
                pod.id
            ),
        }
    }
}
