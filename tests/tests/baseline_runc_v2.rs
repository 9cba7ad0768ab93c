//! Baseline: pods on containerd's own `io.containerd.runc.v2` shim through CRI, proving the
//! harness, the images and the CRI client before any sandboxer is involved. Needs root.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use k8s_cri::v1::{ContainerState, PodSandboxState};
use kuasar_tests::images::BUSYBOX_IMAGE;
use kuasar_tests::{Harness, RUNC_HANDLER};

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn pod_lifecycle_logs_exec_and_exit_code() -> Result<()> {
    Harness::start()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("baseline", RUNC_HANDLER).await?;
            let status = h.cri().pod_status(&pod.id).await?;
            ensure!(
                status.state == PodSandboxState::SandboxReady as i32,
                "pod not ready: {status:?}"
            );
            ensure!(
                status.runtime_handler == RUNC_HANDLER,
                "handler {:?}",
                status.runtime_handler
            );

            let echo = h.container_config(
                "echo",
                BUSYBOX_IMAGE,
                &[
                    "sh",
                    "-c",
                    "echo hello from busybox; echo to stderr >&2; exit 3",
                ],
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
                log == "hello from busybox\nto stderr\n"
                    || log == "to stderr\nhello from busybox\n",
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
            ensure!(exec.exit_code == 0, "hostname failed: {exec:?}");
            ensure!(
                String::from_utf8_lossy(&exec.stdout).trim() == "baseline",
                "hostname printed {:?}",
                String::from_utf8_lossy(&exec.stdout)
            );
            let failing = h
                .cri()
                .exec_sync(&sleeper_id, &["sh", "-c", "exit 5"], 10)
                .await?;
            ensure!(
                failing.exit_code == 5,
                "exec exit code {}",
                failing.exit_code
            );

            // The pod shares one PID namespace, so `sleep` is not its init and SIGTERM ends it.
            h.cri().stop_container(&sleeper_id, 10).await?;
            let stopped = h.cri().container_status(&sleeper_id).await?;
            ensure!(
                stopped.state == ContainerState::ContainerExited as i32 && stopped.exit_code == 143,
                "sleeper after stop: state {} exit code {}",
                kuasar_tests::cri::state_name(stopped.state),
                stopped.exit_code
            );

            h.cri().stop_pod(&pod.id).await?;
            h.cri().remove_pod(&pod.id).await?;
            ensure!(
                h.cri().list_pods().await?.is_empty(),
                "pods remain after removal"
            );
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

#[tokio::test]
async fn pods_get_addresses_on_the_test_bridge() -> Result<()> {
    Harness::start()
        .await?
        .run(async |h: &Harness| {
            let first = h.run_pod("first", RUNC_HANDLER).await?;
            let second = h.run_pod("second", RUNC_HANDLER).await?;

            let mut ips = Vec::new();
            for pod in [&first, &second] {
                let status = h.cri().pod_status(&pod.id).await?;
                let ip = status
                    .network
                    .map(|n| n.ip)
                    .filter(|ip| !ip.is_empty())
                    .with_context(|| format!("pod {} has no IP", pod.id))?;
                let prefix = h.layout().subnet.trim_end_matches("0/24");
                ensure!(
                    ip.starts_with(prefix),
                    "pod IP {ip} outside {}",
                    h.layout().subnet
                );
                ips.push(ip);
            }
            ensure!(ips[0] != ips[1], "both pods got {}", ips[0]);

            for pod in [&first, &second] {
                h.cri().stop_pod(&pod.id).await?;
                h.cri().remove_pod(&pod.id).await?;
            }
            let left = h.leftovers()?;
            ensure!(left.is_empty(), "after removing the pods:\n{left}");
            Ok(())
        })
        .await
}

#[tokio::test]
async fn teardown_removes_running_pods() -> Result<()> {
    let harness = Harness::start().await?;
    let layout = harness.layout().clone();
    let pod = harness.run_pod("abandoned", RUNC_HANDLER).await?;
    let sleeper = harness.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
    harness.start_container(&pod, &sleeper).await?;
    ensure!(
        !harness.leftovers()?.is_empty(),
        "a running pod must show as leftover"
    );

    harness.teardown()?;
    let left = kuasar_tests::harness::leftovers_of(&layout, &[])?;
    ensure!(left.is_empty(), "after teardown:\n{left}");
    ensure!(
        !layout.run_dir.exists(),
        "{} still exists",
        layout.run_dir.display()
    );
    Ok(())
}
