//! Faults on the shim path: a sandboxer that is not running, and a pod's shim killed while
//! its containers run. Needs root.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use k8s_cri::v1::{ContainerState, PodSandboxState};
use kuasar_tests::cleanup;
use kuasar_tests::harness::{wait_until, HarnessOptions};
use kuasar_tests::images::BUSYBOX_IMAGE;
use kuasar_tests::shim::{self, shim_handler, shim_pids, ShimMode, SHIM_EXIT_TIMEOUT};
use kuasar_tests::Harness;

/// How long containerd may take to notice a dead shim and clean up after it.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);

/// RunPodSandbox fails at once, naming the sandboxer's socket, and leaves nothing behind.
async fn missing_sandboxer(mode: ShimMode) -> Result<()> {
    shim::start(mode, HarnessOptions::default())
        .await?
        .run(async |h: &Harness| {
            let socket = h.layout().sandboxer_socket.clone();
            ensure!(!socket.exists(), "a sandboxer serves {}", socket.display());
            let started = Instant::now();
            let err = h
                .run_pod("orphan", &shim_handler("runc"))
                .await
                .err()
                .context("a pod ran without its sandboxer")?;
            let message = format!("{err:#}");
            eprintln!("RunPodSandbox failed as it should: {message}");
            ensure!(
                message.contains(&socket.to_string_lossy().into_owned()),
                "the error does not name the sandboxer socket {}: {message}",
                socket.display()
            );
            ensure!(
                started.elapsed() < Duration::from_secs(20),
                "RunPodSandbox took {:?} to fail",
                started.elapsed()
            );
            h.wait_for_no_leftovers(SHIM_EXIT_TIMEOUT)
                .await
                .context("after the failed RunPodSandbox")
        })
        .await
}

#[tokio::test]
async fn missing_sandboxer_is_named_on_containerd_2() -> Result<()> {
    missing_sandboxer(ShimMode::Containerd2Shim).await
}

#[tokio::test]
async fn missing_sandboxer_is_named_on_containerd_1_7_shim_mode() -> Result<()> {
    missing_sandboxer(ShimMode::Containerd17Shim).await
}

#[tokio::test]
async fn missing_sandboxer_is_named_on_containerd_1_6() -> Result<()> {
    missing_sandboxer(ShimMode::Containerd16PodSandbox).await
}

/// Kills the pod's shim while a container runs: containerd cleans up after the dead shim
/// (its `delete`), which removes the sandbox from the sandboxer, so no process of the pod
/// outlives it; the pod is then removed through CRI with nothing left.
async fn killed_shim(mode: ShimMode) -> Result<()> {
    shim::start(
        mode,
        HarnessOptions {
            sandboxer: true,
            ..Default::default()
        },
    )
    .await?
    .run(async |h: &Harness| {
        let pod = h.run_pod("victim", &shim_handler("runc")).await?;
        let sleeper = h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
        let sleeper_id = h.start_container(&pod, &sleeper).await?;
        // StartContainer may return before runc's init has become the container's command.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let processes = h.leftovers()?.processes;
            if processes.iter().any(|p| p.contains("sleep 3600")) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the sleeper is not running: {processes:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let shims = shim_pids(h.layout());
        ensure!(shims.len() == 1, "not one shim: {shims:?}");
        cleanup::signal(shims[0], libc::SIGKILL)?;

        // containerd notices, runs the shim binary's delete, and reports the exit.
        let deadline = Instant::now() + CLEANUP_TIMEOUT;
        loop {
            let processes: Vec<String> = h
                .leftovers()?
                .processes
                .into_iter()
                .filter(|p| !p.contains("containerd-shim-kuasar-"))
                .collect();
            let status = h.cri().container_status(&sleeper_id).await?;
            if processes.is_empty() && status.state == ContainerState::ContainerExited as i32 {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{CLEANUP_TIMEOUT:?} after the shim's death: container {}, processes {processes:?}",
                kuasar_tests::cri::state_name(status.state)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        shim::remove_pod_and_wait(h, &pod).await
    })
    .await
}

#[tokio::test]
async fn killed_shim_leaves_no_orphans_on_containerd_2() -> Result<()> {
    killed_shim(ShimMode::Containerd2Shim).await
}

#[tokio::test]
async fn killed_shim_leaves_no_orphans_on_containerd_1_7_shim_mode() -> Result<()> {
    killed_shim(ShimMode::Containerd17Shim).await
}

#[tokio::test]
async fn killed_shim_leaves_no_orphans_on_containerd_1_6() -> Result<()> {
    killed_shim(ShimMode::Containerd16PodSandbox).await
}

/// Restarts the microVM family's sandboxer (the family that takes its running pods over)
/// while a pod runs through the shim: the container keeps running and logging, and the
/// shim reaches the new sandboxer for exec, stop and removal.
async fn restarted_sandboxer(mode: ShimMode) -> Result<()> {
    let mut h = shim::start(mode, shim::family_options("vmm")).await?;
    let layout = h.layout().clone();
    let handler = shim_handler("vmm");
    let outcome: Result<()> = async {
        let pod = h.run_pod("restart", &handler).await?;
        let ticker = h.container_config(
            "ticker",
            BUSYBOX_IMAGE,
            &["sh", "-c", "while true; do echo tick; sleep 0.2; done"],
        );
        let id = h.start_container(&pod, &ticker).await?;
        let shims = shim_pids(&layout);

        let sandboxer = h.vmm_sandboxer_pid().context("no vmm sandboxer")?;
        cleanup::signal(sandboxer, libc::SIGKILL)?;
        let deadline = Instant::now() + CLEANUP_TIMEOUT;
        while cleanup::process_alive(sandboxer) {
            ensure!(Instant::now() < deadline, "the killed sandboxer lingers");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        h.restart_vmm_sandboxer()?;

        ensure!(
            shim_pids(&layout) == shims,
            "the pod's shim changed across the restart: {shims:?} then {:?}",
            shim_pids(&layout)
        );
        // The pod's own wait on its sandbox was cut by the restart: it must not read as
        // the sandbox's exit.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let pod_status = h.cri().pod_status(&pod.id).await?;
        ensure!(
            pod_status.state == PodSandboxState::SandboxReady as i32,
            "the pod after the restart: {pod_status:?}"
        );
        let exec = h.cri().exec_sync(&id, &["echo", "alive"], 30).await?;
        ensure!(
            exec.exit_code == 0 && kuasar_tests::cri::text(&exec.stdout) == "alive",
            "exec after the restart: {exec:?}"
        );
        let status = h.cri().container_status(&id).await?;
        ensure!(
            status.state == ContainerState::ContainerRunning as i32,
            "the container after the restart: {}",
            kuasar_tests::cri::state_name(status.state)
        );
        let ticks = h.container_log(&pod, &ticker)?.matches("tick").count();
        wait_until("the container logs on", Duration::from_secs(30), || {
            h.container_log(&pod, &ticker)
                .is_ok_and(|log| log.matches("tick").count() > ticks)
        })
        .await?;

        h.cri().stop_container(&id, 10).await?;
        let stopped = h.cri().container_status(&id).await?;
        ensure!(
            stopped.state == ContainerState::ContainerExited as i32,
            "stop after the restart: {}",
            kuasar_tests::cri::state_name(stopped.state)
        );
        shim::remove_pod_and_wait(&h, &pod).await
    }
    .await;
    if let Err(err) = &outcome {
        eprintln!("test failed: {err:#}");
        h.print_log_tails();
    }
    let teardown = h.teardown();
    let left = kuasar_tests::harness::leftovers_of(&layout, &[])?;
    outcome?;
    teardown?;
    ensure!(left.is_empty(), "after teardown:\n{left}");
    Ok(())
}

#[tokio::test]
async fn restarted_sandboxer_keeps_the_pod_on_containerd_2() -> Result<()> {
    restarted_sandboxer(ShimMode::Containerd2Shim).await
}

#[tokio::test]
async fn restarted_sandboxer_keeps_the_pod_on_containerd_1_6() -> Result<()> {
    restarted_sandboxer(ShimMode::Containerd16PodSandbox).await
}

/// The pod's shim SIGKILLed while one of its containers is created and started (containerd
/// 1.6), at moments from 0 to 33 ms into it: containerd's clean-up and the pod's removal
/// leave nothing of the pod or the container, however far their creation had gone (CRI's
/// own shm mount still in place, the engine halfway through `create`).
#[tokio::test]
async fn shim_killed_while_a_container_is_created_leaves_nothing_once_removed() -> Result<()> {
    shim::start(
        ShimMode::Containerd16PodSandbox,
        HarnessOptions {
            sandboxer: true,
            ..Default::default()
        },
    )
    .await?
    .run(async |h: &Harness| {
        for round in 0..12u64 {
            let pod = h
                .run_pod(&format!("cut-{round}"), &shim_handler("runc"))
                .await?;
            let shims = shim_pids(h.layout());
            ensure!(shims.len() == 1, "round {round}: not one shim: {shims:?}");
            let config = h.container_config("cut", BUSYBOX_IMAGE, &["sleep", "3600"]);
            let (cri, pod_id, pod_config) = (h.cri().clone(), pod.id.clone(), pod.config.clone());
            let started = tokio::spawn(async move {
                let id = cri.create_container(&pod_id, &config, &pod_config).await?;
                cri.start_container(&id).await
            });
            tokio::time::sleep(Duration::from_millis(3 * round)).await;
            cleanup::signal(shims[0], libc::SIGKILL)?;
            let started = tokio::time::timeout(CLEANUP_TIMEOUT, started)
                .await
                .with_context(|| format!("round {round}: the container's start hangs"))??;
            eprintln!("round {round}: container started: {}", started.is_ok());
            shim::remove_pod_and_wait(h, &pod)
                .await
                .with_context(|| format!("round {round}"))?;
        }
        Ok(())
    })
    .await
}
