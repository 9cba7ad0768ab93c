//! Adversarial tests of the vmm sandboxer (a QEMU microVM per pod, software emulation
//! here): the VM's QEMU, its vsock backend and the sandboxer killed with SIGKILL, pods
//! stopped while their containers start or while execs run, many execs at once, large
//! output, stdin and terminals across the VM boundary, two VMs side by side, host
//! directories mounted into containers, memory limits and bad input. Every test ends by
//! checking that nothing of the run is left on the host. Needs root, `make guest` and
//! QEMU.
//!
//! The machine has two cores: the tests share a budget of VMs ([`VM_BUDGET`]) so that
//! however many run in parallel, no more than that many VMs boot at once.

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures::{SinkExt, StreamExt};
use k8s_cri::v1::{
    ContainerConfig, ContainerState, LinuxContainerResources, Mount, PodSandboxState,
};
use kuasar_tests::cleanup;
use kuasar_tests::cleanup::process_alive;
use kuasar_tests::cri::{state_name, text};
use kuasar_tests::harness::{log_tail, wait_until, within};
use kuasar_tests::images::BUSYBOX_IMAGE;
use kuasar_tests::terminal::{
    self, exec_on_terminal, open_exec_session, TerminalSession, TERMINAL_CHECK,
};
use kuasar_tests::{CriClient, Harness, Pod, KUASAR_VMM_HANDLER};
use tokio_tungstenite::tungstenite::Message;

/// How many VMs the tests of this file may run at once, all tests together.
const VM_BUDGET: u32 = 3;

/// How long a container may take to exit once it should.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a single CRI call may take before it counts as hanging. Generous: the guest is
/// emulated and the machine is shared.
const CALL_TIMEOUT: Duration = Duration::from_secs(45);

/// How long the sandboxer may take to notice that a process of a VM died.
const NOTICE_TIMEOUT: Duration = Duration::from_secs(15);

const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A shell that exits 7 within a second of SIGTERM: its exit code proves that it was still
/// running when it was stopped.
const TRAPPING_SHELL: &str = "trap 'exit 7' TERM; while true; do sleep 1; done";

// ---------------------------------------------------------------------------------------
// A budget of VMs shared by the tests of this process
// ---------------------------------------------------------------------------------------

static VMS_IN_USE: Mutex<u32> = Mutex::new(0);
static VM_RETURNED: Condvar = Condvar::new();

/// Slots of the VM budget, given back when dropped.
struct VmSlots(u32);

impl VmSlots {
    /// Waits until `count` VMs fit in the budget and takes their slots.
    fn take(count: u32) -> Self {
        let count = count.min(VM_BUDGET);
        let mut in_use = VMS_IN_USE.lock().unwrap_or_else(|e| e.into_inner());
        while *in_use + count > VM_BUDGET {
            in_use = VM_RETURNED.wait(in_use).unwrap_or_else(|e| e.into_inner());
        }
        *in_use += count;
        Self(count)
    }
}

impl Drop for VmSlots {
    fn drop(&mut self) {
        let mut in_use = VMS_IN_USE.lock().unwrap_or_else(|e| e.into_inner());
        *in_use -= self.0;
        VM_RETURNED.notify_all();
    }
}

/// Runs `body` on a harness with the vmm sandboxer, once `vms` VMs fit in the budget. On
/// failure the sandboxer's log and the logs of every VM still there are printed (the
/// harness prints containerd's); then the harness checks that nothing is left.
async fn vm_test(vms: u32, body: impl AsyncFnOnce(&Harness) -> Result<()>) -> Result<()> {
    let _slots = VmSlots::take(vms);
    Harness::start_with_vmm_sandboxer()
        .await?
        .run(async |h: &Harness| {
            // On the heap: the futures of these tests are too large for a test thread's stack.
            let result = Box::pin(body(h)).await;
            if result.is_err() {
                print_vm_logs(h);
            }
            result
        })
        .await
}

/// [`vm_test`] for a body that restarts the sandboxer.
async fn restart_test(vms: u32, body: impl AsyncFnOnce(&mut Harness) -> Result<()>) -> Result<()> {
    let _slots = VmSlots::take(vms);
    Harness::start_with_vmm_sandboxer()
        .await?
        .run_mut(async |h: &mut Harness| {
            let result = Box::pin(body(h)).await;
            if result.is_err() {
                print_vm_logs(h);
            }
            result
        })
        .await
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Polls the processes of container `id` in the guest (`ps -o args`) until `check` holds
/// for their list, at most [`NOTICE_TIMEOUT`]; fails with `what` and the last list.
async fn wait_for_guest_processes(
    h: &Harness,
    id: &str,
    what: &str,
    check: impl Fn(&str) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + NOTICE_TIMEOUT;
    loop {
        let ps = h.cri().exec_sync(id, &["ps", "-o", "args"], 20).await?;
        let out = text(&ps.stdout);
        if check(&out) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{what}: {out}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// SIGKILLs the vmm sandboxer and waits until it is gone.
async fn kill_sandboxer(h: &Harness) -> Result<()> {
    let sandboxer = h.vmm_sandboxer_pid().context("no vmm sandboxer")?;
    cleanup::signal(sandboxer, libc::SIGKILL)?;
    wait_until("the sandboxer is gone", NOTICE_TIMEOUT, || {
        !process_alive(sandboxer)
    })
    .await
}

/// Fails with "`what` hangs" when `future` does not finish within [`CALL_TIMEOUT`].
async fn bounded<T>(what: &str, future: impl std::future::Future<Output = T>) -> Result<T> {
    within(CALL_TIMEOUT, what, future).await
}

/// The directory of the VMs of the harness's sandboxer.
fn vms_dir(h: &Harness) -> PathBuf {
    h.layout().vmm_state.join("vms")
}

/// The directory of `pod`'s VM: named by the first 16 characters of the sandbox id.
fn vm_dir(h: &Harness, pod: &Pod) -> PathBuf {
    let name: String = pod.id.chars().take(16).collect();
    vms_dir(h).join(name)
}

/// Processes whose command line names `pod`'s VM directory and contains `program`.
fn vm_processes(h: &Harness, pod: &Pod, program: &str) -> Vec<(u32, String)> {
    let dir = format!("{}/", vm_dir(h, pod).display());
    cleanup::host_processes()
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains(program) && cmdline.contains(&dir))
        .collect()
}

/// The QEMU process of `pod`.
fn qemu_of(h: &Harness, pod: &Pod) -> Result<u32> {
    let found = vm_processes(h, pod, "qemu-system");
    ensure!(found.len() == 1, "the pod should have one QEMU: {found:?}");
    Ok(found[0].0)
}

/// The vhost-device-vsock process of `pod`.
fn vsock_backend_of(h: &Harness, pod: &Pod) -> Result<u32> {
    let found = vm_processes(h, pod, "vhost-device-vsock");
    ensure!(
        found.len() == 1,
        "the pod should have one vsock backend: {found:?}"
    );
    Ok(found[0].0)
}

/// The guest kernel's out-of-memory kills, from `pod`'s console log.
fn guest_oom_kills(h: &Harness, pod: &Pod) -> Vec<String> {
    std::fs::read_to_string(vm_dir(h, pod).join("console.log"))
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains("Out of memory"))
        .map(str::to_string)
        .collect()
}

/// Whether `pid` still has an entry in `/proc`: alive, or a zombie nobody reaped.
fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The last `lines` lines of the file at `path`, or why it cannot be read.
fn tail(path: &Path, lines: usize) -> String {
    log_tail(path, lines).unwrap_or_else(|err| format!("({err})"))
}

/// Prints the QEMU, console and vsock logs of every VM directory (the harness prints the
/// daemons' logs).
fn print_vm_logs(h: &Harness) {
    for dir in cleanup::list_dir(&vms_dir(h)) {
        for name in ["qemu.log", "console.log", "vhost-vsock.log"] {
            let path = dir.join(name);
            if path.exists() {
                eprintln!(
                    "----- last lines of {} -----\n{}",
                    path.display(),
                    tail(&path, 40)
                );
            }
        }
    }
}

async fn pod_state(h: &Harness, pod: &Pod) -> Result<i32> {
    Ok(h.cri().pod_status(&pod.id).await?.state)
}

fn pod_state_name(state: i32) -> &'static str {
    PodSandboxState::try_from(state)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN_VALUE")
}

async fn wait_pod_state(
    h: &Harness,
    pod: &Pod,
    state: PodSandboxState,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = pod_state(h, pod).await?;
        if now == state as i32 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "pod {} is {} and not {} after {timeout:?}",
            pod.id,
            pod_state_name(now),
            state.as_str_name()
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Stops container `id` with a 10 s grace period and returns its exit code.
async fn stop_and_exit_code(h: &Harness, id: &str) -> Result<i32> {
    bounded("StopContainer", h.cri().stop_container(id, 10)).await??;
    let status = h.cri().wait_container_exited(id, EXIT_TIMEOUT).await?;
    Ok(status.exit_code)
}

/// Polls until the log of container `config` in `pod` is `expected`, for at most `timeout`.
async fn wait_for_log(
    h: &Harness,
    pod: &Pod,
    config: &ContainerConfig,
    expected: &str,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let log = h.container_log(pod, config).unwrap_or_default();
        if log == expected {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "container log differs from the expected after {timeout:?}: {} bytes instead \
                 of {}; {}",
                log.len(),
                expected.len(),
                first_difference(&log, expected)
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Where `got` first differs from `expected`, with a little context.
fn first_difference(got: &str, expected: &str) -> String {
    let at = got
        .bytes()
        .zip(expected.bytes())
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(expected.len()));
    let around = |s: &str| {
        let start = at.saturating_sub(40);
        let end = (at + 40).min(s.len());
        String::from_utf8_lossy(&s.as_bytes()[start.min(end)..end]).into_owned()
    };
    format!(
        "first difference at byte {at}: got {:?}, expected {:?}",
        around(got),
        around(expected)
    )
}

/// Runs a pod whose only container prints its hostname, and checks that it exits 0 with
/// that output: the sandboxer still serves new pods.
async fn next_pod_works(h: &Harness, name: &str) -> Result<()> {
    let pod = bounded("RunPodSandbox", h.run_pod(name, KUASAR_VMM_HANDLER)).await??;
    let check = h.container_config("check", BUSYBOX_IMAGE, &["hostname"]);
    let id = bounded("starting a container", h.start_container(&pod, &check)).await??;
    let exited = h.cri().wait_container_exited(&id, EXIT_TIMEOUT).await?;
    wait_for_log(h, &pod, &check, &format!("{name}\n"), NOTICE_TIMEOUT).await?;
    ensure!(
        exited.exit_code == 0,
        "container of pod {name} exited {}",
        exited.exit_code
    );
    bounded("removing the pod", h.remove_pod_and_check(&pod)).await?
}

/// Whether `pod`'s VM is gone from the host: no QEMU, no vsock backend, no directory.
fn vm_gone(h: &Harness, pod: &Pod) -> bool {
    vm_processes(h, pod, "qemu-system").is_empty()
        && vm_processes(h, pod, "vhost-device-vsock").is_empty()
        && !vm_dir(h, pod).exists()
}

/// What a non-terminal streaming exec printed and how it ended.
#[derive(Debug, Default)]
struct StreamedExec {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: String,
}

fn stdin_frames(input: &[u8]) -> Vec<Message> {
    input
        .chunks(16 * 1024)
        .map(|chunk| Message::Binary([&[terminal::STDIN], chunk].concat().into()))
        .collect()
}

/// Runs `command` with `input` on stdin (left open) and collects its output until the
/// session ends, at most `timeout`.
async fn exec_with_stdin(
    cri: &CriClient,
    id: &str,
    command: &[&str],
    input: &[u8],
    timeout: Duration,
) -> Result<StreamedExec> {
    let mut session = open_exec_session(cri, id, command, false).await?;
    for frame in stdin_frames(input) {
        session.send(frame).await?;
    }
    let mut out = StreamedExec::default();
    let read = async {
        while let Some(message) = session.next().await {
            let Message::Binary(data) = message? else {
                continue;
            };
            match data.first() {
                Some(&terminal::STDOUT) => out.stdout.extend_from_slice(&data[1..]),
                Some(&terminal::STDERR) => out.stderr.extend_from_slice(&data[1..]),
                Some(&terminal::ERROR) if data.len() > 1 => {
                    out.status.push_str(&String::from_utf8_lossy(&data[1..]))
                }
                _ => {}
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(timeout, read)
        .await
        .with_context(|| {
            format!("the exec session did not end within {timeout:?}: {command:?}")
        })??;
    Ok(out)
}

/// Starts `command` with `input` on stdin, then hangs up: the end of the session is the
/// end of the exec's input.
async fn exec_fed_then_hung_up(
    cri: &CriClient,
    id: &str,
    command: &[&str],
    input: &[u8],
) -> Result<()> {
    let mut session = open_exec_session(cri, id, command, false).await?;
    for frame in stdin_frames(input) {
        session.send(frame).await?;
    }
    session.close(None).await?;
    // Drain until the server acknowledges the close.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = session.next().await {}
    })
    .await;
    Ok(())
}

/// A file in the run directory for a test's own host files (the harness removes the run
/// directory at teardown).
fn test_dir(h: &Harness, name: &str) -> Result<PathBuf> {
    let dir = h.layout().run_dir.join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

// ---------------------------------------------------------------------------------------
// The VM's processes killed with SIGKILL
// ---------------------------------------------------------------------------------------

/// QEMU dies (the OOM killer, a crash, an operator): the pod's containers cannot run
/// any more. CRI must learn it: the pod reports NOTREADY, its containers exited, an exec
/// that was running ends; then everything answers promptly and removing the pod leaves
/// nothing (no vsock backend, no mounts, no VM directory).
#[tokio::test]
async fn killed_qemu_turns_the_pod_notready_and_ends_its_containers_and_execs() -> Result<()> {
    vm_test(2, async |h: &Harness| {
        let pod = h.run_pod("qemu-dies", KUASAR_VMM_HANDLER).await?;
        let shell = h.container_config("shell", BUSYBOX_IMAGE, &["sh", "-c", TRAPPING_SHELL]);
        let shell_id = h.start_container(&pod, &shell).await?;
        let sleeper = h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
        let sleeper_id = h.start_container(&pod, &sleeper).await?;
        let cri = h.cri().clone();
        let exec_in = shell_id.clone();
        let exec =
            tokio::spawn(async move { cri.exec_sync(&exec_in, &["sleep", "777"], 300).await });
        // Let the exec reach the guest.
        tokio::time::sleep(Duration::from_secs(3)).await;

        let qemu = qemu_of(h, &pod)?;
        let backend = vsock_backend_of(h, &pod)?;
        eprintln!("killing QEMU {qemu} of pod {}", pod.id);
        cleanup::signal(qemu, libc::SIGKILL)?;
        let killed_at = Instant::now();
        wait_until("QEMU is reaped", NOTICE_TIMEOUT, || !process_exists(qemu)).await?;

        wait_pod_state(h, &pod, PodSandboxState::SandboxNotready, NOTICE_TIMEOUT)
            .await
            .context("the pod of a dead VM")?;
        eprintln!("pod NOTREADY {:?} after the kill", killed_at.elapsed());
        for (name, id) in [("shell", &shell_id), ("sleeper", &sleeper_id)] {
            let status = h
                .cri()
                .wait_container_exited(id, NOTICE_TIMEOUT)
                .await
                .with_context(|| format!("container {name} of a pod whose VM died"))?;
            eprintln!(
                "{name} exited {} ({}) {:?} after the kill",
                status.exit_code,
                status.reason,
                killed_at.elapsed()
            );
            ensure!(
                status.exit_code != 0,
                "{name}, killed with its VM, reports a successful exit"
            );
        }
        let exec = within(NOTICE_TIMEOUT, "an ExecSync running when QEMU died", exec)
            .await?
            .context("the exec task panicked")?;
        eprintln!("exec running when QEMU died: {exec:?}");
        if let Ok(response) = &exec {
            ensure!(
                response.exit_code != 0,
                "an exec killed with its VM succeeded: {response:?}"
            );
        }

        let later = bounded(
            "ExecSync in a container of a dead VM",
            h.cri().exec_sync(&sleeper_id, &["true"], 10),
        )
        .await?;
        ensure!(
            later.as_ref().map_or(true, |r| r.exit_code != 0),
            "an exec succeeded in a dead VM: {later:?}"
        );
        wait_until("the dead VM's vsock backend ends", NOTICE_TIMEOUT, || {
            !process_alive(backend)
        })
        .await
        .or_else(|err| {
            // Not ending it at once is acceptable as long as removal does.
            eprintln!("note: {err:#}");
            anyhow::Ok(())
        })?;
        bounded(
            "removing the pod of a dead VM",
            h.remove_pod_and_check(&pod),
        )
        .await??;
        ensure!(vm_gone(h, &pod), "the dead VM left processes or files");
        next_pod_works(h, "after-qemu").await
    })
    .await
}

/// vhost-device-vsock carries every byte between the host and the guest agent: the
/// Task API and all stdio. Killed, the pod must either keep working (the sandboxer
/// restores the channel) or report NOTREADY with its containers exited; never READY with
/// containers that cannot be reached. Stopping and removing it must not hang and must
/// leave nothing.
#[tokio::test]
async fn killed_vsock_backend_never_leaves_a_ready_pod_that_does_not_work() -> Result<()> {
    vm_test(2, async |h: &Harness| {
        let pod = h.run_pod("vsock-dies", KUASAR_VMM_HANDLER).await?;
        let shell = h.container_config("shell", BUSYBOX_IMAGE, &["sh", "-c", TRAPPING_SHELL]);
        let shell_id = h.start_container(&pod, &shell).await?;

        let backend = vsock_backend_of(h, &pod)?;
        eprintln!("killing vhost-device-vsock {backend} of pod {}", pod.id);
        cleanup::signal(backend, libc::SIGKILL)?;
        wait_until("the vsock backend is reaped", NOTICE_TIMEOUT, || {
            !process_exists(backend)
        })
        .await?;
        // Give the sandboxer the time it has to notice a dead VM.
        tokio::time::sleep(NOTICE_TIMEOUT).await;

        let probe = bounded(
            "ExecSync after the vsock backend was killed",
            h.cri().exec_sync(&shell_id, &["hostname"], 10),
        )
        .await?;
        let works = probe
            .as_ref()
            .is_ok_and(|r| r.exit_code == 0 && text(&r.stdout) == "vsock-dies");
        let state = pod_state(h, &pod).await?;
        let container = h.cri().container_status(&shell_id).await?;
        eprintln!(
            "after the vsock backend died: exec {probe:?}, pod {}, container {} ({})",
            pod_state_name(state),
            state_name(container.state),
            container.exit_code
        );
        if works {
            ensure!(
                state == PodSandboxState::SandboxReady as i32
                    && container.state == ContainerState::ContainerRunning as i32,
                "exec works but the pod is {} and the container {}",
                pod_state_name(state),
                state_name(container.state)
            );
            let code = stop_and_exit_code(h, &shell_id).await?;
            ensure!(code == 7, "the shell exited {code} on SIGTERM, not 7");
        } else {
            ensure!(
                state == PodSandboxState::SandboxNotready as i32,
                "the pod is still READY {NOTICE_TIMEOUT:?} after its vsock backend died, \
                 although its container cannot be reached (exec: {probe:?})"
            );
            // containerd turns the container EXITED when the exit event it publishes with
            // the pod's arrives, which may be a moment after.
            h.cri()
                .wait_container_exited(&shell_id, NOTICE_TIMEOUT)
                .await
                .context("the pod is NOTREADY but its container is not reported exited")?;
        }
        bounded("removing the pod", h.remove_pod_and_check(&pod)).await??;
        ensure!(vm_gone(h, &pod), "the VM left processes or files");
        next_pod_works(h, "after-vsock").await
    })
    .await
}

/// The guest kernel crashes (here: a privileged container writes `c` to
/// `/proc/sysrq-trigger`; in real life a driver bug or an out-of-memory panic). QEMU
/// ends with its guest: the pod must report NOTREADY and its containers exited, and
/// removing it must leave nothing.
#[tokio::test]
async fn guest_kernel_crash_turns_the_pod_notready_and_ends_its_containers() -> Result<()> {
    vm_test(2, async |h: &Harness| {
        let mut config = h.pod_config("crash")?;
        config
            .linux
            .get_or_insert_default()
            .security_context
            .get_or_insert_default()
            .privileged = true;
        let id = h.cri().run_pod(&config, KUASAR_VMM_HANDLER).await?;
        let pod = Pod { id, config };
        let shell = h.container_config("shell", BUSYBOX_IMAGE, &["sh", "-c", TRAPPING_SHELL]);
        let shell_id = h.start_container(&pod, &shell).await?;
        let mut crasher = h.container_config("crasher", BUSYBOX_IMAGE, &["sleep", "3600"]);
        crasher
            .linux
            .get_or_insert_default()
            .security_context
            .get_or_insert_default()
            .privileged = true;
        let crasher_id = h.start_container(&pod, &crasher).await?;
        let qemu = qemu_of(h, &pod)?;

        let crash = bounded(
            "ExecSync crashing the guest kernel",
            h.cri().exec_sync(
                &crasher_id,
                &["sh", "-c", "echo c > /proc/sysrq-trigger"],
                20,
            ),
        )
        .await?;
        eprintln!("crash exec: {crash:?}");
        let crashed_at = Instant::now();
        wait_until("QEMU ends with its crashed guest", NOTICE_TIMEOUT, || {
            !process_alive(qemu)
        })
        .await?;
        let console =
            std::fs::read_to_string(vm_dir(h, &pod).join("console.log")).unwrap_or_default();
        ensure!(
            console.contains("sysrq") || console.contains("Kernel panic"),
            "QEMU ended but the console shows no crash:\n{}",
            tail(&vm_dir(h, &pod).join("console.log"), 20)
        );
        wait_pod_state(h, &pod, PodSandboxState::SandboxNotready, NOTICE_TIMEOUT)
            .await
            .context("the pod of a crashed guest")?;
        for (name, id) in [("shell", &shell_id), ("crasher", &crasher_id)] {
            let status = h
                .cri()
                .wait_container_exited(id, NOTICE_TIMEOUT)
                .await
                .with_context(|| format!("container {name} of a crashed guest"))?;
            eprintln!(
                "{name} exited {} {:?} after the crash",
                status.exit_code,
                crashed_at.elapsed()
            );
        }
        bounded(
            "removing the pod of a crashed guest",
            h.remove_pod_and_check(&pod),
        )
        .await??;
        ensure!(vm_gone(h, &pod), "the crashed VM left processes or files");
        next_pod_works(h, "after-crash").await
    })
    .await
}

/// A container that prints a numbered line every 300 ms and exits 7 on SIGTERM.
const TICKING_SHELL: &str =
    "trap 'exit 7' TERM; i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.3; done";

/// The pod's status once containerd reaches the restarted sandboxer: containerd dials it
/// again only after its own back-off, a second or two.
async fn status_after_restart(h: &Harness, pod: &Pod) -> Result<k8s_cri::v1::PodSandboxStatus> {
    let began = Instant::now();
    loop {
        match h.cri().pod_status(&pod.id).await {
            Ok(status) => {
                eprintln!(
                    "containerd reached the restarted sandboxer after {:?}",
                    began.elapsed()
                );
                return Ok(status);
            }
            Err(err) if began.elapsed() < CALL_TIMEOUT => {
                eprintln!("PodSandboxStatus after the restart: {err:#}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(err) => return Err(err.context("PodSandboxStatus after the restart")),
        }
    }
}

/// The highest `tick <n>` line in `log`.
fn last_tick(log: &str) -> Option<u32> {
    log.lines()
        .filter_map(|line| line.strip_prefix("tick "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
}

/// The sandboxer is SIGKILLed while a pod's container keeps printing. While it is away a
/// new pod fails in bounded time. Started again, it takes the running VM over: the same
/// QEMU, the pod ready, the container running on with its output still reaching the log,
/// exec working, its stop reporting the container's own exit code, and removal leaving
/// nothing behind.
#[tokio::test]
async fn restarted_sandboxer_takes_over_running_vms() -> Result<()> {
    restart_test(1, async |h: &mut Harness| {
        let pod = h.run_pod("survivor", KUASAR_VMM_HANDLER).await?;
        let ticker = h.container_config("ticker", BUSYBOX_IMAGE, &["sh", "-c", TICKING_SHELL]);
        let id = h.start_container(&pod, &ticker).await?;
        wait_until("the container prints", EXIT_TIMEOUT, || {
            h.container_log(&pod, &ticker)
                .is_ok_and(|log| last_tick(&log).is_some_and(|n| n >= 2))
        })
        .await?;
        let qemu = qemu_of(h, &pod)?;
        let started_at = h.cri().container_status(&id).await?.started_at;
        // An exec that is still running when the sandboxer dies, and ends after its restart.
        let cri = h.cri().clone();
        let exec_in = id.clone();
        let late_exec = tokio::spawn(async move {
            cri.exec_sync(
                &exec_in,
                &["sh", "-c", "sleep 6; echo done late; exit 3"],
                120,
            )
            .await
        });
        wait_for_guest_processes(h, &id, "the exec does not run", |ps| ps.contains("sleep 6"))
            .await?;

        kill_sandboxer(h).await?;
        let config = h.pod_config("while-away")?;
        let run = bounded(
            "RunPodSandbox",
            h.cri().run_pod(&config, KUASAR_VMM_HANDLER),
        )
        .await?;
        ensure!(run.is_err(), "a pod ran without a sandboxer");
        let tick_at_restart = last_tick(&h.container_log(&pod, &ticker)?).unwrap_or(0);

        h.restart_vmm_sandboxer()?;
        ensure!(
            process_alive(qemu) && qemu_of(h, &pod)? == qemu,
            "the VM did not survive the sandboxer's restart"
        );
        let status = status_after_restart(h, &pod).await?;
        ensure!(
            status.state == PodSandboxState::SandboxReady as i32,
            "the pod is not ready after the restart: {status:?}"
        );
        let container = bounded("ContainerStatus", h.cri().container_status(&id)).await??;
        ensure!(
            container.state == ContainerState::ContainerRunning as i32
                && container.started_at == started_at,
            "the container did not run on: {} started at {} (was {started_at})",
            state_name(container.state),
            container.started_at
        );
        wait_until(
            "output written after the restart reaches the log",
            EXIT_TIMEOUT,
            || {
                h.container_log(&pod, &ticker)
                    .is_ok_and(|log| last_tick(&log).is_some_and(|n| n >= tick_at_restart + 5))
            },
        )
        .await?;

        let late = bounded("the exec begun before the restart", late_exec).await???;
        ensure!(
            late.exit_code == 3 && text(&late.stdout).trim() == "done late",
            "exec across the restart: exit {} stdout {:?} stderr {:?}",
            late.exit_code,
            text(&late.stdout),
            text(&late.stderr)
        );
        let exec = bounded(
            "ExecSync",
            h.cri()
                .exec_sync(&id, &["sh", "-c", "echo still here; exit 4"], 30),
        )
        .await??;
        ensure!(
            exec.exit_code == 4 && text(&exec.stdout).trim() == "still here",
            "exec after the restart: exit {} stdout {:?} stderr {:?}",
            exec.exit_code,
            text(&exec.stdout),
            text(&exec.stderr)
        );

        bounded("StopContainer", h.cri().stop_container(&id, 10)).await??;
        let stopped = h.cri().container_status(&id).await?;
        ensure!(
            stopped.state == ContainerState::ContainerExited as i32 && stopped.exit_code == 7,
            "stop after the restart: {} exit {}",
            state_name(stopped.state),
            stopped.exit_code
        );
        h.remove_pod_and_check(&pod).await?;
        ensure!(vm_gone(h, &pod), "the VM was left after removal");
        Ok(())
    })
    .await
}

/// The VM dies while the sandboxer is away. Restarted, the sandboxer knows the pod as
/// stopped: CRI reports it not ready and its container exited, and removal leaves no
/// process, mount or file of the VM behind.
#[tokio::test]
async fn vm_lost_while_the_sandboxer_is_away_is_reported_and_removable() -> Result<()> {
    restart_test(1, async |h: &mut Harness| {
        let pod = h.run_pod("lost", KUASAR_VMM_HANDLER).await?;
        let sleeper = h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
        let id = h.start_container(&pod, &sleeper).await?;
        let qemu = qemu_of(h, &pod)?;
        kill_sandboxer(h).await?;
        cleanup::signal(qemu, libc::SIGKILL)?;
        wait_until("QEMU is gone", NOTICE_TIMEOUT, || !process_alive(qemu)).await?;

        h.restart_vmm_sandboxer()?;
        status_after_restart(h, &pod).await?;
        wait_pod_state(h, &pod, PodSandboxState::SandboxNotready, CALL_TIMEOUT)
            .await
            .context("the pod whose VM was lost")?;
        h.cri()
            .wait_container_exited(&id, CALL_TIMEOUT)
            .await
            .context("the container of the lost VM")?;
        bounded("removing the pod", h.remove_pod_and_check(&pod)).await??;
        ensure!(vm_gone(h, &pod), "the lost VM left processes or files");
        Ok(())
    })
    .await
}

/// The sandboxer is SIGKILLed while a pod's VM boots. RunPodSandbox fails; restarted,
/// the sandboxer ends the half-started VM, containerd's clean-up of the failed pod
/// leaves nothing behind, and the next pod runs.
#[tokio::test]
async fn sandboxer_killed_while_a_vm_boots_leaves_nothing_once_restarted() -> Result<()> {
    restart_test(2, async |h: &mut Harness| {
        let config = h.pod_config("half-started")?;
        let cri = h.cri().clone();
        let run = tokio::spawn(async move { cri.run_pod(&config, KUASAR_VMM_HANDLER).await });
        let vms = vms_dir(h);
        wait_until("a VM boots", NOTICE_TIMEOUT, || {
            cleanup::host_processes().iter().any(|(_, cmdline)| {
                cmdline.contains("qemu-system") && cmdline.contains(&*vms.to_string_lossy())
            })
        })
        .await?;
        let sandboxer = h.vmm_sandboxer_pid().context("no vmm sandboxer")?;
        cleanup::signal(sandboxer, libc::SIGKILL)?;
        let run = bounded("RunPodSandbox", run).await??;
        ensure!(
            run.is_err(),
            "RunPodSandbox succeeded although the sandboxer died during it"
        );
        h.restart_vmm_sandboxer()?;
        h.wait_for_no_leftovers(CALL_TIMEOUT)
            .await
            .context("after the failed RunPodSandbox")?;
        // containerd may need a moment to dial the restarted sandboxer again.
        let began = Instant::now();
        loop {
            match next_pod_works(h, "after-restart").await {
                Ok(()) => break,
                Err(err) if began.elapsed() < CALL_TIMEOUT => {
                    eprintln!("pod after the restart: {err:#}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(err) => return Err(err),
            }
        }
        Ok(())
    })
    .await
}

/// The sandboxer is killed and one pod's record damaged before the restart. The
/// restarted sandboxer says so, ends what that pod ran (its VM, relay and namespace
/// holder, found without the record) and reports it stopped, so that it removes cleanly;
/// the other pod is taken over as usual.
#[tokio::test]
async fn a_damaged_pod_record_ends_that_pod_and_spares_the_others() -> Result<()> {
    restart_test(2, async |h: &mut Harness| {
        let damaged = h.run_pod("damaged", KUASAR_VMM_HANDLER).await?;
        let healthy = h.run_pod("healthy", KUASAR_VMM_HANDLER).await?;
        let sleeper = h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
        let damaged_id = h.start_container(&damaged, &sleeper).await?;
        let shell = h.container_config("shell", BUSYBOX_IMAGE, &["sh", "-c", TRAPPING_SHELL]);
        let healthy_id = h.start_container(&healthy, &shell).await?;

        kill_sandboxer(h).await?;
        let record = h
            .layout()
            .vmm_state
            .join("pods")
            .join(&damaged.id)
            .join("pod.json");
        std::fs::write(&record, b"{\"id\": 12")?;
        h.restart_vmm_sandboxer()?;

        status_after_restart(h, &healthy).await?;
        let log = std::fs::read_to_string(&h.layout().vmm_log)?;
        ensure!(
            log.lines()
                .any(|line| line.contains("unreadable pod record") && line.contains(&damaged.id)),
            "the sandboxer's log does not name the damaged record"
        );
        wait_pod_state(h, &damaged, PodSandboxState::SandboxNotready, CALL_TIMEOUT)
            .await
            .context("the pod whose record was damaged")?;
        h.cri()
            .wait_container_exited(&damaged_id, CALL_TIMEOUT)
            .await
            .context("the container of the pod whose record was damaged")?;
        let exec = bounded("ExecSync", h.cri().exec_sync(&healthy_id, &["true"], 30)).await??;
        ensure!(
            exec.exit_code == 0,
            "the healthy pod was not taken over: {exec:?}"
        );
        bounded("StopPodSandbox", h.cri().stop_pod(&healthy.id)).await??;
        bounded("RemovePodSandbox", h.cri().remove_pod(&healthy.id)).await??;

        bounded("removing the damaged pod", h.remove_pod_and_check(&damaged)).await??;
        ensure!(vm_gone(h, &damaged), "the damaged pod's VM was left");
        Ok(())
    })
    .await
}

/// Reads terminal output from `session` until `needle` shows up (true), the session
/// ends (`<session ended>` is appended) or `limit` passes (false).
async fn read_terminal_until(
    session: &mut terminal::ExecSession,
    needle: &str,
    seen: &mut String,
    limit: Duration,
) -> bool {
    let deadline = Instant::now() + limit;
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, session.next()).await {
            Err(_) => return false,
            Ok(None) | Ok(Some(Err(_))) => {
                seen.push_str("<session ended>");
                break;
            }
            Ok(Some(Ok(Message::Binary(data)))) => {
                if matches!(
                    data.first(),
                    Some(&terminal::STDOUT) | Some(&terminal::STDERR)
                ) {
                    seen.push_str(&String::from_utf8_lossy(&data[1..]));
                }
            }
            Ok(Some(Ok(Message::Close(_)))) => {
                seen.push_str("<session ended>");
                break;
            }
            Ok(Some(Ok(_))) => {}
        }
    }
    seen.contains(needle)
}

/// The sandboxer gets SIGTERM while a container runs with an interactive exec open on a
/// terminal. It exits at once (stdio copies do not hold it), and the restarted sandboxer
/// ends the exec, whose input was lost with the old process, instead of leaving a shell
/// waiting in the guest and a session that never ends; the container itself runs on.
#[tokio::test]
async fn sigterm_is_prompt_and_a_restart_ends_interactive_execs() -> Result<()> {
    restart_test(1, async |h: &mut Harness| {
        let pod = h.run_pod("interactive", KUASAR_VMM_HANDLER).await?;
        let shell = h.container_config("shell", BUSYBOX_IMAGE, &["sh", "-c", TRAPPING_SHELL]);
        let id = h.start_container(&pod, &shell).await?;
        let mut session = open_exec_session(h.cri(), &id, &["sh"], true).await?;
        let frame = |channel: u8, data: &[u8]| Message::Binary([&[channel], data].concat().into());
        session
            .send(frame(terminal::STDIN, b"echo before-$((1+1))\n"))
            .await?;
        let mut seen = String::new();
        ensure!(
            read_terminal_until(&mut session, "before-2", &mut seen, EXIT_TIMEOUT).await,
            "the terminal did not work before the restart: {seen:?}"
        );

        let sandboxer = h.vmm_sandboxer_pid().context("no vmm sandboxer")?;
        cleanup::signal(sandboxer, libc::SIGTERM)?;
        wait_until("the sandboxer exits on SIGTERM", NOTICE_TIMEOUT, || {
            !process_alive(sandboxer)
        })
        .await?;
        h.restart_vmm_sandboxer()?;
        status_after_restart(h, &pod).await?;
        let mut after = String::new();
        ensure!(
            read_terminal_until(&mut session, "<session ended>", &mut after, CALL_TIMEOUT).await,
            "the interactive exec did not end after the restart: {after:?}"
        );
        let _ = session.close(None).await;
        let ps = bounded(
            "ExecSync",
            h.cri().exec_sync(&id, &["ps", "-o", "args"], 30),
        )
        .await??;
        let processes = text(&ps.stdout);
        let shells: Vec<&str> = processes
            .lines()
            .map(str::trim)
            .filter(|line| *line == "sh")
            .collect();
        ensure!(
            shells.is_empty(),
            "the interactive shell is still running in the guest:\n{processes}"
        );
        bounded("StopContainer", h.cri().stop_container(&id, 10)).await??;
        let stopped = h.cri().container_status(&id).await?;
        ensure!(
            stopped.exit_code == 7,
            "the container did not run on to its own stop: exit {}",
            stopped.exit_code
        );
        h.remove_pod_and_check(&pod).await
    })
    .await
}

/// The pod's task relay dies while the pod runs: containerd has lost its task
/// connections, so the pod is reported stopped (for the kubelet to replace it) rather
/// than READY with containers nobody can reach; it removes cleanly.
#[tokio::test]
async fn a_dead_task_relay_reports_its_pod_stopped() -> Result<()> {
    vm_test(1, async |h: &Harness| {
        let pod = h.run_pod("relay-dies", KUASAR_VMM_HANDLER).await?;
        let shell = h.container_config("shell", BUSYBOX_IMAGE, &["sh", "-c", TRAPPING_SHELL]);
        let id = h.start_container(&pod, &shell).await?;
        let sockets = h.layout().vmm_state.join("sockets");
        let relays: Vec<u32> = cleanup::host_processes()
            .into_iter()
            .filter(|(_, cmdline)| {
                cmdline.contains("relay-tasks") && cmdline.contains(&*sockets.to_string_lossy())
            })
            .map(|(pid, _)| pid)
            .collect();
        ensure!(
            relays.len() == 1,
            "the pod should have one relay: {relays:?}"
        );
        cleanup::signal(relays[0], libc::SIGKILL)?;
        wait_pod_state(h, &pod, PodSandboxState::SandboxNotready, NOTICE_TIMEOUT)
            .await
            .context("the pod whose relay died")?;
        h.cri()
            .wait_container_exited(&id, CALL_TIMEOUT)
            .await
            .context("the container of a pod whose relay died")?;
        bounded("removing the pod", h.remove_pod_and_check(&pod)).await??;
        ensure!(vm_gone(h, &pod), "the VM was left after removal");
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Stopping and removing pods while things run
// ---------------------------------------------------------------------------------------

/// StopPodSandbox races StartContainer (and, the last time, CreateContainer too).
/// Whatever wins, the stop succeeds, the container does not run on, and removal leaves
/// nothing.
#[tokio::test]
async fn pod_stopped_while_its_container_starts_leaves_nothing() -> Result<()> {
    vm_test(1, async |h: &Harness| {
        for round in 0..3 {
            let pod = h
                .run_pod(&format!("race-{round}"), KUASAR_VMM_HANDLER)
                .await?;
            let config = h.container_config("racer", BUSYBOX_IMAGE, &["sleep", "3600"]);
            let created = if round < 2 {
                Some(
                    h.cri()
                        .create_container(&pod.id, &config, &pod.config)
                        .await?,
                )
            } else {
                None
            };
            let start = async {
                let id = match &created {
                    Some(id) => id.clone(),
                    None => {
                        h.cri()
                            .create_container(&pod.id, &config, &pod.config)
                            .await?
                    }
                };
                h.cri().start_container(&id).await.map(|()| id)
            };
            let stop = async {
                if round == 1 {
                    // Aim a little later: at runc starting the container in the guest.
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
                h.cri().stop_pod(&pod.id).await
            };
            let (started, stopped) = bounded(
                "StartContainer racing StopPodSandbox",
                Box::pin(async { tokio::join!(Box::pin(start), Box::pin(stop)) }),
            )
            .await?;
            eprintln!(
                "round {round}: start {:?}, stop {:?}",
                started.as_ref().map_err(|e| format!("{e:#}")),
                stopped.as_ref().map_err(|e| format!("{e:#}"))
            );
            stopped.context("StopPodSandbox racing a container start")?;
            ensure!(
                vm_processes(h, &pod, "qemu-system").is_empty(),
                "round {round}: QEMU outlived StopPodSandbox"
            );

            for container in h.cri().list_containers(Some(&pod.id)).await? {
                let deadline = Instant::now() + NOTICE_TIMEOUT;
                loop {
                    let status = h.cri().container_status(&container.id).await?;
                    if status.state != ContainerState::ContainerRunning as i32 {
                        break;
                    }
                    ensure!(
                        Instant::now() < deadline,
                        "round {round}: container {} runs on in a stopped pod",
                        container.id
                    );
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
            }
            bounded("removing the raced pod", h.remove_pod_and_check(&pod))
                .await?
                .with_context(|| format!("round {round}"))?;
            ensure!(vm_gone(h, &pod), "round {round}: the VM left something");
        }
        next_pod_works(h, "race-after").await
    })
    .await
}

/// A pod with two running containers, one of them in the middle of two execs, is
/// stopped and removed at once (what the kubelet does on a force delete): the execs end
/// promptly, every container is reported exited, and nothing is left.
#[tokio::test]
async fn removing_a_pod_with_running_containers_and_execs_ends_them_and_leaves_nothing(
) -> Result<()> {
    vm_test(2, async |h: &Harness| {
        let pod = h.run_pod("busy", KUASAR_VMM_HANDLER).await?;
        let first = h.container_config("first", BUSYBOX_IMAGE, &["sh", "-c", TRAPPING_SHELL]);
        let first_id = h.start_container(&pod, &first).await?;
        let second = h.container_config(
            "second",
            BUSYBOX_IMAGE,
            &["sh", "-c", "trap '' TERM; while true; do sleep 1; done"],
        );
        let second_id = h.start_container(&pod, &second).await?;

        let mut execs = tokio::task::JoinSet::new();
        for n in 0..2 {
            let (cri, id) = (h.cri().clone(), first_id.clone());
            execs.spawn(async move {
                let command = format!("sleep {}", 900 + n);
                cri.exec_sync(&id, &["sh", "-c", &command], 300).await
            });
        }
        wait_for_guest_processes(h, &first_id, "the execs do not run", |ps| {
            ps.contains("sleep 900") && ps.contains("sleep 901")
        })
        .await?;

        let began = Instant::now();
        within(
            Duration::from_secs(90),
            "StopPodSandbox with running containers and execs",
            h.cri().stop_pod(&pod.id),
        )
        .await??;
        eprintln!("StopPodSandbox took {:?}", began.elapsed());
        while let Some(joined) = bounded("execs of a stopped pod", execs.join_next()).await? {
            let result = joined.context("the exec task panicked")?;
            eprintln!("exec of the stopped pod: {result:?}");
            if let Ok(response) = &result {
                ensure!(
                    response.exit_code != 0,
                    "an exec killed with its pod succeeded: {response:?}"
                );
            }
        }
        for (name, id) in [("first", &first_id), ("second", &second_id)] {
            let status = h.cri().container_status(id).await?;
            ensure!(
                status.state == ContainerState::ContainerExited as i32,
                "{name} is {} after StopPodSandbox",
                state_name(status.state)
            );
            eprintln!("{name} exited {}", status.exit_code);
        }
        bounded("RemovePodSandbox", h.cri().remove_pod(&pod.id)).await??;
        ensure!(h.cri().list_pods().await?.is_empty(), "pods remain");
        ensure!(
            h.cri().list_containers(None).await?.is_empty(),
            "containers remain"
        );
        let left = h.leftovers()?;
        ensure!(left.is_empty(), "after removing the pod:\n{left}");
        ensure!(vm_gone(h, &pod), "the VM left something");
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Execs, output and input across the VM boundary
// ---------------------------------------------------------------------------------------

/// Many ExecSyncs at once in one container of a VM: each gets its own output and exit
/// code, and the container is unharmed.
#[tokio::test]
async fn twelve_concurrent_execs_in_one_container_keep_their_output_and_codes() -> Result<()> {
    const COUNT: i32 = 12;
    vm_test(1, async |h: &Harness| {
        let pod = h.run_pod("exec-crowd", KUASAR_VMM_HANDLER).await?;
        let shell = h.container_config("shell", BUSYBOX_IMAGE, &["sh", "-c", TRAPPING_SHELL]);
        let id = h.start_container(&pod, &shell).await?;

        let mut execs = tokio::task::JoinSet::new();
        for n in 0..COUNT {
            let (cri, id) = (h.cri().clone(), id.clone());
            execs.spawn(async move {
                let script = format!("echo out-{n}; echo err-{n} >&2; exit {n}");
                let response = cri.exec_sync(&id, &["sh", "-c", &script], 40).await;
                (n, response)
            });
        }
        let mut wrong = Vec::new();
        while let Some(joined) = bounded("concurrent execs", execs.join_next()).await? {
            let (n, response) = joined?;
            match response {
                Ok(r)
                    if r.exit_code == n
                        && text(&r.stdout) == format!("out-{n}")
                        && text(&r.stderr) == format!("err-{n}") => {}
                other => wrong.push(format!("exec {n}: {other:?}")),
            }
        }
        ensure!(
            wrong.is_empty(),
            "{} of {COUNT} concurrent execs went wrong:\n{}\nthe guest's OOM killer: {:?}",
            wrong.len(),
            wrong.join("\n"),
            guest_oom_kills(h, &pod)
        );
        let code = stop_and_exit_code(h, &id).await?;
        ensure!(code == 7, "the shell exited {code} on SIGTERM, not 7");
        h.remove_pod_and_check(&pod).await
    })
    .await
}

/// A container that writes 5 MB to stdout and exits at once: every byte reaches its CRI
/// log, in order. An exec printing 1 MB gets all of it back through ExecSync.
#[tokio::test]
async fn megabytes_of_output_reach_the_log_and_exec_sync_in_full() -> Result<()> {
    const LINE: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-";
    const LINES: usize = 80_660; // 80 660 lines of 65 bytes: 5 242 900 bytes
    vm_test(1, async |h: &Harness| {
        let pod = h.run_pod("chatty", KUASAR_VMM_HANDLER).await?;
        let script = format!("yes {LINE} | head -n {LINES}; echo end-of-output >&2");
        let chatty = h.container_config("chatty", BUSYBOX_IMAGE, &["sh", "-c", &script]);
        let id = h.start_container(&pod, &chatty).await?;
        let exited = h.cri().wait_container_exited(&id, EXIT_TIMEOUT).await?;
        ensure!(exited.exit_code == 0, "chatty exited {}", exited.exit_code);

        let mut expected = format!("{LINE}\n").repeat(LINES);
        let at_exit = h.container_log(&pod, &chatty).unwrap_or_default();
        eprintln!(
            "log at the container's exit: {} of {} bytes",
            at_exit.len(),
            expected.len() + "end-of-output\n".len()
        );
        // stderr's line may come anywhere relative to stdout's: check it, then drop it.
        let deadline = Instant::now() + NOTICE_TIMEOUT;
        let log = loop {
            let log = h.container_log(&pod, &chatty).unwrap_or_default();
            if log.len() >= expected.len() + "end-of-output\n".len() || Instant::now() >= deadline {
                break log;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        };
        let stdout_only = log.replacen("end-of-output\n", "", 1);
        ensure!(
            log.contains("end-of-output\n"),
            "stderr's last line is missing from the log"
        );
        ensure!(
            stdout_only == expected,
            "the log of 5 MB of output is wrong: {} bytes instead of {}; {}",
            stdout_only.len(),
            expected.len(),
            first_difference(&stdout_only, &expected)
        );

        let shell = h.container_config("shell", BUSYBOX_IMAGE, &["sh", "-c", TRAPPING_SHELL]);
        let shell_id = h.start_container(&pod, &shell).await?;
        let exec_lines = 16_132; // 1 048 580 bytes
        let exec = bounded(
            "ExecSync printing 1 MB",
            h.cri().exec_sync(
                &shell_id,
                &["sh", "-c", &format!("yes {LINE} | head -n {exec_lines}")],
                60,
            ),
        )
        .await??;
        expected = format!("{LINE}\n").repeat(exec_lines);
        let got = String::from_utf8_lossy(&exec.stdout);
        ensure!(
            exec.exit_code == 0 && got == expected,
            "ExecSync of 1 MB: exit {}, {} bytes instead of {}; {}",
            exec.exit_code,
            got.len(),
            expected.len(),
            first_difference(&got, &expected)
        );
        let code = stop_and_exit_code(h, &shell_id).await?;
        ensure!(code == 7, "the shell exited {code} on SIGTERM, not 7");
        h.remove_pod_and_check(&pod).await
    })
    .await
}

/// `kubectl exec -i`: stdin of an exec reaches the process in the guest, byte for byte,
/// and the end of the session is seen as the end of the input (`wc -c` ends and counts).
#[tokio::test]
async fn exec_stdin_reaches_the_guest_and_its_end_is_seen() -> Result<()> {
    vm_test(1, async |h: &Harness| {
        let pod = h.run_pod("stdin", KUASAR_VMM_HANDLER).await?;
        let shell = h.container_config("shell", BUSYBOX_IMAGE, &["sh", "-c", TRAPPING_SHELL]);
        let id = h.start_container(&pod, &shell).await?;
        stdin_reaches_the_process(h, &id, STDIN_BYTES).await?;
        let code = stop_and_exit_code(h, &id).await?;
        ensure!(code == 7, "the shell exited {code} on SIGTERM, not 7");
        h.remove_pod_and_check(&pod).await
    })
    .await
}

/// How much input the stdin test sends.
const STDIN_BYTES: usize = 300_000;

/// Feeds an exec of container `id` a line it answers, then `bytes` bytes that it counts
/// once its input ends.
async fn stdin_reaches_the_process(h: &Harness, id: &str, bytes: usize) -> Result<()> {
    // A line, answered without needing the end of the input.
    let line = exec_with_stdin(
        h.cri(),
        id,
        &["sh", "-c", "read line; echo got:$line"],
        b"hello-from-stdin\n",
        Duration::from_secs(40),
    )
    .await?;
    eprintln!("read a line: {line:?}");
    ensure!(
        text(&line.stdout) == "got:hello-from-stdin",
        "the exec did not read its stdin: {line:?}"
    );

    // Many bytes, then the end of the input: `wc` writes its count once it sees the end.
    let input: Vec<u8> = (0..bytes).map(|i| b'a' + (i % 26) as u8).collect();
    exec_fed_then_hung_up(
        h.cri(),
        id,
        &[
            "sh",
            "-c",
            "wc -c > /tmp/count.new && mv /tmp/count.new /tmp/count",
        ],
        &input,
    )
    .await?;
    let deadline = Instant::now() + NOTICE_TIMEOUT;
    loop {
        let count = h
            .cri()
            .exec_sync(
                id,
                &[
                    "sh",
                    "-c",
                    "cat /tmp/count 2>/dev/null; ps -o args | grep -c '[w]c -c'",
                ],
                20,
            )
            .await?;
        let out = text(&count.stdout);
        let lines: Vec<&str> = out.lines().collect();
        if lines.len() == 2 {
            ensure!(
                lines[0] == bytes.to_string(),
                "the exec counted {} bytes of the {bytes} sent on its stdin",
                lines[0]
            );
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{NOTICE_TIMEOUT:?} after the session that fed it {bytes} bytes ended, the exec \
             has not seen the end of its input (no count; `wc -c` processes still running: \
             {})",
            lines.last().unwrap_or(&"?")
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// `crictl exec -it`: the exec gets a terminal of the size the client asked for, and
/// its exit code comes back.
#[tokio::test]
async fn interactive_exec_gets_a_terminal_of_the_requested_size() -> Result<()> {
    vm_test(1, async |h: &Harness| {
        let pod = h.run_pod("term", KUASAR_VMM_HANDLER).await?;
        let shell = h.container_config("shell", BUSYBOX_IMAGE, &["sleep", "3600"]);
        let shell_id = h.start_container(&pod, &shell).await?;

        let TerminalSession { output, status } = exec_on_terminal(
            h.cri(),
            &shell_id,
            &["sh"],
            (100, 30),
            TERMINAL_CHECK,
            Duration::from_secs(40),
        )
        .await?;
        eprintln!("terminal: {output:?}, status {status:?}");
        ensure!(
            output.contains("/dev/pts/"),
            "no terminal in the exec: {output:?}"
        );
        ensure!(
            output.contains("tty-ok-42"),
            "command output missing: {output:?}"
        );
        ensure!(
            status.contains("NonZeroExitCode") && status.contains("\"3\""),
            "exit status {status:?}"
        );
        ensure!(
            output.contains("30 100"),
            "terminal size 100x30 not applied in the guest: {output:?}"
        );
        h.remove_pod_and_check(&pod).await
    })
    .await
}

/// ExecSync's timeout makes containerd kill the exec: the process in the guest must go,
/// and the container goes on taking execs.
#[tokio::test]
async fn exec_sync_timeout_kills_the_exec_in_the_guest() -> Result<()> {
    vm_test(1, async |h: &Harness| {
        let pod = h.run_pod("exec-timeout", KUASAR_VMM_HANDLER).await?;
        let shell = h.container_config("shell", BUSYBOX_IMAGE, &["sh", "-c", TRAPPING_SHELL]);
        let id = h.start_container(&pod, &shell).await?;

        let began = Instant::now();
        let result = bounded(
            "ExecSync with a 2 s timeout",
            h.cri().exec_sync(&id, &["sleep", "987"], 2),
        )
        .await?;
        let elapsed = began.elapsed();
        eprintln!("timed out exec: {result:?} after {elapsed:?}");
        ensure!(
            elapsed < Duration::from_secs(20),
            "ExecSync with a 2 s timeout took {elapsed:?}"
        );
        if let Ok(response) = &result {
            ensure!(
                response.exit_code != 0,
                "a timed out exec succeeded: {response:?}"
            );
        }
        wait_for_guest_processes(
            h,
            &id,
            &format!("the timed out exec still runs in the guest {NOTICE_TIMEOUT:?} later"),
            |ps| !ps.contains("sleep 987"),
        )
        .await?;
        let again = h.cri().exec_sync(&id, &["echo", "again"], 20).await?;
        ensure!(text(&again.stdout) == "again", "exec after: {again:?}");
        let code = stop_and_exit_code(h, &id).await?;
        ensure!(code == 7, "the shell exited {code} on SIGTERM, not 7");
        h.remove_pod_and_check(&pod).await
    })
    .await
}

/// A container ignoring SIGTERM is killed once StopContainer's grace period is over,
/// and an exec still running in it ends with it instead of keeping ExecSync waiting.
#[tokio::test]
async fn stopping_a_container_that_ignores_sigterm_kills_it_and_ends_its_exec() -> Result<()> {
    vm_test(1, async |h: &Harness| {
        let pod = h.run_pod("stubborn", KUASAR_VMM_HANDLER).await?;
        let stubborn = h.container_config(
            "stubborn",
            BUSYBOX_IMAGE,
            &["sh", "-c", "trap '' TERM; while true; do sleep 1; done"],
        );
        let id = h.start_container(&pod, &stubborn).await?;
        let cri = h.cri().clone();
        let exec_in = id.clone();
        let exec =
            tokio::spawn(async move { cri.exec_sync(&exec_in, &["sleep", "300"], 200).await });
        tokio::time::sleep(Duration::from_secs(3)).await;

        let began = Instant::now();
        bounded("StopContainer", h.cri().stop_container(&id, 2)).await??;
        let status = h.cri().wait_container_exited(&id, EXIT_TIMEOUT).await?;
        ensure!(
            status.exit_code == 137,
            "a shell ignoring SIGTERM exited {} after StopContainer, not 137",
            status.exit_code
        );
        let exec = bounded("ExecSync of an exec in a stopped container", exec)
            .await?
            .context("the exec task panicked")?;
        let elapsed = began.elapsed();
        eprintln!("exec in the stopped container: {exec:?} after {elapsed:?}");
        ensure!(
            elapsed < Duration::from_secs(30),
            "the exec ended {elapsed:?} after its container was stopped"
        );
        if let Ok(response) = &exec {
            ensure!(
                response.exit_code != 0,
                "an exec killed with its container succeeded: {response:?}"
            );
        }
        h.remove_pod_and_check(&pod).await
    })
    .await
}

/// Containers that exit before containerd's Wait could be answered report their exact
/// code and full output.
#[tokio::test]
async fn containers_that_exit_at_once_report_exact_codes_and_output() -> Result<()> {
    vm_test(1, async |h: &Harness| {
        let pod = h.run_pod("quick", KUASAR_VMM_HANDLER).await?;
        let cases: [(&str, &str, i32); 4] = [
            ("zero", "echo out-zero", 0),
            ("code", "echo out-code; echo err-code >&2; exit 42", 42),
            ("killed", "echo out-killed; kill -9 $$", 137),
            ("true", "true", 0),
        ];
        let mut wrong = Vec::new();
        for (name, script, expected) in cases {
            let config = h.container_config(name, BUSYBOX_IMAGE, &["sh", "-c", script]);
            let id = bounded("starting a container", h.start_container(&pod, &config)).await??;
            let status = h.cri().wait_container_exited(&id, EXIT_TIMEOUT).await?;
            let log = h.container_log(&pod, &config)?;
            if status.exit_code != expected {
                wrong.push(format!(
                    "{name} ({script}) exited {} instead of {expected}; log {log:?}",
                    status.exit_code
                ));
            }
            if name != "true" && !log.contains(&format!("out-{name}\n")) {
                wrong.push(format!("{name}: output lost at exit: {log:?}"));
            }
            if name == "code" && !log.contains("err-code\n") {
                wrong.push(format!("{name}: stderr lost at exit: {log:?}"));
            }
        }
        ensure!(wrong.is_empty(), "{}", wrong.join("\n"));
        h.remove_pod_and_check(&pod).await
    })
    .await
}

/// A container created but never started: StopContainer and RemoveContainer work on
/// it, the pod goes on taking containers, and a pod holding another such container stops
/// and is removed twice without error or leftovers.
#[tokio::test]
async fn created_but_never_started_containers_stop_and_remove_cleanly() -> Result<()> {
    vm_test(1, async |h: &Harness| {
        let pod = h.run_pod("idle", KUASAR_VMM_HANDLER).await?;
        let idle = h.container_config("idle", BUSYBOX_IMAGE, &["sleep", "3600"]);
        let idle_id = h
            .cri()
            .create_container(&pod.id, &idle, &pod.config)
            .await?;
        bounded(
            "StopContainer of a created container",
            h.cri().stop_container(&idle_id, 5),
        )
        .await??;
        bounded(
            "RemoveContainer of a created container",
            h.cri().remove_container(&idle_id),
        )
        .await??;

        let after = h.container_config("after", BUSYBOX_IMAGE, &["echo", "after-idle"]);
        let after_id = h.start_container(&pod, &after).await?;
        let exited = h
            .cri()
            .wait_container_exited(&after_id, EXIT_TIMEOUT)
            .await?;
        wait_for_log(h, &pod, &after, "after-idle\n", NOTICE_TIMEOUT).await?;
        ensure!(
            exited.exit_code == 0,
            "the next container exited {}",
            exited.exit_code
        );

        let idle2 = h.container_config("idle2", BUSYBOX_IMAGE, &["sleep", "3600"]);
        h.cri()
            .create_container(&pod.id, &idle2, &pod.config)
            .await?;
        bounded("StopPodSandbox", h.cri().stop_pod(&pod.id)).await??;
        bounded("a second StopPodSandbox", h.cri().stop_pod(&pod.id)).await??;
        bounded("RemovePodSandbox", h.cri().remove_pod(&pod.id)).await??;
        bounded("a second RemovePodSandbox", h.cri().remove_pod(&pod.id)).await??;
        ensure!(h.cri().list_pods().await?.is_empty(), "pods remain");
        ensure!(
            h.cri().list_containers(None).await?.is_empty(),
            "containers remain"
        );
        let left = h.leftovers()?;
        ensure!(left.is_empty(), "after removing the pod:\n{left}");
        ensure!(vm_gone(h, &pod), "the VM left something");
        Ok(())
    })
    .await
}

/// The memory limit of container `id`'s cgroup in the guest, read through the path
/// `/proc/self/cgroup` names (whatever part of the hierarchy the container sees).
async fn memory_max(h: &Harness, id: &str) -> Result<String> {
    let out = h
        .cri()
        .exec_sync(
            id,
            &[
                "sh",
                "-c",
                "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max",
            ],
            20,
        )
        .await?;
    ensure!(
        out.exit_code == 0,
        "cannot read the container's memory.max: {}",
        text(&out.stderr)
    );
    Ok(text(&out.stdout))
}

/// What `kubectl top` and in-place resizing rely on: ContainerStats of a container in
/// the VM reports its CPU time and memory, and UpdateContainerResources changes the
/// memory limit the guest enforces.
#[tokio::test]
async fn stats_and_resource_updates_reach_the_guest() -> Result<()> {
    vm_test(1, async |h: &Harness| {
        let pod = h.run_pod("resources", KUASAR_VMM_HANDLER).await?;
        let mut busy = h.container_config(
            "busy",
            BUSYBOX_IMAGE,
            &[
                "sh",
                "-c",
                "head -c 8000000 /dev/urandom | md5sum; exec sleep 3600",
            ],
        );
        busy.linux.get_or_insert_default().resources = Some(LinuxContainerResources {
            memory_limit_in_bytes: 64 * 1024 * 1024,
            ..Default::default()
        });
        let id = h.start_container(&pod, &busy).await?;
        let before = memory_max(h, &id).await?;
        ensure!(
            before == (64 * 1024 * 1024).to_string(),
            "memory.max in the guest is {before:?}, not the 64 MiB limit"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let stats = bounded("ContainerStats", h.cri().container_stats(&id)).await??;
        eprintln!("stats: {stats:?}");
        let cpu = stats
            .cpu
            .as_ref()
            .and_then(|c| c.usage_core_nano_seconds.as_ref())
            .map(|v| v.value)
            .unwrap_or_default();
        let memory = stats
            .memory
            .as_ref()
            .and_then(|m| m.working_set_bytes.as_ref())
            .map(|v| v.value)
            .unwrap_or_default();
        ensure!(
            cpu > 0 && memory > 0,
            "ContainerStats of a container that hashed 8 MB: cpu {cpu} ns, working set \
             {memory} bytes"
        );

        bounded(
            "UpdateContainerResources",
            h.cri().update_container_resources(
                &id,
                LinuxContainerResources {
                    memory_limit_in_bytes: 48 * 1024 * 1024,
                    ..Default::default()
                },
            ),
        )
        .await??;
        let after = memory_max(h, &id).await?;
        ensure!(
            after == (48 * 1024 * 1024).to_string(),
            "memory.max in the guest is {after:?} after an update to 48 MiB"
        );
        // The guest is a cgroup v2 system: as on any cgroup v2 node, a container sees its
        // own cgroup at /sys/fs/cgroup (what runtimes and tools that size themselves to
        // their limit read), not the root of the guest's hierarchy with its neighbours'.
        let own = h
            .cri()
            .exec_sync(&id, &["cat", "/sys/fs/cgroup/memory.max"], 20)
            .await?;
        let listing = h
            .cri()
            .exec_sync(&id, &["ls", "/sys/fs/cgroup"], 20)
            .await?;
        let dirs: Vec<String> = text(&listing.stdout)
            .split_whitespace()
            .filter(|name| !name.contains('.'))
            .map(str::to_string)
            .collect();
        ensure!(
            text(&own.stdout) == (48 * 1024 * 1024).to_string(),
            "the container does not see its own cgroup at /sys/fs/cgroup: reading memory.max \
             there gives {:?} {:?}, and the directory holds the guest's cgroups {dirs:?}",
            text(&own.stdout),
            text(&own.stderr)
        );
        h.remove_pod_and_check(&pod).await
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Isolation between pods, host directories
// ---------------------------------------------------------------------------------------

/// Two pods started together run in two VMs: different guest kernels (boot ids), the
/// pods' own hostnames, a `/dev/shm` shared by the containers of one pod but not seen
/// by the other pod.
#[tokio::test]
async fn two_pods_run_in_separate_vms() -> Result<()> {
    vm_test(2, async |h: &Harness| {
        let (left, right) = bounded("two RunPodSandbox at once", async {
            tokio::join!(
                h.run_pod("left-pod", KUASAR_VMM_HANDLER),
                h.run_pod("right-pod", KUASAR_VMM_HANDLER)
            )
        })
        .await?;
        let (left, right) = (left?, right?);
        ensure!(
            qemu_of(h, &left)? != qemu_of(h, &right)?,
            "the pods share a QEMU"
        );
        let mut ids = Vec::new();
        for (pod, name) in [(&left, "a"), (&right, "a"), (&left, "b")] {
            let config = h.container_config(name, BUSYBOX_IMAGE, &["sh", "-c", TRAPPING_SHELL]);
            ids.push(h.start_container(pod, &config).await?);
        }
        let (left_a, right_a, left_b) = (&ids[0], &ids[1], &ids[2]);

        let probe = "hostname; cat /proc/sys/kernel/random/boot_id";
        let left_seen = h.cri().exec_sync(left_a, &["sh", "-c", probe], 20).await?;
        let right_seen = h.cri().exec_sync(right_a, &["sh", "-c", probe], 20).await?;
        let (left_seen, right_seen) = (text(&left_seen.stdout), text(&right_seen.stdout));
        let host_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
        eprintln!("left: {left_seen:?}, right: {right_seen:?}");
        let left_lines: Vec<&str> = left_seen.lines().collect();
        let right_lines: Vec<&str> = right_seen.lines().collect();
        ensure!(
            left_lines.first() == Some(&"left-pod") && right_lines.first() == Some(&"right-pod"),
            "hostnames: {left_seen:?} and {right_seen:?}"
        );
        ensure!(
            left_lines.get(1) != right_lines.get(1),
            "both pods run on one kernel: {left_seen:?} {right_seen:?}"
        );
        ensure!(
            !left_seen.contains(host_boot.trim()),
            "a pod runs on the host's kernel"
        );

        let write = h
            .cri()
            .exec_sync(
                left_a,
                &[
                    "sh",
                    "-c",
                    "echo secret-of-left > /dev/shm/marker; echo written",
                ],
                20,
            )
            .await?;
        ensure!(text(&write.stdout) == "written", "write: {write:?}");
        let neighbour = h
            .cri()
            .exec_sync(left_b, &["cat", "/dev/shm/marker"], 20)
            .await?;
        ensure!(
            text(&neighbour.stdout) == "secret-of-left",
            "a container of the same pod does not see the pod's /dev/shm: {neighbour:?}"
        );
        let other = h
            .cri()
            .exec_sync(
                right_a,
                &[
                    "sh",
                    "-c",
                    "cat /dev/shm/marker 2>/dev/null; ls /dev/shm; echo listed",
                ],
                20,
            )
            .await?;
        ensure!(
            !text(&other.stdout).contains("secret-of-left")
                && !text(&other.stdout).contains("marker"),
            "the other pod sees the first pod's /dev/shm: {other:?}"
        );

        bounded("removing the right pod", h.remove_pod_and_check_one(&right)).await??;
        let still = h.cri().exec_sync(left_a, &["echo", "alive"], 20).await?;
        ensure!(
            text(&still.stdout) == "alive",
            "removing one pod harmed the other: {still:?}"
        );
        h.remove_pod_and_check(&left).await
    })
    .await
}

/// Three pods started at once, five times over, on a loaded two-core machine: every
/// RunPodSandbox succeeds, and in bounded time (the boot timeout the harness gives the
/// sandboxer is 60 s; a guest boots in a few seconds even under this load).
#[tokio::test]
async fn pods_started_three_at_a_time_all_boot() -> Result<()> {
    const ROUNDS: usize = 5;
    const AT_ONCE: usize = 3;
    vm_test(3, async |h: &Harness| {
        let mut failures = Vec::new();
        for round in 0..ROUNDS {
            let mut tasks = tokio::task::JoinSet::new();
            for n in 0..AT_ONCE {
                let name = format!("boot-{round}-{n}");
                let config = h.pod_config(&name)?;
                let cri = h.cri().clone();
                tasks.spawn(async move {
                    let began = Instant::now();
                    let result = cri.run_pod(&config, KUASAR_VMM_HANDLER).await;
                    (name, config, result, began.elapsed())
                });
            }
            let mut pods = Vec::new();
            while let Some(joined) = bounded("concurrent RunPodSandbox", tasks.join_next()).await? {
                let (name, config, result, took) = joined?;
                eprintln!(
                    "{name}: {:?} after {took:?}",
                    result.as_ref().map_err(|e| format!("{e:#}"))
                );
                match result {
                    Ok(id) => pods.push(Pod { id, config }),
                    Err(err) => failures.push(format!("{name} after {took:?}: {err:#}")),
                }
            }
            if !failures.is_empty() {
                print_vm_logs(h);
            }
            for pod in &pods {
                bounded("removing a pod", h.remove_pod_and_check_one(pod)).await??;
            }
            for pod in h.cri().list_pods().await? {
                bounded("removing a failed pod", async {
                    h.cri().stop_pod(&pod.id).await?;
                    h.cri().remove_pod(&pod.id).await
                })
                .await??;
            }
        }
        ensure!(
            failures.is_empty(),
            "{} of {} pods failed to start:\n{}",
            failures.len(),
            ROUNDS * AT_ONCE,
            failures.join("\n")
        );
        let left = h.leftovers()?;
        ensure!(left.is_empty(), "after the pods:\n{left}");
        Ok(())
    })
    .await
}

/// A writable host directory and a read-only host file and directory mounted into a
/// container (CRI mounts, as for `hostPath` volumes): what the container writes appears
/// on the host, the read-only ones cannot be written, and removing the pod neither
/// deletes nor changes anything in the host directories.
#[tokio::test]
async fn host_mounts_are_written_through_and_survive_pod_removal() -> Result<()> {
    vm_test(1, async |h: &Harness| {
        let data = test_dir(h, "host-data")?;
        std::fs::write(data.join("pre-existing"), "kept\n")?;
        std::fs::create_dir_all(data.join("sub"))?;
        std::fs::write(data.join("sub/nested"), "nested\n")?;
        // mountinfo escapes these characters: the sandboxer must still find the bind to
        // undo it before it removes the container's shared directory.
        let odd = test_dir(h, "host dir with spaces\\and\\backslashes")?;
        std::fs::write(odd.join("pre-existing"), "odd\n")?;
        let ro_dir = test_dir(h, "host-ro")?;
        std::fs::write(ro_dir.join("config"), "ro-content\n")?;
        let ro_file = h.layout().run_dir.join("host-ro-file");
        std::fs::write(&ro_file, "single file\n")?;
        let snapshot = |dir: &Path| -> Vec<(PathBuf, Vec<u8>)> {
            walk(dir)
                .into_iter()
                .map(|p| {
                    let content = std::fs::read(&p).unwrap_or_default();
                    (p, content)
                })
                .collect()
        };
        let ro_before = snapshot(&ro_dir);

        let pod = h.run_pod("mounts", KUASAR_VMM_HANDLER).await?;
        let mut config = h.container_config("writer", BUSYBOX_IMAGE, &["sleep", "3600"]);
        let mount = |host: &Path, container: &str, readonly: bool| Mount {
            container_path: container.to_string(),
            host_path: host.display().to_string(),
            readonly,
            ..Default::default()
        };
        config.mounts = vec![
            mount(&data, "/data", false),
            mount(&odd, "/odd", false),
            mount(&ro_dir, "/ro", true),
            mount(&ro_file, "/etc/ro-file", true),
        ];
        let id = h.start_container(&pod, &config).await?;

        let seen = h
            .cri()
            .exec_sync(
                &id,
                &[
                    "sh",
                    "-c",
                    "cat /data/pre-existing /data/sub/nested /ro/config /etc/ro-file",
                ],
                20,
            )
            .await?;
        ensure!(
            text(&seen.stdout) == "kept\nnested\nro-content\nsingle file",
            "the container does not see the host files: {seen:?}"
        );
        let write = h
            .cri()
            .exec_sync(
                &id,
                &[
                    "sh",
                    "-c",
                    "echo from-the-guest > /data/written && mkdir -p /data/dir/deeper \
                     && echo deep > /data/dir/deeper/file && echo ok",
                ],
                20,
            )
            .await?;
        ensure!(text(&write.stdout) == "ok", "write in /data: {write:?}");
        let written = std::fs::read_to_string(data.join("written")).unwrap_or_default();
        ensure!(
            written == "from-the-guest\n",
            "the container's write does not reach the host: {written:?}"
        );
        ensure!(
            std::fs::read_to_string(data.join("dir/deeper/file")).unwrap_or_default() == "deep\n",
            "a nested directory written in the guest is not on the host"
        );
        // Written on the host, seen in the guest.
        std::fs::write(data.join("from-host"), "host-side\n")?;
        let back = h
            .cri()
            .exec_sync(&id, &["cat", "/data/from-host"], 20)
            .await?;
        ensure!(
            text(&back.stdout) == "host-side",
            "a file written on the host is not seen in the guest: {back:?}"
        );

        for (target, what) in [
            ("/ro/config", "read-only directory"),
            ("/etc/ro-file", "read-only file"),
        ] {
            let attempt = h
                .cri()
                .exec_sync(
                    &id,
                    &[
                        "sh",
                        "-c",
                        &format!("echo overwritten > {target} && echo wrote"),
                    ],
                    20,
                )
                .await?;
            ensure!(
                text(&attempt.stdout) != "wrote" && attempt.exit_code != 0,
                "the container wrote to a {what} mount: {attempt:?}"
            );
        }
        let created = h
            .cri()
            .exec_sync(&id, &["sh", "-c", "touch /ro/new && echo created"], 20)
            .await?;
        ensure!(
            text(&created.stdout) != "created",
            "the container created a file in a read-only mount: {created:?}"
        );

        let odd_write = h
            .cri()
            .exec_sync(
                &id,
                &[
                    "sh",
                    "-c",
                    "cat /odd/pre-existing && echo odd-written > /odd/new && ln -s / /data/link-to-root && echo ok",
                ],
                20,
            )
            .await?;
        ensure!(
            text(&odd_write.stdout) == "odd\nok",
            "the oddly named host directory: {odd_write:?}"
        );
        let data_before = snapshot(&data);
        let odd_before = snapshot(&odd);
        ensure!(
            odd_before.len() == 2,
            "the write to the oddly named directory is not on the host: {:?}",
            names(&odd_before)
        );
        h.remove_pod_and_check(&pod).await?;
        ensure!(
            snapshot(&odd) == odd_before,
            "removing the pod changed the oddly named host directory: after {:?}",
            names(&snapshot(&odd))
        );
        ensure!(
            snapshot(&data) == data_before,
            "removing the pod changed the writable host directory: before {:?}, after {:?}",
            names(&data_before),
            names(&snapshot(&data))
        );
        ensure!(
            snapshot(&ro_dir) == ro_before,
            "the read-only host directory changed: {:?}",
            names(&snapshot(&ro_dir))
        );
        ensure!(
            std::fs::read_to_string(&ro_file)? == "single file\n",
            "the read-only host file changed"
        );
        Ok(())
    })
    .await
}

/// Every file below `dir`, sorted.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in cleanup::list_dir(dir) {
        if entry.is_dir() && !entry.is_symlink() {
            files.push(entry.clone());
            files.extend(walk(&entry));
        } else {
            files.push(entry);
        }
    }
    files.sort();
    files
}

fn names(snapshot: &[(PathBuf, Vec<u8>)]) -> Vec<String> {
    snapshot
        .iter()
        .map(|(p, c)| format!("{} ({} bytes)", p.display(), c.len()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Limits and bad input
// ---------------------------------------------------------------------------------------

/// A container over its memory limit is killed in the guest, and CRI reports it the way
/// every runtime does: exit code 137 with reason `OOMKilled` (what `kubectl` shows).
#[tokio::test]
async fn memory_limit_is_enforced_and_reported_as_oomkilled() -> Result<()> {
    vm_test(1, async |h: &Harness| {
        let pod = h.run_pod("oom", KUASAR_VMM_HANDLER).await?;
        let mut hog = h.container_config(
            "hog",
            BUSYBOX_IMAGE,
            &[
                "sh",
                "-c",
                "echo start; exec dd if=/dev/zero of=/dev/null bs=96M count=1",
            ],
        );
        hog.linux.get_or_insert_default().resources = Some(LinuxContainerResources {
            memory_limit_in_bytes: 32 * 1024 * 1024,
            ..Default::default()
        });
        let id = h.start_container(&pod, &hog).await?;
        let status = h.cri().wait_container_exited(&id, EXIT_TIMEOUT).await?;
        let log = h.container_log(&pod, &hog).unwrap_or_default();
        eprintln!(
            "hog exited {} reason {:?} log {log:?}",
            status.exit_code, status.reason
        );
        ensure!(
            status.exit_code != 0,
            "a 96 MB allocation succeeded under a 32 MB limit: the limit is not applied in \
             the guest (log {log:?})"
        );
        ensure!(
            status.exit_code == 137 && status.reason == "OOMKilled",
            "a container killed over its memory limit is reported with exit code {} and \
             reason {:?}, not 137 and \"OOMKilled\"",
            status.exit_code,
            status.reason
        );
        h.remove_pod_and_check(&pod).await
    })
    .await
}

#[tokio::test]
async fn exec_of_a_missing_binary_names_it_and_the_container_is_unharmed() -> Result<()> {
    vm_test(1, async |h: &Harness| {
        let pod = h.run_pod("exec-missing", KUASAR_VMM_HANDLER).await?;
        let shell = h.container_config("shell", BUSYBOX_IMAGE, &["sh", "-c", TRAPPING_SHELL]);
        let id = h.start_container(&pod, &shell).await?;
        let missing = "/no/such/exec-binary";
        let result = bounded(
            "ExecSync of a missing binary",
            h.cri().exec_sync(&id, &[missing], 20),
        )
        .await?;
        eprintln!("exec of a missing binary: {result:?}");
        match &result {
            Ok(response) => ensure!(
                response.exit_code != 0 && text(&response.stderr).contains(missing),
                "exec of a missing binary: {response:?}"
            ),
            Err(err) => ensure!(
                format!("{err:#}").contains(missing),
                "the error does not name the binary: {err:#}"
            ),
        }
        let fine = h.cri().exec_sync(&id, &["echo", "fine"], 20).await?;
        ensure!(text(&fine.stdout) == "fine", "exec after: {fine:?}");
        let status = h.cri().container_status(&id).await?;
        ensure!(
            status.state == ContainerState::ContainerRunning as i32,
            "the container is {} after a failed exec",
            state_name(status.state)
        );
        let code = stop_and_exit_code(h, &id).await?;
        ensure!(code == 7, "the shell exited {code} on SIGTERM, not 7");
        h.remove_pod_and_check(&pod).await
    })
    .await
}

/// Hostnames at the edge: the longest a kernel takes (64 bytes, with dots and digits)
/// reaches the guest as it is; one byte more fails RunPodSandbox with an error naming
/// the hostname, and the failed pod leaves no VM behind.
#[tokio::test]
async fn odd_hostnames_reach_the_guest_or_fail_the_pod_cleanly() -> Result<()> {
    vm_test(1, async |h: &Harness| {
        let longest = format!("a1.b-2.{}", "x".repeat(57));
        ensure!(longest.len() == 64, "{}", longest.len());
        let mut config = h.pod_config("odd-host")?;
        config.hostname = longest.clone();
        let id = bounded(
            "RunPodSandbox",
            h.cri().run_pod(&config, KUASAR_VMM_HANDLER),
        )
        .await??;
        let pod = Pod { id, config };
        let check = h.container_config("check", BUSYBOX_IMAGE, &["hostname"]);
        let cid = h.start_container(&pod, &check).await?;
        h.cri().wait_container_exited(&cid, EXIT_TIMEOUT).await?;
        wait_for_log(h, &pod, &check, &format!("{longest}\n"), NOTICE_TIMEOUT).await?;
        h.remove_pod_and_check(&pod).await?;

        let too_long = format!("{longest}z");
        let mut config = h.pod_config("too-long-host")?;
        config.hostname = too_long.clone();
        let run = bounded(
            "RunPodSandbox",
            h.cri().run_pod(&config, KUASAR_VMM_HANDLER),
        )
        .await?;
        match run {
            Ok(id) => {
                let status = h.cri().pod_status(&id).await?;
                bail!(
                    "a pod ran with a {}-byte hostname the kernel cannot take (state {}); \
                     hostname in the guest unknown",
                    too_long.len(),
                    pod_state_name(status.state)
                );
            }
            Err(err) => {
                let message = format!("{err:#}");
                eprintln!("too long hostname: {message}");
                ensure!(
                    message.contains(&too_long),
                    "the error does not name the hostname: {message}"
                );
            }
        }
        let pid = h.vmm_sandboxer_pid().context("no vmm sandboxer")?;
        ensure!(process_alive(pid), "the vmm sandboxer died");
        h.wait_for_no_leftovers(NOTICE_TIMEOUT)
            .await
            .context("after the failed pod")?;
        let vms = cleanup::list_dir(&vms_dir(h));
        ensure!(vms.is_empty(), "VM directories left: {vms:?}");
        let qemus: Vec<_> = cleanup::run_processes(h.layout(), &[])
            .into_iter()
            .filter(|(_, c)| c.contains("qemu-system") || c.contains("vhost-device-vsock"))
            .collect();
        ensure!(qemus.is_empty(), "VM processes left: {qemus:?}");
        Ok(())
    })
    .await
}

/// Removes one pod and checks that CRI forgot it; leftovers are checked once the last
/// pod is gone.
trait RemoveOne {
    async fn remove_pod_and_check_one(&self, pod: &Pod) -> Result<()>;
}

impl RemoveOne for Harness {
    async fn remove_pod_and_check_one(&self, pod: &Pod) -> Result<()> {
        self.cri().stop_pod(&pod.id).await?;
        self.cri().remove_pod(&pod.id).await?;
        let pods = self.cri().list_pods().await?;
        ensure!(
            pods.iter().all(|p| p.id != pod.id),
            "pod {} still listed after removal",
            pod.id
        );
        ensure!(
            vm_processes(self, pod, "qemu-system").is_empty()
                && vm_processes(self, pod, "vhost-device-vsock").is_empty(),
            "the removed pod's VM still runs"
        );
        Ok(())
    }
}
