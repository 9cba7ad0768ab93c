//! Adversarial tests of the quark sandboxer (gVisor's runsc): helper processes of runsc
//! killed with SIGKILL, many containers and pods at once, containers that end before
//! anyone waits, exec edge cases, a pod stopped while its container starts and bad
//! `[quark]` settings. Every test ends by checking that nothing of the run is left on the
//! host. Needs root.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1::{
    ContainerConfig, ContainerState, LinuxContainerSecurityContext, LinuxSandboxSecurityContext,
    NamespaceMode, NamespaceOption, PodSandboxState,
};
use kuasar_tests::cleanup;
use kuasar_tests::cleanup::process_alive;
use kuasar_tests::cri::state_name;
use kuasar_tests::cri::text;
use kuasar_tests::harness::{wait_until, within};
use kuasar_tests::images::BUSYBOX_IMAGE;
use kuasar_tests::{Harness, HarnessOptions, Pod, QuarkSettings, KUASAR_QUARK_HANDLER};

/// How long a container may take to exit once it should.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a single CRI call may take before it counts as hanging.
const CALL_TIMEOUT: Duration = Duration::from_secs(45);

/// How long the sandboxer may take to notice that a process of runsc died.
const NOTICE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long cleaning up after a pod that failed to start may go on after the failure.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A shell that exits 7 within a second of SIGTERM: its exit code proves that it was still
/// running when it was stopped.
const TRAPPING_SHELL: &str = "trap 'exit 7' TERM; while true; do sleep 1; done";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Fails with "`what` hangs" when `future` does not finish within [`CALL_TIMEOUT`].
async fn bounded<T>(what: &str, future: impl std::future::Future<Output = T>) -> Result<T> {
    within(CALL_TIMEOUT, what, future).await
}

/// Processes of this run (found by their command line or working directory under the
/// run directory) whose arguments satisfy `keep`.
fn run_processes_where(h: &Harness, keep: impl Fn(&[&str]) -> bool) -> Vec<(u32, String)> {
    cleanup::run_processes(h.layout(), &[])
        .into_iter()
        .filter(|(_, cmdline)| keep(&cmdline.split(' ').collect::<Vec<_>>()))
        .collect()
}

/// Polls until at least one process of this run satisfies `keep`; returns them all.
async fn wait_for_processes(
    h: &Harness,
    what: &str,
    keep: impl Fn(&[&str]) -> bool,
) -> Result<Vec<(u32, String)>> {
    let deadline = Instant::now() + NOTICE_TIMEOUT;
    loop {
        let found = run_processes_where(h, &keep);
        if !found.is_empty() {
            return Ok(found);
        }
        ensure!(
            Instant::now() < deadline,
            "no {what} among the processes of the run within {NOTICE_TIMEOUT:?}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Whether `pid` still has an entry in `/proc`: alive, or a zombie nobody reaped.
fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A runsc gofer: `runsc-gofer … gofer --bundle …`.
fn is_gofer(args: &[&str]) -> bool {
    args.first().is_some_and(|a| a.ends_with("runsc-gofer")) || args.contains(&"gofer")
}

/// `runsc … wait <container id>`, the sandboxer's watch on a running container.
fn is_runsc_wait_for(args: &[&str], container_id: &str) -> bool {
    args.contains(&"wait") && args.last() == Some(&container_id)
}

/// `runsc … start <container id>`.
fn is_runsc_start_for(args: &[&str], container_id: &str) -> bool {
    args.contains(&"start") && args.last() == Some(&container_id)
}

/// A host-side `runsc … exec … <container id>` process.
fn is_runsc_exec_for(args: &[&str], container_id: &str) -> bool {
    args.contains(&"exec") && args.contains(&container_id)
}

async fn wait_pod_state(h: &Harness, pod: &Pod, state: PodSandboxState) -> Result<()> {
    let deadline = Instant::now() + NOTICE_TIMEOUT;
    loop {
        let status = h.cri().pod_status(&pod.id).await?;
        if status.state == state as i32 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "pod {} not {} within {NOTICE_TIMEOUT:?}",
            pod.id,
            state.as_str_name()
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Runs pod `name` whose containers get the PID namespace `mode` (as the kubelet asks for it:
/// `Container` by default, `Pod` for a pod with `shareProcessNamespace`).
async fn run_pod_with_pid_mode(h: &Harness, name: &str, mode: NamespaceMode) -> Result<Pod> {
    let mut config = h.pod_config(name)?;
    config
        .linux
        .get_or_insert_default()
        .security_context
        .get_or_insert_with(LinuxSandboxSecurityContext::default)
        .namespace_options = Some(NamespaceOption {
        pid: mode as i32,
        ..Default::default()
    });
    let id = h.cri().run_pod(&config, KUASAR_QUARK_HANDLER).await?;
    Ok(Pod { id, config })
}

/// Container `name` running `script` in the PID namespace `mode`.
fn shell_container(h: &Harness, name: &str, script: &str, mode: NamespaceMode) -> ContainerConfig {
    let mut config = h.container_config(name, BUSYBOX_IMAGE, &["sh", "-c", script]);
    config
        .linux
        .get_or_insert_default()
        .security_context
        .get_or_insert_with(LinuxContainerSecurityContext::default)
        .namespace_options = Some(NamespaceOption {
        pid: mode as i32,
        ..Default::default()
    });
    config
}

/// Polls until the log of container `config` in `pod` is `expected`.
async fn wait_for_log(
    h: &Harness,
    pod: &Pod,
    config: &ContainerConfig,
    expected: &str,
) -> Result<()> {
    let deadline = Instant::now() + NOTICE_TIMEOUT;
    loop {
        let log = h.container_log(pod, config).unwrap_or_default();
        if log == expected {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "container log {log:?} instead of {expected:?} after {NOTICE_TIMEOUT:?}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Stops container `id` with a 10 s grace period and returns its exit code.
async fn stop_and_exit_code(h: &Harness, id: &str) -> Result<i32> {
    bounded("StopContainer", h.cri().stop_container(id, 10)).await??;
    let status = h.cri().wait_container_exited(id, EXIT_TIMEOUT).await?;
    Ok(status.exit_code)
}

/// Runs a pod whose only container reads the application kernel's version, and checks that
/// it exits 0: the sandboxer still serves new pods.
async fn next_pod_works(h: &Harness, name: &str) -> Result<()> {
    let pod = h.run_pod(name, KUASAR_QUARK_HANDLER).await?;
    let check = h.container_config("check", BUSYBOX_IMAGE, &["cat", "/proc/version"]);
    let id = h.start_container(&pod, &check).await?;
    let exited = h.cri().wait_container_exited(&id, EXIT_TIMEOUT).await?;
    let log = h.container_log(&pod, &check)?;
    ensure!(
        exited.exit_code == 0 && log.starts_with("Linux version 4.4.0 "),
        "container of pod {name}: exit {} log {log:?}",
        exited.exit_code
    );
    h.remove_pod_and_check(&pod).await
}

/// Starts a harness with only the quark sandboxer, given `settings` as its `[quark]` table.
async fn harness_with(settings: QuarkSettings) -> Result<Harness> {
    Harness::start_with(HarnessOptions {
        quark_sandboxer: true,
        quark_sandboxer_config: Some(settings),
        ..Default::default()
    })
    .await
}

/// Checks that a pod fails to run under `settings` with an error containing `culprit`,
/// that the sandboxer survives it, and that nothing of the failed pod is left.
async fn pod_fails_naming(settings: QuarkSettings, culprit: &str) -> Result<()> {
    harness_with(settings)
        .await?
        .run(async |h: &Harness| {
            let err = bounded(
                "RunPodSandbox",
                h.run_pod("bad-config", KUASAR_QUARK_HANDLER),
            )
            .await?
            .err()
            .context("a pod ran with bad [quark] settings")?;
            let message = format!("{err:#}");
            ensure!(
                message.contains(culprit),
                "the error does not name {culprit:?}: {message}"
            );

            let pid = h.quark_sandboxer_pid().context("no quark sandboxer")?;
            ensure!(process_alive(pid), "the quark sandboxer died");
            let pods = h.cri().list_pods().await?;
            ensure!(pods.is_empty(), "the failed pod is still listed: {pods:?}");
            h.wait_for_no_leftovers(CLEANUP_TIMEOUT)
                .await
                .context("after the failed pod")
        })
        .await
}

// ---------------------------------------------------------------------------------------
// Processes of runsc killed with SIGKILL
// ---------------------------------------------------------------------------------------

/// The gofers serve a pod's file systems to the application kernel. With them killed, the
/// pod must either keep working or report NOTREADY with its container exited; never
/// READY with a container that cannot run a command. Removal must still clean up.
#[tokio::test]
async fn killed_gofers_never_leave_a_ready_pod_that_does_not_work() -> Result<()> {
    Harness::start_with_quark_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("gofer-0", KUASAR_QUARK_HANDLER).await?;
            let shell = h.container_config("shell", BUSYBOX_IMAGE, &["sh", "-c", TRAPPING_SHELL]);
            let shell_id = h.start_container(&pod, &shell).await?;

            let gofers = wait_for_processes(h, "gofer of the pod", |args| {
                let cmdline = args.join(" ");
                is_gofer(args) && (cmdline.contains(&pod.id) || cmdline.contains(&shell_id))
            })
            .await?;
            eprintln!("killing gofers {gofers:?}");
            for (pid, _) in &gofers {
                cleanup::signal(*pid, libc::SIGKILL)?;
            }
            wait_until(
                "the killed gofers are reaped",
                NOTICE_TIMEOUT,
                || gofers.iter().all(|(pid, _)| !process_exists(*pid)),
            )
            .await?;

            let probe = bounded(
                "ExecSync after the gofers were killed",
                h.cri().exec_sync(
                    &shell_id,
                    &["sh", "-c", "cat /etc/hostname && ls /bin/busybox"],
                    10,
                ),
            )
            .await?;
            let works = probe.as_ref().is_ok_and(|r| {
                r.exit_code == 0 && text(&r.stdout) == "gofer-0\n/bin/busybox"
            });
            let status = h.cri().pod_status(&pod.id).await?;
            eprintln!(
                "after the gofers died: exec {probe:?}, pod {}",
                PodSandboxState::try_from(status.state)
                    .map(|s| s.as_str_name())
                    .unwrap_or("?")
            );
            if works {
                // A working pod keeps its container running until it is stopped.
                let code = stop_and_exit_code(h, &shell_id).await?;
                ensure!(
                    code == 7,
                    "the container of a working pod exited {code} on SIGTERM, not 7"
                );
            } else {
                wait_pod_state(h, &pod, PodSandboxState::SandboxNotready)
                    .await
                    .with_context(|| {
                        format!("the pod stays READY although its container cannot run a command ({probe:?})")
                    })?;
                h.cri()
                    .wait_container_exited(&shell_id, NOTICE_TIMEOUT)
                    .await
                    .context("the pod is NOTREADY but its container still runs")?;
            }

            bounded("removing the pod", h.remove_pod_and_check(&pod)).await??;
            let pid = h.quark_sandboxer_pid().context("no quark sandboxer")?;
            ensure!(process_alive(pid), "the quark sandboxer died");
            next_pod_works(h, "gofer-1").await
        })
        .await
}

/// The sandboxer learns a container's exit from `runsc wait`. That helper dying (the OOM
/// killer, an operator's mistake) is not the container's exit: the container runs on, and
/// its real exit code must be the one reported.
#[tokio::test]
async fn killed_runsc_wait_does_not_fake_the_exit_of_a_running_container() -> Result<()> {
    Harness::start_with_quark_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("waiter-0", KUASAR_QUARK_HANDLER).await?;
            let shell = h.container_config("shell", BUSYBOX_IMAGE, &["sh", "-c", TRAPPING_SHELL]);
            let shell_id = h.start_container(&pod, &shell).await?;

            let waits = wait_for_processes(h, "runsc wait of the container", |args| {
                is_runsc_wait_for(args, &shell_id)
            })
            .await?;
            for (pid, _) in &waits {
                cleanup::signal(*pid, libc::SIGKILL)?;
            }
            wait_until("the killed runsc wait is reaped", NOTICE_TIMEOUT, || {
                waits.iter().all(|(pid, _)| !process_exists(*pid))
            })
            .await?;

            let exec = bounded(
                "ExecSync",
                h.cri().exec_sync(&shell_id, &["echo", "still-here"], 10),
            )
            .await?;
            let status = h.cri().container_status(&shell_id).await?;
            ensure!(
                exec.as_ref().is_ok_and(|r| text(&r.stdout) == "still-here"),
                "the container is reported {} (exit code {}) and exec gives {exec:?} after its \
                 runsc wait was killed, while its shell still runs",
                state_name(status.state),
                status.exit_code
            );
            let code = stop_and_exit_code(h, &shell_id).await?;
            ensure!(
                code == 7,
                "exit code {code} reported for a shell that exits 7 on SIGTERM"
            );
            h.remove_pod_and_check(&pod).await
        })
        .await
}

/// An exec inside the kernel is watched by its host-side `runsc exec`. That helper dying
/// must not leave the exec'd process running unseen once its exit has been reported.
#[tokio::test]
async fn killed_runsc_exec_leaves_no_unseen_process_in_the_container() -> Result<()> {
    Harness::start_with_quark_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("exec-helper", KUASAR_QUARK_HANDLER).await?;
            let shell = h.container_config("shell", BUSYBOX_IMAGE, &["sh", "-c", TRAPPING_SHELL]);
            let id = h.start_container(&pod, &shell).await?;

            let cri = h.cri().clone();
            let exec_id = id.clone();
            let exec =
                tokio::spawn(async move { cri.exec_sync(&exec_id, &["sleep", "654"], 120).await });
            // Once the process runs in the kernel, its helper is the only runsc exec left.
            let deadline = Instant::now() + NOTICE_TIMEOUT;
            loop {
                let ps = h.cri().exec_sync(&id, &["ps", "-o", "args"], 10).await?;
                if text(&ps.stdout).contains("sleep 654") {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "the exec does not run: {}",
                    text(&ps.stdout)
                );
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            let helpers = wait_for_processes(h, "runsc exec of the exec", |args| {
                is_runsc_exec_for(args, &id)
            })
            .await?;
            eprintln!("killing {helpers:?}");
            for (pid, _) in &helpers {
                cleanup::signal(*pid, libc::SIGKILL)?;
            }
            let exec = bounded("ExecSync whose runsc exec was killed", exec)
                .await?
                .context("the exec task panicked")?;
            eprintln!("exec after its runsc exec was killed: {exec:?}");

            let ps = h.cri().exec_sync(&id, &["ps", "-o", "args"], 10).await?;
            ensure!(
                !text(&ps.stdout).contains("sleep 654"),
                "ExecSync answered {exec:?}, yet the exec'd process still runs in the \
                 container:\n{}",
                text(&ps.stdout)
            );
            let code = stop_and_exit_code(h, &id).await?;
            ensure!(code == 7, "the shell exited {code} on SIGTERM, not 7");
            h.remove_pod_and_check(&pod).await
        })
        .await
}

// ---------------------------------------------------------------------------------------
// Many at once
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn six_containers_started_concurrently_in_one_pod_all_run() -> Result<()> {
    const COUNT: usize = 6;
    Harness::start_with_quark_sandboxer()
        .await?
        .run(async |h: &Harness| {
            // A PID namespace per container, the kubelet's default: no container is another's
            // PID 1 (see the shared PID namespace test for that case).
            let mode = NamespaceMode::Container;
            let pod = run_pod_with_pid_mode(h, "crowd-0", mode).await?;
            let configs: Vec<_> = (0..COUNT)
                .map(|n| {
                    let script = format!("echo ready-{n}; {TRAPPING_SHELL}");
                    shell_container(h, &format!("c{n}"), &script, mode)
                })
                .collect();

            let mut tasks = tokio::task::JoinSet::new();
            for (n, config) in configs.iter().enumerate() {
                let (cri, pod) = (h.cri().clone(), pod.clone());
                let config = config.clone();
                tasks.spawn(async move {
                    let id = cri.create_container(&pod.id, &config, &pod.config).await?;
                    cri.start_container(&id).await?;
                    anyhow::Ok((n, id))
                });
            }
            let mut ids = vec![String::new(); COUNT];
            while let Some(joined) =
                bounded("concurrent container starts", tasks.join_next()).await?
            {
                let (n, id) = joined??;
                ids[n] = id;
            }

            for (n, id) in ids.iter().enumerate() {
                let status = h.cri().container_status(id).await?;
                ensure!(
                    status.state == ContainerState::ContainerRunning as i32,
                    "container c{n} is {} (exit code {})",
                    state_name(status.state),
                    status.exit_code
                );
            }
            let mut execs = tokio::task::JoinSet::new();
            for (n, id) in ids.iter().enumerate() {
                let (cri, id) = (h.cri().clone(), id.clone());
                execs.spawn(async move {
                    let hostname = cri.exec_sync(&id, &["hostname"], 10).await?;
                    anyhow::Ok((n, hostname))
                });
            }
            while let Some(joined) = bounded("concurrent execs", execs.join_next()).await? {
                let (n, hostname) = joined??;
                ensure!(
                    hostname.exit_code == 0 && text(&hostname.stdout) == "crowd-0",
                    "exec in c{n}: {hostname:?}"
                );
            }
            for (n, config) in configs.iter().enumerate() {
                wait_for_log(h, &pod, config, &format!("ready-{n}\n")).await?;
            }

            let mut stops = tokio::task::JoinSet::new();
            for (n, id) in ids.iter().enumerate() {
                let (cri, id) = (h.cri().clone(), id.clone());
                stops.spawn(async move {
                    cri.stop_container(&id, 10).await?;
                    let status = cri.wait_container_exited(&id, EXIT_TIMEOUT).await?;
                    anyhow::Ok((n, status.exit_code))
                });
            }
            while let Some(joined) = bounded("concurrent stops", stops.join_next()).await? {
                let (n, code) = joined??;
                ensure!(code == 7, "c{n} exited {code} on SIGTERM, not 7");
            }
            h.remove_pod_and_check(&pod).await
        })
        .await
}

/// In a pod whose containers share one PID namespace (`shareProcessNamespace`), PID 1 of
/// that namespace is the pod's, as the pause process is on any other runtime: one container
/// exiting must not take its neighbours with it.
#[tokio::test]
async fn shared_pid_namespace_survives_the_exit_of_its_first_container() -> Result<()> {
    Harness::start_with_quark_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let mode = NamespaceMode::Pod;
            let pod = run_pod_with_pid_mode(h, "shared-pid", mode).await?;
            let first = shell_container(h, "first", TRAPPING_SHELL, mode);
            let first_id = h.start_container(&pod, &first).await?;
            let second = shell_container(h, "second", TRAPPING_SHELL, mode);
            let second_id = h.start_container(&pod, &second).await?;

            let ps = h
                .cri()
                .exec_sync(&second_id, &["ps", "-o", "pid,args"], 10)
                .await?;
            let shells = text(&ps.stdout).matches("trap").count();
            ensure!(
                shells == 2,
                "the containers do not share a PID namespace: {}",
                text(&ps.stdout)
            );

            let code = stop_and_exit_code(h, &first_id).await?;
            ensure!(code == 7, "the first shell exited {code} on SIGTERM, not 7");
            let status = h.cri().container_status(&second_id).await?;
            ensure!(
                status.state == ContainerState::ContainerRunning as i32,
                "stopping the first container of the pod ended the second: {} with exit code \
                 {} (137: SIGKILL)",
                state_name(status.state),
                status.exit_code
            );
            let code = stop_and_exit_code(h, &second_id).await?;
            ensure!(
                code == 7,
                "the second shell exited {code} on SIGTERM, not 7"
            );
            h.remove_pod_and_check(&pod).await
        })
        .await
}

#[tokio::test]
async fn ten_pods_started_concurrently_all_run_and_are_removed() -> Result<()> {
    const COUNT: usize = 10;
    Harness::start_with_quark_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let mut tasks = tokio::task::JoinSet::new();
            for n in 0..COUNT {
                let name = format!("many-{n}");
                let config = h.pod_config(&name)?;
                let container = h.container_config(
                    "main",
                    BUSYBOX_IMAGE,
                    &["sh", "-c", &format!("hostname; {TRAPPING_SHELL}")],
                );
                let cri = h.cri().clone();
                tasks.spawn(async move {
                    let id = cri.run_pod(&config, KUASAR_QUARK_HANDLER).await?;
                    let pod = Pod { id, config };
                    let cid = cri
                        .create_container(&pod.id, &container, &pod.config)
                        .await?;
                    cri.start_container(&cid).await?;
                    anyhow::Ok((name, pod, container, cid))
                });
            }
            let mut started = Vec::new();
            let mut failures = Vec::new();
            while let Some(joined) = bounded("concurrent pods", tasks.join_next()).await? {
                match joined? {
                    Ok(pod) => started.push(pod),
                    Err(err) => failures.push(format!("{err:#}")),
                }
            }
            ensure!(
                failures.is_empty(),
                "{} of {COUNT} pods failed:\n{}",
                failures.len(),
                failures.join("\n")
            );

            let mut addresses = std::collections::BTreeSet::new();
            for (name, pod, container, cid) in &started {
                let status = h.cri().pod_status(&pod.id).await?;
                ensure!(
                    status.state == PodSandboxState::SandboxReady as i32,
                    "pod {name} not ready"
                );
                addresses.insert(status.network.map(|n| n.ip).unwrap_or_default());
                let status = h.cri().container_status(cid).await?;
                ensure!(
                    status.state == ContainerState::ContainerRunning as i32,
                    "container of pod {name} is {} (exit code {})",
                    state_name(status.state),
                    status.exit_code
                );
                wait_for_log(h, pod, container, &format!("{name}\n")).await?;
            }
            ensure!(
                addresses.len() == COUNT,
                "pods share addresses: {addresses:?}"
            );

            let mut removals = tokio::task::JoinSet::new();
            for (name, pod, _, _) in started {
                let cri = h.cri().clone();
                removals.spawn(async move {
                    cri.stop_pod(&pod.id).await?;
                    cri.remove_pod(&pod.id).await.context(name)
                });
            }
            while let Some(joined) = bounded("concurrent removals", removals.join_next()).await? {
                joined??;
            }
            ensure!(h.cri().list_pods().await?.is_empty(), "pods remain");
            ensure!(
                h.cri().list_containers(None).await?.is_empty(),
                "containers remain"
            );
            let left = h.leftovers()?;
            ensure!(left.is_empty(), "after the concurrent removal:\n{left}");
            Ok(())
        })
        .await
}

// ---------------------------------------------------------------------------------------
// Containers that end at once, and what is asked of them after
// ---------------------------------------------------------------------------------------

/// Containers that exit before containerd's Wait could be answered report their exact code
/// and full output; asking an exited container for an exec or its stats gets an answer,
/// not a hang; removing them leaves no `runsc wait` behind.
#[tokio::test]
async fn containers_that_exit_at_once_report_exact_codes_and_output() -> Result<()> {
    Harness::start_with_quark_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("quick-0", KUASAR_QUARK_HANDLER).await?;
            let cases: [(&str, &str, i32); 4] = [
                ("zero", "echo out-zero", 0),
                ("code", "echo out-code; echo err-code >&2; exit 42", 42),
                ("killed", "echo out-killed; kill -9 $$", 137),
                ("true", "true", 0),
            ];
            let mut exited = Vec::new();
            for (name, script, expected) in cases {
                let config = h.container_config(name, BUSYBOX_IMAGE, &["sh", "-c", script]);
                let id =
                    bounded("starting a container", h.start_container(&pod, &config)).await??;
                let status = h.cri().wait_container_exited(&id, EXIT_TIMEOUT).await?;
                let log = h.container_log(&pod, &config)?;
                ensure!(
                    status.exit_code == expected,
                    "{name} ({script}) exited {} instead of {expected}; log {log:?}",
                    status.exit_code
                );
                if name != "true" {
                    ensure!(
                        log.contains(&format!("out-{name}\n")),
                        "{name}: output lost: {log:?}"
                    );
                }
                if name == "code" {
                    ensure!(log.contains("err-code\n"), "stderr lost: {log:?}");
                }
                exited.push(id);
            }

            let id = &exited[0];
            let exec = bounded(
                "ExecSync into an exited container",
                h.cri().exec_sync(id, &["echo", "hi"], 10),
            )
            .await?;
            let err = exec
                .err()
                .context("exec into an exited container succeeded")?;
            let message = format!("{err:#}").to_lowercase();
            ensure!(
                message.contains("exited") || message.contains("not running"),
                "unclear error for exec into an exited container: {message}"
            );
            let stats = bounded("ContainerStats of an exited container", async {
                h.cri().container_stats(id).await
            })
            .await?;
            eprintln!("stats of an exited container: {stats:?}");

            for id in &exited {
                bounded("RemoveContainer", h.cri().remove_container(id)).await??;
                let waits = run_processes_where(h, |args| is_runsc_wait_for(args, id));
                ensure!(
                    waits.is_empty(),
                    "runsc wait of removed container {id} still runs: {waits:?}"
                );
            }
            let pid = h.quark_sandboxer_pid().context("no quark sandboxer")?;
            let zombies: Vec<u32> = std::fs::read_dir("/proc")?
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|stat| {
                        let rest = &stat[stat.rfind(')').unwrap_or(0) + 1..];
                        let fields: Vec<&str> = rest.split_whitespace().collect();
                        fields.first() == Some(&"Z")
                            && fields.get(1).and_then(|ppid| ppid.parse::<u32>().ok()) == Some(pid)
                    })
                })
                .collect();
            ensure!(
                zombies.is_empty(),
                "zombie children of the sandboxer: {zombies:?}"
            );
            h.remove_pod_and_check(&pod).await
        })
        .await
}

/// A container created but never started: StopContainer and RemoveContainer work on it,
/// the pod goes on taking containers, and a pod holding another such container stops and
/// is removed twice without error or leftovers.
#[tokio::test]
async fn created_but_never_started_containers_stop_and_remove_cleanly() -> Result<()> {
    Harness::start_with_quark_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("idle-0", KUASAR_QUARK_HANDLER).await?;
            let idle = h.container_config("idle", BUSYBOX_IMAGE, &["sleep", "3600"]);
            let idle_id = h
                .cri()
                .create_container(&pod.id, &idle, &pod.config)
                .await?;
            bounded(
                "StopContainer of a created container",
                h.cri().stop_container(&idle_id, 5),
            )
            .await??;
            let status = h.cri().container_status(&idle_id).await?;
            ensure!(
                status.state != ContainerState::ContainerRunning as i32,
                "a never started container runs after StopContainer"
            );
            bounded(
                "RemoveContainer of a created container",
                h.cri().remove_container(&idle_id),
            )
            .await??;

            let after = h.container_config("after", BUSYBOX_IMAGE, &["echo", "after-idle"]);
            let after_id = h.start_container(&pod, &after).await?;
            let exited = h
                .cri()
                .wait_container_exited(&after_id, EXIT_TIMEOUT)
                .await?;
            let log = h.container_log(&pod, &after)?;
            ensure!(
                exited.exit_code == 0 && log == "after-idle\n",
                "the next container exited {} with log {log:?}",
                exited.exit_code
            );

            let idle2 = h.container_config("idle2", BUSYBOX_IMAGE, &["sleep", "3600"]);
            h.cri()
                .create_container(&pod.id, &idle2, &pod.config)
                .await?;
            bounded("StopPodSandbox", h.cri().stop_pod(&pod.id)).await??;
            bounded("a second StopPodSandbox", h.cri().stop_pod(&pod.id)).await??;
            bounded("RemovePodSandbox", h.cri().remove_pod(&pod.id)).await??;
            bounded("a second RemovePodSandbox", h.cri().remove_pod(&pod.id)).await??;
            ensure!(h.cri().list_pods().await?.is_empty(), "pods remain");
            ensure!(
                h.cri().list_containers(None).await?.is_empty(),
                "containers remain"
            );
            let left = h.leftovers()?;
            ensure!(left.is_empty(), "after removing the pod:\n{left}");
            Ok(())
        })
        .await
}

// ---------------------------------------------------------------------------------------
// Exec edge cases
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn exec_of_a_missing_binary_names_it_and_the_container_is_unharmed() -> Result<()> {
    Harness::start_with_quark_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("exec-missing", KUASAR_QUARK_HANDLER).await?;
            let shell = h.container_config("shell", BUSYBOX_IMAGE, &["sh", "-c", TRAPPING_SHELL]);
            let shell_id = h.start_container(&pod, &shell).await?;
            let missing = "/no/such/exec-binary";
            let result = bounded(
                "ExecSync of a missing binary",
                h.cri().exec_sync(&shell_id, &[missing], 10),
            )
            .await?;
            match &result {
                Ok(response) => ensure!(
                    response.exit_code != 0 && text(&response.stderr).contains(missing),
                    "exec of a missing binary: {response:?}"
                ),
                Err(err) => ensure!(
                    format!("{err:#}").contains(missing),
                    "the error does not name the binary: {err:#}"
                ),
            }
            let fine = h.cri().exec_sync(&shell_id, &["echo", "fine"], 10).await?;
            ensure!(text(&fine.stdout) == "fine", "exec after: {fine:?}");
            let code = stop_and_exit_code(h, &shell_id).await?;
            ensure!(code == 7, "the shell exited {code} on SIGTERM, not 7");
            h.remove_pod_and_check(&pod).await
        })
        .await
}

/// Many ExecSyncs at once in one container: each gets its own output and exit code.
#[tokio::test]
async fn twelve_concurrent_execs_in_one_container_keep_their_output_and_codes() -> Result<()> {
    const COUNT: i32 = 12;
    Harness::start_with_quark_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("exec-crowd", KUASAR_QUARK_HANDLER).await?;
            let shell = h.container_config("shell", BUSYBOX_IMAGE, &["sh", "-c", TRAPPING_SHELL]);
            let id = h.start_container(&pod, &shell).await?;

            let mut execs = tokio::task::JoinSet::new();
            for n in 0..COUNT {
                let (cri, id) = (h.cri().clone(), id.clone());
                execs.spawn(async move {
                    let script = format!("echo out-{n}; echo err-{n} >&2; exit {n}");
                    let response = cri.exec_sync(&id, &["sh", "-c", &script], 20).await?;
                    anyhow::Ok((n, response))
                });
            }
            while let Some(joined) = bounded("concurrent execs", execs.join_next()).await? {
                let (n, response) = joined??;
                ensure!(
                    response.exit_code == n
                        && text(&response.stdout) == format!("out-{n}")
                        && text(&response.stderr) == format!("err-{n}"),
                    "exec {n}: {response:?}"
                );
            }
            wait_until("no host-side runsc exec is left", NOTICE_TIMEOUT, || {
                run_processes_where(h, |args| is_runsc_exec_for(args, &id)).is_empty()
            })
            .await?;
            let code = stop_and_exit_code(h, &id).await?;
            ensure!(code == 7, "the shell exited {code} on SIGTERM, not 7");
            h.remove_pod_and_check(&pod).await
        })
        .await
}

/// ExecSync's timeout makes containerd kill the exec: inside the kernel that is a signal
/// through runsc to the process's pid there. The process must go, with its host-side runsc.
#[tokio::test]
async fn exec_sync_timeout_kills_the_exec_inside_the_kernel() -> Result<()> {
    Harness::start_with_quark_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("exec-timeout", KUASAR_QUARK_HANDLER).await?;
            let shell = h.container_config("shell", BUSYBOX_IMAGE, &["sh", "-c", TRAPPING_SHELL]);
            let shell_id = h.start_container(&pod, &shell).await?;

            let began = Instant::now();
            let result = bounded(
                "ExecSync with a 2 s timeout",
                h.cri().exec_sync(&shell_id, &["sleep", "987"], 2),
            )
            .await?;
            let elapsed = began.elapsed();
            ensure!(
                elapsed < Duration::from_secs(15),
                "ExecSync with a 2 s timeout took {elapsed:?}"
            );
            if let Ok(response) = &result {
                ensure!(
                    response.exit_code != 0,
                    "a timed out exec succeeded: {response:?}"
                );
            }

            let deadline = Instant::now() + NOTICE_TIMEOUT;
            loop {
                let ps = h
                    .cri()
                    .exec_sync(&shell_id, &["ps", "-o", "args"], 10)
                    .await?;
                if !text(&ps.stdout).contains("sleep 987") {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "the timed out exec still runs {NOTICE_TIMEOUT:?} later: {}",
                    text(&ps.stdout)
                );
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            wait_until(
                "no host-side runsc exec of the container is left",
                NOTICE_TIMEOUT,
                || run_processes_where(h, |args| is_runsc_exec_for(args, &shell_id)).is_empty(),
            )
            .await?;

            let again = h.cri().exec_sync(&shell_id, &["echo", "again"], 10).await?;
            ensure!(text(&again.stdout) == "again", "exec after: {again:?}");
            let code = stop_and_exit_code(h, &shell_id).await?;
            ensure!(code == 7, "the shell exited {code} on SIGTERM, not 7");
            h.remove_pod_and_check(&pod).await
        })
        .await
}

/// A container that ignores SIGTERM is killed once StopContainer's grace period is over,
/// and an exec still running in it ends with it instead of keeping ExecSync waiting.
#[tokio::test]
async fn stopping_a_container_ends_its_running_exec_and_overrides_an_ignored_sigterm() -> Result<()>
{
    Harness::start_with_quark_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let mode = NamespaceMode::Container;
            let pod = run_pod_with_pid_mode(h, "stubborn", mode).await?;
            let stubborn = shell_container(
                h,
                "stubborn",
                "trap '' TERM; while true; do sleep 1; done",
                mode,
            );
            let id = h.start_container(&pod, &stubborn).await?;

            let cri = h.cri().clone();
            let exec_id = id.clone();
            let exec =
                tokio::spawn(async move { cri.exec_sync(&exec_id, &["sleep", "300"], 120).await });
            wait_for_processes(h, "runsc exec of the long exec", |args| {
                is_runsc_exec_for(args, &id)
            })
            .await?;

            let began = Instant::now();
            bounded("StopContainer", h.cri().stop_container(&id, 2)).await??;
            let status = h.cri().wait_container_exited(&id, EXIT_TIMEOUT).await?;
            ensure!(
                status.exit_code == 137,
                "a shell ignoring SIGTERM exited {} after StopContainer, not 137",
                status.exit_code
            );
            let exec = bounded("ExecSync of an exec in a stopped container", exec)
                .await?
                .context("the exec task panicked")?;
            let elapsed = began.elapsed();
            ensure!(
                elapsed < Duration::from_secs(20),
                "the exec ended {elapsed:?} after its container was stopped"
            );
            if let Ok(response) = &exec {
                ensure!(
                    response.exit_code != 0,
                    "an exec killed with its container succeeded: {response:?}"
                );
            }
            wait_until(
                "no host-side runsc exec of the stopped container is left",
                NOTICE_TIMEOUT,
                || run_processes_where(h, |args| is_runsc_exec_for(args, &id)).is_empty(),
            )
            .await?;
            h.remove_pod_and_check(&pod).await
        })
        .await
}

// ---------------------------------------------------------------------------------------
// A pod stopped while its container starts
// ---------------------------------------------------------------------------------------

/// StopPodSandbox races StartContainer (and, the last time, CreateContainer too). Whatever
/// wins, the stop succeeds, the container does not run on, and removal leaves nothing.
#[tokio::test]
async fn pod_stopped_while_its_container_starts_leaves_nothing() -> Result<()> {
    Harness::start_with_quark_sandboxer()
        .await?
        .run(async |h: &Harness| {
            for round in 0..3 {
                let pod = h
                    .run_pod(&format!("race-{round}"), KUASAR_QUARK_HANDLER)
                    .await?;
                let config = h.container_config("racer", BUSYBOX_IMAGE, &["sleep", "3600"]);
                let created = if round < 2 {
                    Some(
                        h.cri()
                            .create_container(&pod.id, &config, &pod.config)
                            .await?,
                    )
                } else {
                    None
                };
                let start = async {
                    let id = match &created {
                        Some(id) => id.clone(),
                        None => {
                            h.cri()
                                .create_container(&pod.id, &config, &pod.config)
                                .await?
                        }
                    };
                    h.cri().start_container(&id).await.map(|()| id)
                };
                let stop = async {
                    if let (1, Some(id)) = (round, &created) {
                        // Aim at the moment runsc is starting the container.
                        let deadline = Instant::now() + CLEANUP_TIMEOUT;
                        while run_processes_where(h, |args| is_runsc_start_for(args, id)).is_empty()
                            && Instant::now() < deadline
                        {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                    h.cri().stop_pod(&pod.id).await
                };
                let (started, stopped) = bounded("StartContainer racing StopPodSandbox", async {
                    tokio::join!(start, stop)
                })
                .await?;
                eprintln!(
                    "round {round}: start {:?}, stop {:?}",
                    started.as_ref().map_err(|e| format!("{e:#}")),
                    stopped.as_ref().map_err(|e| format!("{e:#}"))
                );
                stopped.context("StopPodSandbox racing a container start")?;

                for container in h.cri().list_containers(Some(&pod.id)).await? {
                    let deadline = Instant::now() + NOTICE_TIMEOUT;
                    loop {
                        let status = h.cri().container_status(&container.id).await?;
                        if status.state != ContainerState::ContainerRunning as i32 {
                            break;
                        }
                        ensure!(
                            Instant::now() < deadline,
                            "round {round}: container {} runs on in a stopped pod",
                            container.id
                        );
                        tokio::time::sleep(POLL_INTERVAL).await;
                    }
                }
                bounded("removing the raced pod", h.remove_pod_and_check(&pod))
                    .await?
                    .with_context(|| format!("round {round}"))?;
            }
            next_pod_works(h, "race-after").await
        })
        .await
}

// ---------------------------------------------------------------------------------------
// Bad [quark] settings
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn unknown_runsc_flag_fails_the_pod_naming_it() -> Result<()> {
    let mut settings = QuarkSettings::for_host()?;
    settings.flags = vec!["--no-such-runsc-flag".to_string()];
    pod_fails_naming(settings, "no-such-runsc-flag").await
}

/// Settings the sandboxer can tell are wrong stop it at start, with a message naming them.
#[tokio::test]
async fn malformed_quark_settings_stop_the_sandboxer_at_start_naming_them() -> Result<()> {
    let cases = [
        ("flags", "debug", "\"debug\""),
        ("platform", "sys trap", "\"sys trap\""),
        ("platform", "", "platform \"\""),
        ("platform", "bogus", "\"bogus\""),
    ];
    for (key, value, named) in cases {
        let mut settings = QuarkSettings::for_host()?;
        match key {
            "flags" => settings.flags = vec![value.to_string()],
            _ => settings.platform = value.to_string(),
        }
        match harness_with(settings).await {
            Ok(h) => {
                h.teardown()?;
                bail!("the quark sandboxer started with [quark] {key} = {value:?}");
            }
            Err(err) => {
                let message = format!("{err:#}");
                ensure!(
                    message.contains("quark-sandboxer exited") && message.contains(named),
                    "[quark] {key} = {value:?}: the start error does not name {named}: {message}"
                );
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The sandboxer killed
// ---------------------------------------------------------------------------------------

/// The quark sandboxer is SIGKILLed while a pod runs. It does not re-adopt pods when
/// restarted; CRI calls that need it must fail in bounded time, and once the harness has
/// torn everything down no runsc process, mount or state file of the run may be left.
#[tokio::test]
async fn killed_sandboxer_gives_errors_not_hangs_and_teardown_cleans_up() -> Result<()> {
    let h = Harness::start_with_quark_sandboxer().await?;
    let layout = h.layout().clone();
    let outcome: Result<()> = async {
        let pod = h.run_pod("orphan", KUASAR_QUARK_HANDLER).await?;
        let shell = h.container_config("shell", BUSYBOX_IMAGE, &["sh", "-c", TRAPPING_SHELL]);
        let id = h.start_container(&pod, &shell).await?;
        let sandboxer = h.quark_sandboxer_pid().context("no quark sandboxer")?;
        cleanup::signal(sandboxer, libc::SIGKILL)?;
        wait_until("the sandboxer is gone", NOTICE_TIMEOUT, || {
            !process_alive(sandboxer)
        })
        .await?;

        let exec = bounded("ExecSync", h.cri().exec_sync(&id, &["true"], 5)).await?;
        let config = h.pod_config("after-kill")?;
        let run = bounded(
            "RunPodSandbox",
            h.cri().run_pod(&config, KUASAR_QUARK_HANDLER),
        )
        .await?;
        let stop = bounded("StopPodSandbox", h.cri().stop_pod(&pod.id)).await?;
        let remove = bounded("RemovePodSandbox", h.cri().remove_pod(&pod.id)).await?;
        eprintln!(
            "after SIGKILL of the sandboxer: exec {:?}, run {:?}, stop {:?}, remove {:?}",
            exec.as_ref().map(|r| r.exit_code),
            run.as_ref().map_err(|e| format!("{e:#}")),
            stop.as_ref().map_err(|e| format!("{e:#}")),
            remove.as_ref().map_err(|e| format!("{e:#}")),
        );
        ensure!(run.is_err(), "a pod ran without a sandboxer");
        ensure!(
            exec.as_ref().map_or(true, |r| r.exit_code != 0),
            "an exec succeeded without a sandboxer: {exec:?}"
        );
        Ok(())
    }
    .await;
    if let Err(err) = &outcome {
        eprintln!("test failed: {err:#}");
        h.print_log_tails();
    }
    let teardown = h.teardown();
    eprintln!("teardown: {teardown:?}");
    let left = kuasar_tests::harness::leftovers_of(&layout, &[])?;
    outcome?;
    ensure!(left.is_empty(), "after teardown:\n{left}");
    Ok(())
}
