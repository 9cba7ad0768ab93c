//! The shim binary on containerd's default pod-sandbox mode, 1.6.20 and 1.7.24: CRI runs a
//! pause container per pod and launches `containerd-shim-kuasar-<family>-v2` for it; the
//! shim turns the pause container's task into the sandbox's lifecycle in the family's
//! sandboxer and forwards the pod's other containers' Task API v2 calls to it. Needs root.

use anyhow::Result;
use kuasar_tests::shim::{family_lifecycle, ShimMode};

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
