//! What the agent does as the guest's init before it serves: the file systems a
//! container runtime needs, the kernel modules of the image, the shared directory.

use std::ffi::CString;
use std::fs::File;
use std::path::Path;

use anyhow::Context;
use nix::mount::{mount, MsFlags};

/// Where the image lists its modules, in an order they load in.
const MODULE_ORDER: &str = "/lib/modules/load-order";

/// Brings the guest up. Each step that fails is logged and the others still run: an
/// agent that serves can report what is wrong, one that stopped cannot.
pub fn prepare_guest() {
    if let Err(err) = mount_file_systems() {
        tracing::error!(error = format!("{err:#}"), "cannot mount file systems");
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let steps: [(&str, &dyn Fn() -> anyhow::Result<()>); 3] = [
        ("load kernel modules", &|| load_modules(&cmdline)),
        ("mount the shared directory", &mount_share),
        ("bring up loopback", &loopback_up),
    ];
    for (what, step) in steps {
        if let Err(err) = step() {
            tracing::error!(error = format!("{err:#}"), "cannot {what}");
        }
    }
}

fn mount_file_systems() -> anyhow::Result<()> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let table: [(&str, &str, &str, MsFlags, &str); 8] = [
        ("proc", "/proc", "proc", nodev, ""),
        ("sysfs", "/sys", "sysfs", nodev, ""),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            "mode=0755",
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620",
        ),
        ("shm", "/dev/shm", "tmpfs", nodev, "mode=1777"),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=0755",
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=1777",
        ),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", nodev, "nsdelegate"),
    ];
    for (source, target, fstype, flags, data) in table {
        std::fs::create_dir_all(target).with_context(|| format!("create {target}"))?;
        let data = (!data.is_empty()).then_some(data);
        mount(Some(source), target, Some(fstype), flags, data)
            .with_context(|| format!("mount {fstype} at {target}"))?;
    }
    Ok(())
}

/// Loads the image's modules in their recorded order, each with the parameters the
/// kernel command line gives it (`<module>.<param>=<value>` reaches built-in code only).
fn load_modules(cmdline: &str) -> anyhow::Result<()> {
    let order =
        std::fs::read_to_string(MODULE_ORDER).with_context(|| format!("read {MODULE_ORDER}"))?;
    for file in order.lines().filter(|line| !line.is_empty()) {
        let name = file.trim_end_matches(".ko");
        let params = module_params(cmdline, name);
        let path = Path::new("/lib/modules").join(file);
        let module = File::open(&path).with_context(|| format!("open {}", path.display()))?;
        let params = CString::new(params).context("module parameters hold a NUL")?;
        match nix::kmod::finit_module(&module, &params, nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(err) => tracing::warn!(module = name, error = %err, "cannot load module"),
        }
    }
    Ok(())
}

/// The parameters for module `name` on the kernel command line, space-separated.
fn module_params(cmdline: &str, name: &str) -> String {
    let prefix = format!("{name}.");
    cmdline
        .split_whitespace()
        .filter_map(|word| word.strip_prefix(&prefix))
        .collect::<Vec<_>>()
        .join(" ")
}

fn mount_share() -> anyhow::Result<()> {
    let target = vmm_task::GUEST_SHARE_DIR;
    std::fs::create_dir_all(target).with_context(|| format!("create {target}"))?;
    mount(
        Some(vmm_task::SHARE_TAG),
        target,
        Some("9p"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("trans=virtio,version=9p2000.L,msize=262144"),
    )
    .with_context(|| format!("mount 9p tag {:?} at {target}", vmm_task::SHARE_TAG))
}

/// Runs before the reaper starts, so a plain child wait is safe here.
fn loopback_up() -> anyhow::Result<()> {
    let status = std::process::Command::new("/bin/busybox")
        .args(["ip", "link", "set", "lo", "up"])
        .status()
        .context("run /bin/busybox ip")?;
    anyhow::ensure!(status.success(), "ip link set lo up: {status}");
    Ok(())
}

/// Writes [`vmm_task::READY_LINE`] on the first virtio-serial port. Its device node
/// appears a moment after the driver binds, and opening it fails with ENXIO until the
/// host side is set up: a few tries are made.
pub fn announce_ready() {
    use std::io::Write;

    for _ in 0..200 {
        let ports = std::fs::read_dir("/dev")
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| {
                path.file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(|name| name.starts_with("vport") && name.contains('p'))
            });
        for port in ports {
            let written = std::fs::OpenOptions::new()
                .write(true)
                .open(&port)
                .and_then(|mut file| writeln!(file, "{}", vmm_task::READY_LINE));
            if written.is_ok() {
                tracing::debug!(port = %port.display(), "readiness announced");
                return;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    tracing::warn!("no virtio-serial port to announce readiness on");
}

/// The value of `name=value` on the kernel command line.
pub fn cmdline_value<'a>(cmdline: &'a str, name: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_parameters_come_from_the_command_line() {
        let cmdline = "console=ttyS0 virtio_mmio.device=4K@0xd000:5 9p.debug=0 9pnet_virtio.x=1";
        assert_eq!(module_params(cmdline, "virtio_mmio"), "device=4K@0xd000:5");
        assert_eq!(module_params(cmdline, "9p"), "debug=0");
        assert_eq!(module_params(cmdline, "vsock"), "");
    }

    #[test]
    fn command_line_values_match_whole_names() {
        let cmdline = "quiet kuasar.sandbox=pod1 kuasar.sandboxes=x";
        assert_eq!(cmdline_value(cmdline, "kuasar.sandbox"), Some("pod1"));
        assert_eq!(cmdline_value(cmdline, "kuasar"), None);
        assert_eq!(cmdline_value(cmdline, "quiet"), None);
    }
}
