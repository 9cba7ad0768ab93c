//! Boots the test guest image `make guest` builds (`initramfs-test.cpio`, whose shell
//! init only reports readiness) in a QEMU microVM with a vsock device (served by the
//! `vhost-device-vsock` that `scripts/setup.sh` unpacks, or the one named by
//! `KUASAR_VHOST_VSOCK`), waits for the guest to report ready on the virtio-serial
//! port, stops the VM and checks that none of its processes is left.
//!
//! `cargo run -p vmm-sandboxer --example boot -- [tcg|kvm] [timeout-seconds] [keep]`
//!
//! With `keep`, the VM's run directory (console log, QEMU's and the vsock backend's
//! logs) is left in place and its path printed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixStream;
use vmm_sandboxer::hypervisor::qemu::Qemu;
use vmm_sandboxer::hypervisor::{Accelerator, BootError, Hypervisor, VmSpec, VsockSpec};
use vmm_sandboxer::runtime::{host_tsc_khz, GUEST_CMDLINE};

/// What the guest's init writes once it is up.
const READY_LINE: &str = "KUASAR-GUEST-READY";

/// Reads the agent port until the guest's ready line arrives.
async fn guest_ready(socket: PathBuf) -> anyhow::Result<()> {
    let stream = loop {
        match UnixStream::connect(&socket).await {
            Ok(stream) => break stream,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let mut lines = BufReader::new(stream).lines();
    while let Some(line) = lines.next_line().await? {
        if line.contains(READY_LINE) {
            return Ok(());
        }
    }
    anyhow::bail!("the agent port closed before the guest was ready")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kuasar_sandbox::reaper::start().context("start the reaper")?;
    let mut args = std::env::args().skip(1);
    let accelerator = match args.next().as_deref() {
        None | Some("tcg") => Accelerator::Tcg,
        Some("kvm") => Accelerator::Kvm,
        Some(other) => anyhow::bail!("unknown accelerator {other:?} (tcg or kvm)"),
    };
    let timeout = Duration::from_secs(args.next().map_or(Ok(30), |s| s.parse())?);
    let keep = match args.next().as_deref() {
        None => false,
        Some("keep") => true,
        Some(other) => anyhow::bail!("unknown argument {other:?} (keep)"),
    };

    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache");
    let guest = cache.join("guest");
    let vhost_vsock = vhost_vsock_binary(&cache)?;
    let run_dir = std::env::temp_dir().join(format!("kuasar-boot-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)?;
    let khz = host_tsc_khz();
    let spec = VmSpec {
        id: "boot".into(),
        kernel: guest.join("vmlinux"),
        initrd: guest.join("initramfs-test.cpio"),
        cmdline: format!("{GUEST_CMDLINE} tsc_early_khz={khz}"),
        memory_mib: 256,
        vcpus: 1,
        accelerator,
        run_dir: run_dir.clone(),
        shares: Vec::new(),
        vsock: Some(VsockSpec::new(vhost_vsock)),
        network: None,
    };
    let booted = boot(spec, timeout).await;
    if keep {
        println!("run directory kept: {}", run_dir.display());
    } else {
        std::fs::remove_dir_all(&run_dir)?;
    }
    let (booted, elapsed) = booted?;
    println!("QEMU and vhost-device-vsock stopped; none of their processes is left");
    let ms = elapsed.as_secs_f64() * 1000.0;
    match booted {
        Ok(()) => println!("guest ready after {ms:.0} ms"),
        Err(err) => println!("boot failed after {ms:.0} ms: {err}"),
    }
    Ok(())
}

/// Starts the VM of `spec`, waits for its guest, stops it and checks that none of its
/// processes is left. Returns how the boot went and how long it took.
async fn boot(
    spec: VmSpec,
    timeout: Duration,
) -> anyhow::Result<(Result<(), BootError>, Duration)> {
    let mut vm = Qemu::new(spec, "qemu-system-x86_64".into());
    let began = Instant::now();
    vm.start().await?;
    let mut pids: Vec<u32> = vm.pid().into_iter().collect();
    println!("QEMU pid {:?}", vm.pid());
    for pid in vm.helper_pids() {
        println!("vhost-device-vsock pid {pid}");
        pids.push(pid);
    }
    if let Some(uds) = vm.vsock_uds() {
        println!("hybrid vsock at {}", uds.display());
    }

    let ready = Box::pin(guest_ready(vm.agent_address()));
    let booted = vm.wait_ready(ready, timeout).await;
    let elapsed = began.elapsed();
    vm.stop(Duration::from_secs(2)).await?;

    let left: Vec<u32> = pids
        .into_iter()
        .filter(|&pid| kill(Pid::from_raw(pid as i32), None).is_ok())
        .collect();
    anyhow::ensure!(left.is_empty(), "processes of the VM still run: {left:?}");
    Ok((booted, elapsed))
}

/// The vhost-device-vsock to serve the VM's vsock: `KUASAR_VHOST_VSOCK`, or the one
/// `scripts/setup.sh` unpacks under `cache`.
fn vhost_vsock_binary(cache: &Path) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("KUASAR_VHOST_VSOCK") {
        return Ok(path.into());
    }
    std::fs::read_dir(cache)
        .with_context(|| format!("read {}", cache.display()))?
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("vhost-device-vsock-")
        })
        .map(|entry| entry.path().join("usr/bin/vhost-device-vsock"))
        .find(|binary| binary.is_file())
        .with_context(|| {
            format!(
                "no vhost-device-vsock under {} (run scripts/setup.sh or set KUASAR_VHOST_VSOCK)",
                cache.display()
            )
        })
}
