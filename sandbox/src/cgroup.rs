//! The pod-level cgroup a sandbox's holder process lives in, under the cgroup parent the
//! pod asks for, on cgroup v1, v2 and the hybrid layout.

use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};

/// One cgroup, present in every mounted hierarchy.
#[derive(Debug, Clone, Default)]
pub struct PodCgroup {
    dirs: Vec<PathBuf>,
}

impl PodCgroup {
    /// Creates the cgroup `<parent>/<name>` in every hierarchy (cgroupfs layout).
    ///
    /// `parent` is the pod's cgroup parent, e.g. `/kubepods/burstable/pod1234`; it may not
    /// step out of the hierarchy with `..`.
    pub fn create(parent: &str, name: &str) -> anyhow::Result<Self> {
        let relative = relative_path(parent)?.join(name);
        let mut dirs = Vec::new();
        for mountpoint in hierarchies()? {
            let dir = mountpoint.join(&relative);
            if let Err(err) = create_dir_all(&mountpoint, &relative) {
                let cgroup = Self { dirs };
                let _ = cgroup.remove();
                return Err(err).with_context(|| format!("create cgroup {}", dir.display()));
            }
            dirs.push(dir);
        }
        Ok(Self { dirs })
    }

    /// Moves process `pid` into the cgroup in every hierarchy.
    pub fn add(&self, pid: u32) -> anyhow::Result<()> {
        for dir in &self.dirs {
            let procs = dir.join("cgroup.procs");
            std::fs::write(&procs, pid.to_string())
                .with_context(|| format!("add pid {pid} to {}", procs.display()))?;
        }
        Ok(())
    }

    /// The cgroup's directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Removes the cgroup; its processes must be gone. Safe to call twice.
    pub fn remove(&self) -> anyhow::Result<()> {
        let mut first_error = None;
        for dir in &self.dirs {
            let mut result = Ok(());
            // A reaped process can linger in cgroup.procs for a moment.
            for _ in 0..50 {
                result = std::fs::remove_dir(dir);
                match &result {
                    Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(10))
                    }
                    _ => break,
                }
            }
            match result {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    first_error.get_or_insert_with(|| {
                        anyhow::Error::new(err).context(format!("remove cgroup {}", dir.display()))
                    });
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Creates `relative` below `mountpoint` one level at a time, giving each new cpuset
/// cgroup of a v1 hierarchy its parent's CPUs and memory nodes: an empty cpuset cannot
/// take processes.
fn create_dir_all(mountpoint: &Path, relative: &Path) -> std::io::Result<()> {
    let mut dir = mountpoint.to_path_buf();
    for component in relative.components() {
        let parent = dir.clone();
        dir.push(component);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(err),
        }
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let inherited = parent.join(file);
            if !inherited.exists() {
                continue;
            }
            let value = std::fs::read_to_string(&inherited)?;
            let current = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
            if current.trim().is_empty() && !value.trim().is_empty() {
                std::fs::write(dir.join(file), value.trim())?;
            }
        }
    }
    Ok(())
}

/// Whether the host runs the unified (v2-only) cgroup hierarchy.
pub fn is_unified() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

fn relative_path(parent: &str) -> anyhow::Result<PathBuf> {
    let path = Path::new(parent);
    let mut relative = PathBuf::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => relative.push(part),
            Component::ParentDir | Component::Prefix(_) => {
                bail!("cgroup parent {parent:?} must not contain '..'")
            }
        }
    }
    Ok(relative)
}

/// Mount points of the cgroup hierarchies of this host.
fn hierarchies() -> anyhow::Result<Vec<PathBuf>> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    let mut mounts = Vec::new();
    for line in mountinfo.lines() {
        // "<id> <parent> <dev> <root> <mountpoint> <options> [optional...] - <fstype> <source> <super options>"
        let Some((fields, tail)) = line.split_once(" - ") else {
            continue;
        };
        let fstype = tail.split_whitespace().next().unwrap_or_default();
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        if let Some(mountpoint) = fields.split_whitespace().nth(4) {
            let mountpoint = PathBuf::from(mountpoint);
            if !mounts.contains(&mountpoint) {
                mounts.push(mountpoint);
            }
        }
    }
    Ok(mounts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_paths_stay_inside_the_hierarchy() {
        assert_eq!(
            relative_path("/kubepods/besteffort").unwrap(),
            Path::new("kubepods/besteffort")
        );
        assert_eq!(relative_path("").unwrap(), Path::new(""));
        assert!(relative_path("/kubepods/../../etc").is_err());
    }

    #[test]
    fn finds_the_hosts_hierarchies() {
        let mounts = hierarchies().unwrap();
        assert!(!mounts.is_empty(), "no cgroup hierarchy mounted");
        assert!(
            mounts.iter().all(|m| m.starts_with("/sys/fs/cgroup")),
            "{mounts:?}"
        );
    }
}
