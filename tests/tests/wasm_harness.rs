//! The harness's support for the wasm sandboxer, without needing a working one: the wasm
//! image imports, and a missing or failing sandboxer binary stops the start with a clear
//! error and leaves nothing behind. Needs root.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use kuasar_tests::harness::BASE_DIR;
use kuasar_tests::images::{BUSYBOX_IMAGE, WASM_IMAGE};
use kuasar_tests::{Harness, HarnessOptions};

#[tokio::test]
async fn wasm_image_imports_with_its_entrypoint() -> Result<()> {
    Harness::start_with(HarnessOptions {
        wasm_image: true,
        ..Default::default()
    })
    .await?
    .run(async |h: &Harness| {
        let tags: Vec<String> = h
            .cri()
            .list_images()
            .await?
            .into_iter()
            .flat_map(|i| i.repo_tags)
            .collect();
        for image in [WASM_IMAGE, BUSYBOX_IMAGE] {
            ensure!(tags.iter().any(|t| t == image), "{image} not in {tags:?}");
        }

        let status = h.cri().image_status(WASM_IMAGE).await?;
        ensure!(status.image.is_some(), "CRI does not know {WASM_IMAGE}");
        let info = status.info.get("info").context("no verbose image info")?;
        let info: serde_json::Value = serde_json::from_str(info)?;
        let entrypoint = &info["imageSpec"]["config"]["Entrypoint"];
        ensure!(
            *entrypoint == serde_json::json!(["/hello.wasm"]),
            "entrypoint {entrypoint} in {info}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn missing_wasm_sandboxer_binary_fails_clearly() -> Result<()> {
    let binary = PathBuf::from("/nonexistent/kuasar/wasm-sandboxer");
    let message = start_failure(binary.clone()).await?;
    ensure!(
        message.contains(&format!(
            "wasm-sandboxer binary {} is not a file",
            binary.display()
        )),
        "unclear error: {message}"
    );
    Ok(())
}

#[tokio::test]
async fn wasm_sandboxer_exiting_at_once_fails_clearly() -> Result<()> {
    let message = start_failure(PathBuf::from("/bin/false")).await?;
    ensure!(
        message.contains("wasm-sandboxer exited") && message.contains("wasm-sandboxer.sock"),
        "unclear error: {message}"
    );
    Ok(())
}

/// Starts a harness with the wasm sandboxer `binary`, expecting it to fail; checks that the
/// failed run left no run directory and returns the error's text.
async fn start_failure(binary: PathBuf) -> Result<String> {
    let result = Harness::start_with(HarnessOptions {
        wasm_sandboxer: true,
        wasm_sandboxer_binary: Some(binary.clone()),
        ..Default::default()
    })
    .await;
    let Err(error) = result else {
        anyhow::bail!(
            "the harness started with wasm-sandboxer {}",
            binary.display()
        );
    };
    let message = format!("{error:#}");
    let prefix = format!("cannot start the test harness in {BASE_DIR}/");
    let run_dir = message
        .strip_prefix(&prefix)
        .and_then(|rest| rest.split(':').next())
        .map(|id| Path::new(BASE_DIR).join(id))
        .with_context(|| format!("error does not name the run directory: {message}"))?;
    ensure!(
        !run_dir.exists(),
        "the failed start left {}",
        run_dir.display()
    );
    Ok(message)
}
