//! The runc sandboxer on a real containerd: pods and containers driven through CRI, and
//! the Sandbox API's error answers checked on the sandboxer's own socket. Needs root.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use k8s_cri::v1::{ContainerState, PodSandboxState};
use kuasar_sandbox::api::sandbox::controller_client::ControllerClient;
use kuasar_sandbox::api::sandbox::{ControllerCreateRequest, ControllerStatusRequest};
use kuasar_tests::cri::text;
use kuasar_tests::images::BUSYBOX_IMAGE;
use kuasar_tests::terminal::{exec_on_terminal, TerminalSession, TERMINAL_CHECK};
use kuasar_tests::{Harness, KUASAR_RUNC_HANDLER};

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn pod_runs_containers_with_logs_exec_and_exit_codes() -> Result<()> {
    Harness::start_with_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("web-0", KUASAR_RUNC_HANDLER).await?;
            let status = h.cri().pod_status(&pod.id).await?;
            ensure!(
                status.state == PodSandboxState::SandboxReady as i32,
                "pod not ready: {status:?}"
            );
            ensure!(
                status.network.map(|n| !n.ip.is_empty()).unwrap_or(false),
                "pod has no IP"
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

            let exec = h.cri().exec_sync(&sleeper_id, &["hostname"], 10).await?;
            ensure!(
                exec.exit_code == 0 && text(&exec.stdout) == "web-0",
                "hostname: {exec:?}"
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

            // The pod's containers share its PID namespace, whose init is the sandboxer's holder.
            let exec = h
                .cri()
                .exec_sync(&sleeper_id, &["sh", "-c", "ps -o pid,args"], 10)
                .await?;
            let ps = text(&exec.stdout);
            ensure!(
                ps.contains("sleep 3600"),
                "sleeper not visible in the pod: {ps}"
            );
            // Header, the holder as PID 1, sleep, and the exec'd shell (plus ps itself).
            ensure!(
                ps.lines().count() <= 5,
                "host processes visible in the pod: {ps}"
            );
            ensure!(
                ps.lines().nth(1).is_some_and(
                    |l| l.trim_start().starts_with("1 ") && l.contains("hold-namespaces")
                ),
                "PID 1 is not the holder: {ps}"
            );

            let exec = h
                .cri()
                .exec_sync(
                    &sleeper_id,
                    &["cat", "/etc/hostname", "/etc/resolv.conf"],
                    10,
                )
                .await?;
            ensure!(
                text(&exec.stdout).starts_with("web-0"),
                "pod files: {exec:?}"
            );

            h.cri().stop_container(&sleeper_id, 10).await?;
            let stopped = h.cri().container_status(&sleeper_id).await?;
            ensure!(
                stopped.state == ContainerState::ContainerExited as i32 && stopped.exit_code == 143,
                "sleeper after stop: state {} exit code {}",
                kuasar_tests::cri::state_name(stopped.state),
                stopped.exit_code
            );

            h.cri().stop_pod(&pod.id).await?;
            let status = h.cri().pod_status(&pod.id).await?;
            ensure!(
                status.state == PodSandboxState::SandboxNotready as i32,
                "pod still ready after stop"
            );
            h.remove_pod_and_check(&pod).await
        })
        .await
}

#[tokio::test]
async fn containers_of_a_pod_share_hostname_and_localhost() -> Result<()> {
    Harness::start_with_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("shared", KUASAR_RUNC_HANDLER).await?;
            let server = h.container_config(
                "server",
                BUSYBOX_IMAGE,
                &["sh", "-c", "mkdir -p /www && echo served-by-neighbour > /www/index.html && exec httpd -f -p 127.0.0.1:8080 -h /www"],
            );
            let server_id = h.start_container(&pod, &server).await?;
            let client = h.container_config("client", BUSYBOX_IMAGE, &["sleep", "3600"]);
            let client_id = h.start_container(&pod, &client).await?;

            let mut body = String::new();
            for _ in 0..50 {
                let exec = h.cri().exec_sync(&client_id, &["wget", "-q", "-O", "-", "http://127.0.0.1:8080/index.html"], 10).await?;
                body = text(&exec.stdout);
                if exec.exit_code == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            ensure!(body == "served-by-neighbour", "client read {body:?} from its neighbour");

            let a = h.cri().exec_sync(&server_id, &["hostname"], 10).await?;
            let b = h.cri().exec_sync(&client_id, &["hostname"], 10).await?;
            ensure!(text(&a.stdout) == "shared" && text(&b.stdout) == "shared", "hostnames {a:?} {b:?}");

            h.remove_pod_and_check(&pod).await
        })
        .await
}

#[tokio::test]
async fn missing_command_fails_clearly_and_the_pod_stays_ready() -> Result<()> {
    Harness::start_with_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("robust", KUASAR_RUNC_HANDLER).await?;
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
            let after =
                h.container_config("after", BUSYBOX_IMAGE, &["sh", "-c", "echo still works"]);
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

            h.remove_pod_and_check(&pod).await
        })
        .await
}

#[tokio::test]
async fn sandbox_api_answers_bad_ids_with_the_right_codes() -> Result<()> {
    Harness::start_with_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let socket = h.layout().sandboxer_socket.clone();
            let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")?
                .connect_with_connector(tower::service_fn(move |_| {
                    let socket = socket.clone();
                    async move {
                        tokio::net::UnixStream::connect(socket)
                            .await
                            .map(hyper_util::rt::TokioIo::new)
                    }
                }))
                .await?;
            let mut controller = ControllerClient::new(channel);

            let missing = controller
                .status(ControllerStatusRequest {
                    sandbox_id: "no-such-sandbox".into(),
                    ..Default::default()
                })
                .await
                .err()
                .context("status of an unknown sandbox succeeded")?;
            ensure!(
                missing.code() == tonic::Code::NotFound,
                "unknown sandbox: {missing:?}"
            );
            ensure!(
                missing.message().contains("no-such-sandbox"),
                "message does not name the sandbox: {missing:?}"
            );

            let escaping = controller
                .create(ControllerCreateRequest {
                    sandbox_id: "../x".into(),
                    ..Default::default()
                })
                .await
                .err()
                .context("a path-like sandbox id was accepted")?;
            ensure!(
                escaping.code() == tonic::Code::InvalidArgument,
                "path-like id: {escaping:?}"
            );

            controller
                .create(ControllerCreateRequest {
                    sandbox_id: "twice".into(),
                    ..Default::default()
                })
                .await?;
            let again = controller
                .create(ControllerCreateRequest {
                    sandbox_id: "twice".into(),
                    ..Default::default()
                })
                .await
                .err()
                .context("a sandbox was created twice")?;
            ensure!(
                again.code() == tonic::Code::AlreadyExists,
                "second create: {again:?}"
            );
            controller
                .shutdown(kuasar_sandbox::api::sandbox::ControllerShutdownRequest {
                    sandbox_id: "twice".into(),
                    ..Default::default()
                })
                .await?;
            Ok(())
        })
        .await
}

#[tokio::test]
async fn stats_limits_and_oom_kills_are_reported() -> Result<()> {
    Harness::start_with_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("limits", KUASAR_RUNC_HANDLER).await?;
            let worker = h.container_config("worker", BUSYBOX_IMAGE, &["sleep", "3600"]);
            let worker_id = h.start_container(&pod, &worker).await?;

            let stats = h.cri().container_stats(&worker_id).await?;
            let memory = stats
                .memory
                .and_then(|m| m.working_set_bytes)
                .map(|v| v.value)
                .unwrap_or(0);
            ensure!(memory > 0, "no memory usage reported: {stats:?}");
            ensure!(stats.cpu.is_some(), "no cpu usage reported");

            let limit = 48 * 1024 * 1024;
            let resources = k8s_cri::v1::LinuxContainerResources {
                memory_limit_in_bytes: limit,
                ..Default::default()
            };
            h.cri()
                .update_container_resources(&worker_id, resources)
                .await?;
            let exec = h
                .cri()
                .exec_sync(
                    &worker_id,
                    &["cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"],
                    10,
                )
                .await?;
            let seen = text(&exec.stdout);
            if !seen.is_empty() {
                ensure!(
                    seen == limit.to_string(),
                    "limit inside the container is {seen}, not {limit}"
                );
            }

            // Filling the pod's shared memory beyond the container's limit gets it OOM-killed.
            let mut hog = h.container_config(
                "hog",
                BUSYBOX_IMAGE,
                &[
                    "dd",
                    "if=/dev/zero",
                    "of=/dev/shm/fill",
                    "bs=1M",
                    "count=256",
                ],
            );
            hog.linux.get_or_insert_default().resources =
                Some(k8s_cri::v1::LinuxContainerResources {
                    memory_limit_in_bytes: 16 * 1024 * 1024,
                    ..Default::default()
                });
            let hog_id = h.start_container(&pod, &hog).await?;
            let exited = h.cri().wait_container_exited(&hog_id, EXIT_TIMEOUT).await?;
            ensure!(
                exited.exit_code == 137,
                "hog exit code {}",
                exited.exit_code
            );
            ensure!(
                exited.reason == "OOMKilled",
                "hog exit reason {:?}",
                exited.reason
            );

            h.remove_pod_and_check(&pod).await
        })
        .await
}

#[tokio::test]
async fn interactive_exec_with_a_terminal() -> Result<()> {
    Harness::start_with_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("term", KUASAR_RUNC_HANDLER).await?;
            let shell = h.container_config("shell", BUSYBOX_IMAGE, &["sleep", "3600"]);
            let shell_id = h.start_container(&pod, &shell).await?;

            // What `crictl exec -it <id> sh` does: CRI Exec, then the streaming session.
            let TerminalSession { output, status } = exec_on_terminal(
                h.cri(),
                &shell_id,
                &["sh"],
                (100, 30),
                TERMINAL_CHECK,
                EXIT_TIMEOUT,
            )
            .await?;
            ensure!(
                output.contains("/dev/pts/"),
                "no terminal in the exec: {output:?}"
            );
            ensure!(
                output.contains("30 100"),
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

            h.remove_pod_and_check(&pod).await
        })
        .await
}
