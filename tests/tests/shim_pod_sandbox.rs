//! The shim binary on containerd's default pod-sandbox mode, 1.6.20 and 1.7.24: CRI runs a
//! pause container per pod and launches `containerd-shim-kuasar-<family>-v2` for it; the
//! shim turns the pause container's task into the sandbox's lifecycle in the family's
//! sandboxer and forwards the pod's other containers' Task API v2 calls to it. Needs root.

use anyhow::{ensure, Context, Result};
use k8s_cri::v1::PodSandboxState;
use kuasar_tests::harness::Harness;
use kuasar_tests::images::BUSYBOX_IMAGE;
use kuasar_tests::shim::{
    family_lifecycle, family_options, remove_pod_and_wait, shim_handler, start, ShimMode,
};

const V16: ShimMode = ShimMode::Containerd16PodSandbox;
const V17: ShimMode = ShimMode::Containerd17PodSandbox;

#[tokio::test]
async fn runc_pod_lifecycle_on_containerd_1_6() -> Result<()> {
    family_lifecycle(V16, "runc").await
}

#[tokio::test]
async fn runc_pod_lifecycle_on_containerd_1_7() -> Result<()> {
    family_lifecycle(V17, "runc").await
}

#[tokio::test]
async fn wasm_pod_lifecycle_on_containerd_1_6() -> Result<()> {
    family_lifecycle(V16, "wasm").await
}

#[tokio::test]
async fn wasm_pod_lifecycle_on_containerd_1_7() -> Result<()> {
    family_lifecycle(V17, "wasm").await
}

#[tokio::test]
async fn quark_pod_lifecycle_on_containerd_1_6() -> Result<()> {
    family_lifecycle(V16, "quark").await
}

#[tokio::test]
async fn quark_pod_lifecycle_on_containerd_1_7() -> Result<()> {
    family_lifecycle(V17, "quark").await
}

#[tokio::test]
async fn vmm_pod_lifecycle_on_containerd_1_6() -> Result<()> {
    family_lifecycle(V16, "vmm").await
}

#[tokio::test]
async fn vmm_pod_lifecycle_on_containerd_1_7() -> Result<()> {
    family_lifecycle(V17, "vmm").await
}

/// containerd sees the pod's pause task: listed with the sandbox's pid, its metrics are the
/// sandbox's cgroup's (what `ctr task metrics` and tools reading task metrics show), and a
/// signal that a pause process ignores leaves the pod running.
#[tokio::test]
async fn pause_task_is_listed_and_reports_the_sandboxs_usage() -> Result<()> {
    start(V16, family_options("runc"))
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("usage-0", &shim_handler("runc")).await?;
            let tasks = h.ctr(&["task", "ls"]).await?;
            let listed = tasks
                .lines()
                .find(|line| line.starts_with(&pod.id))
                .with_context(|| format!("pause task of {} not listed: {tasks}", pod.id))?;
            ensure!(listed.contains("RUNNING"), "pause task: {listed}");

            let metrics = h.ctr(&["task", "metrics", &pod.id]).await?;
            let pids: u64 = metrics
                .lines()
                .find_map(|line| line.strip_prefix("pids.current"))
                .and_then(|value| value.trim().parse().ok())
                .with_context(|| format!("no pids.current in the metrics: {metrics}"))?;
            ensure!(pids >= 1, "the sandbox's cgroup runs nothing: {metrics}");

            // A pause process ignores SIGWINCH: so does the pod, and its containers run on.
            let sleeper = h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
            let sleeper_id = h.start_container(&pod, &sleeper).await?;
            h.ctr(&["task", "kill", "--signal", "SIGWINCH", &pod.id])
                .await?;
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            let status = h.cri().pod_status(&pod.id).await?;
            ensure!(
                status.state == PodSandboxState::SandboxReady as i32,
                "the pod after SIGWINCH to its pause task: {status:?}"
            );
            let exec = h
                .cri()
                .exec_sync(&sleeper_id, &["echo", "alive"], 30)
                .await?;
            ensure!(
                exec.exit_code == 0,
                "the container after SIGWINCH to the pause task: {exec:?}"
            );

            remove_pod_and_wait(h, &pod).await
        })
        .await
}
