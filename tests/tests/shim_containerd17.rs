//! The shim binary on containerd 1.7.24 with `sandbox_mode = "shim"` (CRI's experimental
//! sandbox server, `ENABLE_CRI_SANDBOXES=1`): containerd starts one
//! `containerd-shim-kuasar-<family>-v2` per pod, calls the Sandbox API on it over ttrpc and
//! the Task API v2 for the pod's containers; the shim forwards all of it to the family's
//! sandboxer. Needs root.

use anyhow::Result;
use kuasar_tests::shim::{family_lifecycle, ShimMode};

const MODE: ShimMode = ShimMode::Containerd17Shim;

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
