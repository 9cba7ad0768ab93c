//! The wasm sandboxer on a real containerd: WASI modules as containers, driven through
//! CRI. Needs root.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use k8s_cri::v1::{ContainerState, KeyValue, PodSandboxState};
use kuasar_tests::cri::text;
use kuasar_tests::images::WASM_IMAGE;
use kuasar_tests::{Harness, KUASAR_WASM_HANDLER};

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn modules_print_args_env_and_exit_codes() -> Result<()> {
    Harness::start_with_wasm_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("wasm-0", KUASAR_WASM_HANDLER).await?;
            let status = h.cri().pod_status(&pod.id).await?;
            ensure!(
                status.state == PodSandboxState::SandboxReady as i32,
                "pod not ready: {status:?}"
            );

            let mut hello = h.container_config("hello", WASM_IMAGE, &[]);
            hello.args = vec!["first".into(), "second arg".into()];
            hello.envs = vec![KeyValue {
                key: "GREETING".into(),
                value: "hi there".into(),
            }];
            let hello_id = h.start_container(&pod, &hello).await?;
            let exited = h
                .cri()
                .wait_container_exited(&hello_id, EXIT_TIMEOUT)
                .await?;
            ensure!(
                exited.exit_code == 0,
                "hello exit code {}",
                exited.exit_code
            );
            let log = h.container_log(&pod, &hello)?;
            for line in [
                "hello from wasm",
                "arg[0]=/hello.wasm",
                "arg[1]=first",
                "arg[2]=second arg",
                "GREETING=hi there",
                "hello on stderr",
            ] {
                ensure!(log.contains(line), "log lacks {line:?}: {log:?}");
            }

            let exit = h.container_config("exit", WASM_IMAGE, &["/exit.wasm", "42"]);
            let exit_id = h.start_container(&pod, &exit).await?;
            let exited = h
                .cri()
                .wait_container_exited(&exit_id, EXIT_TIMEOUT)
                .await?;
            ensure!(
                exited.exit_code == 42,
                "exit code {} instead of 42",
                exited.exit_code
            );

            let trap = h.container_config("trap", WASM_IMAGE, &["/trap.wasm"]);
            let trap_id = h.start_container(&pod, &trap).await?;
            let exited = h
                .cri()
                .wait_container_exited(&trap_id, EXIT_TIMEOUT)
                .await?;
            ensure!(
                exited.exit_code == 134,
                "trap exit code {}",
                exited.exit_code
            );
            let log = h.container_log(&pod, &trap)?;
            ensure!(
                log.contains("about to trap") && log.contains("wasm trap in /trap.wasm"),
                "trap log {log:?}"
            );

            h.remove_pod_and_check(&pod).await
        })
        .await
}

#[tokio::test]
async fn exec_kill_volumes_and_limits() -> Result<()> {
    Harness::start_with_wasm_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("wasm-1", KUASAR_WASM_HANDLER).await?;

            // A long-running module, and another module exec'd next to it.
            let sleeper = h.container_config("sleeper", WASM_IMAGE, &["/sleeper.wasm"]);
            let sleeper_id = h.start_container(&pod, &sleeper).await?;
            let exec = h
                .cri()
                .exec_sync(&sleeper_id, &["/hello.wasm", "from-exec"], 10)
                .await?;
            ensure!(
                exec.exit_code == 0,
                "exec exit code {}: {exec:?}",
                exec.exit_code
            );
            let out = text(&exec.stdout);
            ensure!(
                out.contains("hello from wasm") && out.contains("arg[1]=from-exec"),
                "exec output {out:?}"
            );
            let exec = h
                .cri()
                .exec_sync(&sleeper_id, &["/exit.wasm", "9"], 10)
                .await?;
            ensure!(exec.exit_code == 9, "exec exit code {}", exec.exit_code);

            let stats = h.cri().container_stats(&sleeper_id).await?;
            let memory = stats
                .memory
                .and_then(|m| m.working_set_bytes)
                .map(|v| v.value)
                .unwrap_or(0);
            ensure!(memory > 0, "no memory usage reported: {stats:?}");

            // A module that never yields is stopped with SIGTERM and counts as killed.
            let spinner = h.container_config("spinner", WASM_IMAGE, &["/loop.wasm"]);
            let spinner_id = h.start_container(&pod, &spinner).await?;
            h.cri().stop_container(&spinner_id, 5).await?;
            let stopped = h.cri().container_status(&spinner_id).await?;
            ensure!(
                stopped.state == ContainerState::ContainerExited as i32 && stopped.exit_code == 143,
                "spinner after stop: state {} exit {}",
                kuasar_tests::cri::state_name(stopped.state),
                stopped.exit_code
            );

            // A file written into a volume is visible on the host.
            let volume = h.layout().run_dir.join("wasm-volume");
            std::fs::create_dir_all(&volume)?;
            let mut writer = h.container_config(
                "writer",
                WASM_IMAGE,
                &["/writer.wasm", "/data/out.txt", "written by wasm"],
            );
            writer.mounts = vec![k8s_cri::v1::Mount {
                container_path: "/data".into(),
                host_path: volume.display().to_string(),
                ..Default::default()
            }];
            let writer_id = h.start_container(&pod, &writer).await?;
            let exited = h
                .cri()
                .wait_container_exited(&writer_id, EXIT_TIMEOUT)
                .await
                .with_context(|| format!("writer: {:?}", h.container_log(&pod, &writer)))?;
            ensure!(
                exited.exit_code == 0,
                "writer exit code {}: {}",
                exited.exit_code,
                h.container_log(&pod, &writer)?
            );
            let written = std::fs::read_to_string(volume.join("out.txt"))
                .context("file written by the module")?;
            ensure!(written == "written by wasm\n", "host sees {written:?}");

            // A memory limit ends a module that keeps allocating, and only that module.
            let mut hog = h.container_config("hog", WASM_IMAGE, &["/memhog.wasm"]);
            hog.linux.get_or_insert_default().resources =
                Some(k8s_cri::v1::LinuxContainerResources {
                    memory_limit_in_bytes: 64 * 1024 * 1024,
                    ..Default::default()
                });
            let hog_id = h.start_container(&pod, &hog).await?;
            let exited = h
                .cri()
                .wait_container_exited(&hog_id, EXIT_TIMEOUT)
                .await
                .with_context(|| format!("hog: {:?}", h.container_log(&pod, &hog)))?;
            ensure!(
                exited.exit_code == 137 && exited.reason == "OOMKilled",
                "hog ended with {} {:?}",
                exited.exit_code,
                exited.reason
            );
            let running = h.cri().container_status(&sleeper_id).await?;
            ensure!(
                running.state == ContainerState::ContainerRunning as i32,
                "neighbour hurt by the hog: {running:?}"
            );

            h.remove_pod_and_check(&pod).await
        })
        .await
}

#[tokio::test]
async fn bad_modules_fail_clearly_and_the_pod_keeps_running() -> Result<()> {
    Harness::start_with_wasm_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("wasm-2", KUASAR_WASM_HANDLER).await?;
            let sleeper = h.container_config("sleeper", WASM_IMAGE, &["/sleeper.wasm"]);
            let sleeper_id = h.start_container(&pod, &sleeper).await?;

            for (name, command, expected) in [
                (
                    "garbage",
                    "/bad.wasm",
                    "/bad.wasm is not a valid WebAssembly module",
                ),
                ("missing", "/nowhere.wasm", "/nowhere.wasm"),
                ("unlinkable", "/missing-import.wasm", "kuasar_missing"),
            ] {
                let config = h.container_config(name, WASM_IMAGE, &[command]);
                let err = h
                    .start_container(&pod, &config)
                    .await
                    .err()
                    .with_context(|| format!("{command} started"))?;
                let message = format!("{err:#}");
                ensure!(
                    message.contains(expected),
                    "error for {command} lacks {expected:?}: {message}"
                );
            }

            let status = h.cri().pod_status(&pod.id).await?;
            ensure!(
                status.state == PodSandboxState::SandboxReady as i32,
                "pod not ready after bad modules"
            );
            let running = h.cri().container_status(&sleeper_id).await?;
            ensure!(
                running.state == ContainerState::ContainerRunning as i32,
                "neighbour stopped: {running:?}"
            );

            h.remove_pod_and_check(&pod).await
        })
        .await
}
