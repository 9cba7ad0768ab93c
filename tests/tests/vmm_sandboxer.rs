//! The vmm sandboxer on a real containerd: every pod is a QEMU microVM (software
//! emulation here) whose guest agent runs the pod's containers with runc inside the
//! guest. Needs root, `make guest` and QEMU.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use k8s_cri::v1::{
    ContainerState, LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption, PodSandboxState,
};
use kuasar_tests::cleanup;
use kuasar_tests::cri::text;
use kuasar_tests::images::BUSYBOX_IMAGE;
use kuasar_tests::terminal::{exec_on_terminal, TerminalSession, TERMINAL_CHECK};
use kuasar_tests::{Harness, HarnessOptions, Pod, KUASAR_RUNC_HANDLER, KUASAR_VMM_HANDLER};

const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// The guest kernel's release, from the image `make guest` built.
fn guest_kernel_release() -> Result<String> {
    let boot = kuasar_tests::harness::guest_dir()?.join("kernel/boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .with_context(|| format!("cannot list {}", boot.display()))?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| entry.file_name().to_str().map(str::to_string))
        .find_map(|name| name.strip_prefix("vmlinuz-").map(str::to_string));
    vmlinuz.with_context(|| format!("no vmlinuz-* in {}", boot.display()))
}

/// QEMU processes of the pod: its command line names the sandbox's VM directory.
fn qemu_processes_of(pod: &Pod) -> Vec<(u32, String)> {
    let prefix: String = pod.id.chars().take(16).collect();
    cleanup::host_processes()
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains("qemu-system") && cmdline.contains(&prefix))
        .collect()
}

#[tokio::test]
async fn pod_runs_in_its_own_vm_with_logs_exec_and_exit_codes() -> Result<()> {
    Harness::start_with_vmm_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("vm-0", KUASAR_VMM_HANDLER).await?;
            let status = h.cri().pod_status(&pod.id).await?;
            ensure!(
                status.state == PodSandboxState::SandboxReady as i32,
                "pod not ready: {status:?}"
            );
            let vms = qemu_processes_of(&pod);
            ensure!(vms.len() == 1, "the pod should have one QEMU: {vms:?}");

            // The container sees the guest's kernel, not the host's.
            let kernel = h.container_config(
                "kernel",
                BUSYBOX_IMAGE,
                &["sh", "-c", "uname -r; hostname; echo to stderr >&2; exit 3"],
            );
            let kernel_id = h.start_container(&pod, &kernel).await?;
            let exited = h
                .cri()
                .wait_container_exited(&kernel_id, EXIT_TIMEOUT)
                .await?;
            let log = h.container_log(&pod, &kernel)?;
            ensure!(
                exited.exit_code == 3,
                "exit code {} instead of 3; log {log:?}",
                exited.exit_code
            );
            // stdout and stderr travel separately: their lines may interleave either way.
            let lines: Vec<&str> = log.lines().collect();
            let guest_release = guest_kernel_release()?;
            ensure!(
                lines.contains(&guest_release.as_str()),
                "the container does not run on the guest's kernel {guest_release:?}: {log:?}"
            );
            let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
            ensure!(
                !lines.contains(&host_release.trim()),
                "the container sees the host's kernel: {log:?}"
            );
            ensure!(
                lines.contains(&"vm-0"),
                "hostname is not the pod's: {log:?}"
            );
            ensure!(lines.contains(&"to stderr"), "stderr not logged: {log:?}");

            // A long-running container, exec'd into.
            let sleeper = h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
            let sleeper_id = h.start_container(&pod, &sleeper).await?;
            let running = h.cri().container_status(&sleeper_id).await?;
            ensure!(
                running.state == ContainerState::ContainerRunning as i32,
                "sleeper not running: {running:?}"
            );
            let exec = h
                .cri()
                .exec_sync(
                    &sleeper_id,
                    &["sh", "-c", "echo out; echo err >&2; exit 5"],
                    30,
                )
                .await?;
            ensure!(
                exec.exit_code == 5,
                "exec exit code {}: {exec:?}",
                exec.exit_code
            );
            ensure!(
                text(&exec.stdout) == "out" && text(&exec.stderr) == "err",
                "exec output {exec:?}"
            );
            // Files containerd prepared on the host reach the container.
            let exec = h
                .cri()
                .exec_sync(&sleeper_id, &["cat", "/etc/hostname"], 30)
                .await?;
            ensure!(text(&exec.stdout) == "vm-0", "pod files: {exec:?}");

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
            ensure!(qemu_processes_of(&pod).is_empty(), "QEMU outlived its pod");
            h.remove_pod_and_check(&pod).await
        })
        .await
}

#[tokio::test]
async fn missing_command_fails_clearly_and_the_pod_stays_ready() -> Result<()> {
    Harness::start_with_vmm_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("vm-robust", KUASAR_VMM_HANDLER).await?;
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
            let log = h.container_log(&pod, &after)?;
            ensure!(log == "still works\n", "later container log {log:?}");

            h.remove_pod_and_check(&pod).await
        })
        .await
}

#[tokio::test]
async fn the_vm_answers_on_the_pod_ip() -> Result<()> {
    Harness::start_with(HarnessOptions {
        sandboxer: true,
        vmm_sandboxer: true,
        ..Default::default()
    })
    .await?
    .run(async |h: &Harness| {
        let pod = h.run_pod("vm-web", KUASAR_VMM_HANDLER).await?;
        let ip = h
            .cri()
            .pod_status(&pod.id)
            .await?
            .network
            .map(|n| n.ip)
            .unwrap_or_default();
        ensure!(!ip.is_empty(), "the VM pod has no IP");

        let server = h.container_config(
            "server",
            BUSYBOX_IMAGE,
            &[
                "sh",
                "-c",
                "mkdir -p /www && echo hello from the vm > /www/index.html && exec httpd -f -p 8080 -h /www",
            ],
        );
        let server_id = h.start_container(&pod, &server).await?;
        let addresses = h
            .cri()
            .exec_sync(&server_id, &["ip", "-4", "addr", "show"], 30)
            .await?;
        ensure!(
            text(&addresses.stdout).contains(&format!("inet {ip}/")),
            "the guest does not hold the pod IP {ip}: {addresses:?}"
        );

        // A client in a runc pod on the same network reaches the server in the VM.
        let client_pod = h.run_pod("vm-client", KUASAR_RUNC_HANDLER).await?;
        // busybox's wget crashes resolving through glibc's NSS in a static binary: the
        // request goes through nc.
        let url = format!("http://{ip}:8080/index.html");
        let request =
            format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} 8080");
        let client = h.container_config("client", BUSYBOX_IMAGE, &["sleep", "3600"]);
        let client_id = h.start_container(&client_pod, &client).await?;
        let mut fetched = None;
        for _ in 0..50 {
            let got = h
                .cri()
                .exec_sync(&client_id, &["sh", "-c", &request], 30)
                .await?;
            if got.exit_code == 0 && !got.stdout.is_empty() {
                fetched = Some(got);
                break;
            }
            // The server may still be starting.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let fetched = fetched.with_context(|| format!("{url} never answered"))?;
        let answer = text(&fetched.stdout);
        ensure!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("\r\n\r\nhello from the vm"),
            "unexpected answer from {url}: {answer:?}"
        );

        h.cri().stop_pod(&client_pod.id).await?;
        h.cri().remove_pod(&client_pod.id).await?;
        h.remove_pod_and_check(&pod).await
    })
    .await
}

#[tokio::test]
async fn host_network_pods_are_refused_naming_the_reason() -> Result<()> {
    Harness::start_with_vmm_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let mut config = h.pod_config("vm-host-net")?;
            config
                .linux
                .get_or_insert_default()
                .security_context
                .get_or_insert_with(LinuxSandboxSecurityContext::default)
                .namespace_options = Some(NamespaceOption {
                network: NamespaceMode::Node as i32,
                ..Default::default()
            });
            let err = h
                .cri()
                .run_pod(&config, KUASAR_VMM_HANDLER)
                .await
                .err()
                .context("a host-network pod started in a VM")?;
            let message = format!("{err:#}");
            ensure!(
                message.contains("host's network"),
                "the error does not say why: {message}"
            );
            // containerd keeps the failed pod's record; nothing of it runs.
            for pod in h.cri().list_pods().await? {
                h.cri().remove_pod(&pod.id).await?;
            }
            // The refused pod's cgroup goes once its namespace holder is reaped.
            h.wait_for_no_leftovers(Duration::from_secs(5)).await
        })
        .await
}

#[tokio::test]
async fn interactive_exec_with_a_terminal_in_the_vm() -> Result<()> {
    Harness::start_with_vmm_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("vm-term", KUASAR_VMM_HANDLER).await?;
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

/// Runs a pod on a vmm sandboxer configured with `settings`, expects RunPodSandbox to
/// fail, and returns its error after checking that nothing of the pod is left.
async fn failed_pod_start(settings: &str) -> Result<String> {
    Harness::start_with(HarnessOptions {
        vmm_sandboxer: true,
        vmm_settings: Some(settings.to_string()),
        ..Default::default()
    })
    .await?
    .run(async |h: &Harness| {
        let started = std::time::Instant::now();
        let err = h
            .run_pod("vm-broken", KUASAR_VMM_HANDLER)
            .await
            .err()
            .context("the pod started")?;
        eprintln!("RunPodSandbox failed after {:?}", started.elapsed());
        for pod in h.cri().list_pods().await? {
            h.cri().remove_pod(&pod.id).await?;
        }
        h.wait_for_no_leftovers(Duration::from_secs(10)).await?;
        Ok(format!("{err:#}"))
    })
    .await
}

#[tokio::test]
async fn a_missing_guest_image_fails_the_pod_naming_the_file() -> Result<()> {
    let message = failed_pod_start("kernel = \"/nonexistent/vmlinux\"").await?;
    ensure!(
        message.contains("/nonexistent/vmlinux") && message.contains("make guest"),
        "the error does not name the missing kernel: {message}"
    );
    Ok(())
}

#[tokio::test]
async fn a_guest_that_cannot_boot_fails_the_pod_with_its_console() -> Result<()> {
    // Not an initramfs: the kernel finds no init, panics, and QEMU exits.
    let initrd = std::env::temp_dir().join(format!("kuasar-bad-initrd-{}", std::process::id()));
    std::fs::write(&initrd, "not an initramfs\n")?;
    let result = failed_pod_start(&format!("initrd = {:?}", initrd.display().to_string())).await;
    std::fs::remove_file(&initrd)?;
    let message = result?;
    ensure!(
        message.contains("exited") && message.contains("before its guest was ready"),
        "the error does not say that the VM ended: {message}"
    );
    ensure!(
        message.contains("init"),
        "the error does not quote the guest's complaint about init: {message}"
    );
    Ok(())
}

#[tokio::test]
async fn a_guest_slower_than_the_boot_timeout_fails_the_pod() -> Result<()> {
    // A guest that cannot be ready in time on any machine: QEMU starts only after 3 s.
    let slow_qemu = std::env::temp_dir().join(format!("kuasar-slow-qemu-{}", std::process::id()));
    std::fs::write(
        &slow_qemu,
        "#!/bin/sh\nsleep 3\nexec qemu-system-x86_64 \"$@\"\n",
    )?;
    std::fs::set_permissions(
        &slow_qemu,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let result = failed_pod_start(&format!(
        "boot_timeout_secs = 1\nhypervisor = {:?}",
        slow_qemu.display().to_string()
    ))
    .await;
    std::fs::remove_file(&slow_qemu)?;
    let message = result?;
    ensure!(
        message.contains("not ready within 1s"),
        "the error does not name the timeout: {message}"
    );
    Ok(())
}

#[tokio::test]
async fn accelerator_auto_runs_the_pod_on_what_works() -> Result<()> {
    Harness::start_with(HarnessOptions {
        vmm_sandboxer: true,
        vmm_settings: Some("accelerator = \"auto\"".to_string()),
        ..Default::default()
    })
    .await?
    .run(async |h: &Harness| {
        // KVM here cannot run the guest: the probe fails and the pod runs under TCG. On a
        // host where KVM works the pod runs on KVM.
        let pod = h.run_pod("vm-auto", KUASAR_VMM_HANDLER).await?;
        let hello = h.container_config("hello", BUSYBOX_IMAGE, &["echo", "hello"]);
        let hello_id = h.start_container(&pod, &hello).await?;
        h.cri()
            .wait_container_exited(&hello_id, EXIT_TIMEOUT)
            .await?;
        ensure!(h.container_log(&pod, &hello)? == "hello\n", "no output");
        let log = std::fs::read_to_string(&h.layout().vmm_log)?;
        ensure!(
            log.contains("accelerator auto:"),
            "the sandboxer does not say which accelerator it settled on"
        );
        h.remove_pod_and_check(&pod).await
    })
    .await
}
