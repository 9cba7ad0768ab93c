//! Host state a test run leaves behind, found and removed: processes, mounts, cgroups, the CNI
//! bridge and the run directory. Every operation first checks that what it touches belongs to
//! the run (its directory, its bridge name, its cgroup parent).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};

use crate::harness::{Layout, BASE_DIR};

/// How long killed processes get to leave their cgroups before those are removed anyway.
const CGROUP_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Directory of containerd's shim sockets, whatever its state directory is.
const SHIM_SOCKET_DIR: &str = "/run/containerd/s";

/// Directory where libcni caches the results of ADD per network and container.
const CNI_CACHE_DIR: &str = "/var/lib/cni/results";

/// Checks that `layout`'s run directory is one the harness creates: `BASE_DIR/<number>`.
pub fn check_run_dir(layout: &Layout) -> Result<()> {
    let dir = &layout.run_dir;
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    ensure!(
        dir.parent() == Some(Path::new(BASE_DIR))
            && !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_digit()),
        "refusing to touch {}: not a run directory under {BASE_DIR}",
        dir.display()
    );
    Ok(())
}

/// Processes other than `exclude` whose command line or working directory lies in the run
/// directory, with their command lines.
pub fn run_processes(layout: &Layout, exclude: &[u32]) -> Vec<(u32, String)> {
    let dir = layout.run_dir.to_string_lossy().into_owned();
    let inside = format!("{dir}/");
    let me = std::process::id();

    let mut found = Vec::new();
    for pid in all_pids() {
        if pid == me || exclude.contains(&pid) {
            continue;
        }
        let cmdline = read_cmdline(pid);
        let cwd = fs::read_link(format!("/proc/{pid}/cwd"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let in_cmdline = cmdline.contains(&inside) || cmdline.split(' ').any(|arg| arg == dir);
        let in_cwd = cwd == dir || cwd.starts_with(&inside);
        if in_cmdline || in_cwd {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Every process of the host, with its command line.
pub fn host_processes() -> Vec<(u32, String)> {
    all_pids()
        .into_iter()
        .map(|pid| (pid, read_cmdline(pid)))
        .collect()
}

/// Processes in the cgroups under the run's cgroup parent, with their command lines.
pub fn cgroup_processes(layout: &Layout) -> Vec<(u32, String)> {
    let mut pids: Vec<u32> = Vec::new();
    for dir in cgroup_dirs(layout) {
        let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) else {
            continue;
        };
        pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    pids.sort_unstable();
    pids.dedup();
    pids.into_iter()
        .map(|pid| (pid, read_cmdline(pid)))
        .collect()
}

/// Mount points at or below the run directory, deepest first.
pub fn run_mounts(layout: &Layout) -> Result<Vec<PathBuf>> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    let mut mounts: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mount_field(field)))
        .filter(|point| point.starts_with(&layout.run_dir))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    mounts.dedup();
    Ok(mounts)
}

/// Every cgroup directory at or below the run's cgroup parent, in every hierarchy, deepest
/// first.
pub fn cgroup_dirs(layout: &Layout) -> Vec<PathBuf> {
    let relative = layout.cgroup_parent.trim_start_matches('/');
    let mut dirs = Vec::new();
    for root in cgroup_roots() {
        let top = root.join(relative);
        if top.is_dir() {
            collect_dirs(&top, &mut dirs);
        }
    }
    dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    dirs
}

/// Whether the run's bridge exists.
pub fn bridge_exists(layout: &Layout) -> bool {
    Path::new("/sys/class/net").join(&layout.bridge).exists()
}

/// Entries libcni cached for the run's network.
pub fn cni_cache_entries(layout: &Layout) -> Vec<PathBuf> {
    let prefix = format!("{}-", layout.network_name);
    list_dir(Path::new(CNI_CACHE_DIR))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .collect()
}

/// The entries of `dir`, or none when it cannot be read.
pub fn list_dir(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    paths
}

/// Sends `signal` to `pid`; a process that is already gone is not an error.
pub fn signal(pid: u32, signal: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: kill(2) only takes integers and has no memory effects on this process.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ESRCH) {
            return Err(err).with_context(|| format!("cannot signal process {pid}"));
        }
    }
    Ok(())
}

/// Removes everything of the run from the host, the daemons having been stopped already:
/// kills the processes the run started, unmounts, deletes the bridge, the cgroups, the CNI
/// cache entries and finally the run directory. Goes on past failures and returns the first.
pub fn remove_run(layout: &Layout) -> Result<()> {
    check_run_dir(layout)?;
    let mut first_error: Option<anyhow::Error> = None;
    let mut note = |result: Result<()>| {
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    };

    for (pid, _) in run_processes(layout, &[]) {
        note(signal(pid, libc::SIGKILL));
    }
    note(drain_cgroups(layout));
    note(unmount_all(layout));
    note(delete_bridge(layout));
    note(remove_cgroups(layout));
    for entry in cni_cache_entries(layout) {
        note(remove_file(&entry));
    }
    for id in recorded_ids(layout) {
        note(remove_file(&shim_socket(layout, &id)));
        // The socket of a pod's kuasar shim, when the shim was killed.
        let address = layout.containerd_socket.to_string_lossy();
        note(remove_file(&kuasar_shim::launch::socket_path(
            &address, "k8s.io", &id,
        )));
        note(remove_file(
            &Path::new(CNI_CACHE_DIR).join(format!("cni-loopback-{id}-lo")),
        ));
    }
    note(remove_run_dir(layout));

    first_error.map_or(Ok(()), Err)
}

/// Ids of the sandboxes and containers containerd recorded in the run directory: what a
/// killed run may have left shim sockets and CNI cache entries for outside of it.
fn recorded_ids(layout: &Layout) -> Vec<String> {
    let cri_root = layout.containerd_root.join("io.containerd.grpc.v1.cri");
    let dirs = [
        layout.task_bundle_dir(),
        layout.cri_state_dir().join("sandboxes"),
        cri_root.join("sandboxes"),
        cri_root.join("containers"),
    ];
    let mut ids: Vec<String> = dirs
        .iter()
        .flat_map(|d| list_dir(d))
        .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
        .filter(|id| id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// The socket containerd's shim for task `id` of namespace `k8s.io` listens on: named after
/// the SHA-256 of `<containerd address>/k8s.io/<id>` in `/run/containerd/s`.
fn shim_socket(layout: &Layout, id: &str) -> PathBuf {
    let key = layout.containerd_socket.join("k8s.io").join(id);
    let digest = Sha256::digest(key.as_os_str().as_encoded_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Path::new(SHIM_SOCKET_DIR).join(hex)
}

fn remove_file(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

/// Kills the processes in the run's cgroups and waits for the cgroups to empty.
fn drain_cgroups(layout: &Layout) -> Result<()> {
    let deadline = Instant::now() + CGROUP_DRAIN_TIMEOUT;
    loop {
        let procs = cgroup_processes(layout);
        if procs.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "processes stay in cgroup {}: {procs:?}",
                layout.cgroup_parent
            );
        }
        for (pid, _) in procs {
            signal(pid, libc::SIGKILL)?;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Unmounts every mount under the run directory, deepest first, detaching the busy ones.
fn unmount_all(layout: &Layout) -> Result<()> {
    check_run_dir(layout)?;
    for point in run_mounts(layout)? {
        ensure!(
            point.starts_with(&layout.run_dir),
            "refusing to unmount {} outside {}",
            point.display(),
            layout.run_dir.display()
        );
        if let Err(e) = umount(&point, 0) {
            umount(&point, libc::MNT_DETACH).with_context(|| format!("after: {e:#}"))?;
        }
    }
    let remaining = run_mounts(layout)?;
    ensure!(
        remaining.is_empty(),
        "mounts remain under the run directory: {remaining:?}"
    );
    Ok(())
}

fn umount(point: &Path, flags: libc::c_int) -> Result<()> {
    let c_path = std::ffi::CString::new(point.as_os_str().as_encoded_bytes())
        .with_context(|| format!("mount point with NUL byte: {}", point.display()))?;
    // SAFETY: c_path is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::umount2(c_path.as_ptr(), flags) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        // EINVAL: no longer a mount point (a parent's unmount took it along).
        if err.raw_os_error() != Some(libc::EINVAL) && err.raw_os_error() != Some(libc::ENOENT) {
            return Err(err).with_context(|| format!("cannot unmount {}", point.display()));
        }
    }
    Ok(())
}

fn delete_bridge(layout: &Layout) -> Result<()> {
    let name = &layout.bridge;
    ensure!(
        name.strip_prefix("kuasar-t")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
        "refusing to delete interface {name:?}: not a test bridge"
    );
    if !bridge_exists(layout) {
        return Ok(());
    }
    let output = Command::new("ip")
        .args(["link", "delete", name, "type", "bridge"])
        .output()
        .context("cannot run ip")?;
    ensure!(
        output.status.success() || !bridge_exists(layout),
        "ip link delete {name} failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

fn remove_cgroups(layout: &Layout) -> Result<()> {
    for dir in cgroup_dirs(layout) {
        if let Err(e) = fs::remove_dir(&dir) {
            if e.kind() != io::ErrorKind::NotFound {
                return Err(e).with_context(|| format!("cannot remove cgroup {}", dir.display()));
            }
        }
    }
    Ok(())
}

/// Deletes the run directory, but only once nothing is mounted below it: a recursive delete
/// would otherwise descend into whatever a container had bind-mounted.
fn remove_run_dir(layout: &Layout) -> Result<()> {
    check_run_dir(layout)?;
    let mounts = run_mounts(layout)?;
    ensure!(
        mounts.is_empty(),
        "not removing {}: still mounted below it: {mounts:?}",
        layout.run_dir.display()
    );
    match fs::remove_dir_all(&layout.run_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", layout.run_dir.display())),
    }
}

/// Roots of the mounted cgroup hierarchies: `/sys/fs/cgroup` itself on a unified (v2) host,
/// otherwise each v1 hierarchy and the hybrid layout's `unified` one.
fn cgroup_roots() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return vec![base.to_path_buf()];
    }
    list_dir(base)
        .into_iter()
        .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()))
        .collect()
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    for entry in list_dir(dir) {
        if fs::symlink_metadata(&entry).is_ok_and(|m| m.is_dir()) {
            collect_dirs(&entry, out);
        }
    }
}

fn all_pids() -> Vec<u32> {
    list_dir(Path::new("/proc"))
        .into_iter()
        .filter_map(|p| p.file_name()?.to_str()?.parse().ok())
        .collect()
}

fn read_cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|arg| !arg.is_empty())
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Decodes the octal escapes (`\040` for a space and so on) of a mountinfo field.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(value) = u8::from_str_radix(digits, 8) {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether process `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = &stat[stat.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_fields() {
        assert_eq!(unescape_mount_field(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mount_field(r"/plain"), "/plain");
        assert_eq!(unescape_mount_field(r"/end\04"), r"/end\04");
    }

    #[test]
    fn shim_socket_is_named_after_address_namespace_and_id() {
        let layout = Layout::new(Path::new("/tmp/kuasar-t/232"), 232);
        let id = "39c4e881fa12da9339ea39442d1f0b8fad4e166bccfe48a4289859a9992bbfdb";
        assert_eq!(
            shim_socket(&layout, id),
            Path::new("/run/containerd/s/252f32efedcafab30a4505309738c93aa8da46e3011d722f1e7f7d83932833b0")
        );
    }

    #[test]
    fn rejects_foreign_run_dirs() {
        assert!(check_run_dir(&Layout::new(Path::new("/tmp/kuasar-t/12"), 12)).is_ok());
        assert!(check_run_dir(&Layout::new(Path::new("/tmp/kuasar-t/../etc"), 1)).is_err());
        assert!(check_run_dir(&Layout::new(Path::new("/"), 1)).is_err());
        assert!(check_run_dir(&Layout::new(Path::new(""), 1)).is_err());
    }
}
