//! The shim binary on containerd 2.1.9 with `sandboxer = "shim"`: containerd starts one
//! `containerd-shim-kuasar-<family>-v2` per pod, calls the Sandbox API on it over ttrpc, and
//! sends the pod's containers' Task API calls to it; the shim forwards all of it to the
//! family's sandboxer. Needs root.

use anyhow::{ensure, Context, Result};
use kuasar_tests::images::BUSYBOX_IMAGE;
use kuasar_tests::shim::{self, family_lifecycle, shim_handler, ShimMode};
use kuasar_tests::Harness;

const MODE: ShimMode = ShimMode::Containerd2Shim;

#[tokio::test]
async fn runc_pod_lifecycle_through_the_shim() -> Result<()> {
    family_lifecycle(MODE, "runc").await
}

#[tokio::test]
async fn wasm_pod_lifecycle_through_the_shim() -> Result<()> {
    family_lifecycle(MODE, "wasm").await
}

#[tokio::test]
async fn quark_pod_lifecycle_through_the_shim() -> Result<()> {
    family_lifecycle(MODE, "quark").await
}

#[tokio::test]
async fn vmm_pod_lifecycle_through_the_shim() -> Result<()> {
    family_lifecycle(MODE, "vmm").await
}

/// containerd 2.x learns from the shim's `start` that it speaks Task API v3: the pod's
/// containers are sent to the pod's shim directly, with no shim binary run for them.
#[tokio::test]
async fn containers_reach_the_pods_shim_over_task_api_v3() -> Result<()> {
    shim::start(MODE, shim::family_options("runc"))
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("v3", &shim_handler("runc")).await?;
            let sleeper = h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
            let id = h.start_container(&pod, &sleeper).await?;
            let path = h
                .layout()
                .task_bundle_dir()
                .join(&id)
                .join("bootstrap.json");
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let params: serde_json::Value = serde_json::from_str(&text)?;
            ensure!(params["version"] == 3, "bootstrap parameters {text}");
            let address = params["address"].as_str().unwrap_or_default().to_string();
            let socket = kuasar_shim::launch::socket_path(
                &h.layout().containerd_socket.to_string_lossy(),
                "k8s.io",
                &pod.id,
            );
            ensure!(
                address == format!("unix://{}", socket.display()),
                "the container's task goes to {address}, not the pod's shim"
            );
            shim::remove_pod_and_wait(h, &pod).await
        })
        .await
}
