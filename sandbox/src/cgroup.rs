//! Cgroups the sandboxer creates itself, on cgroup v1, v2 and the hybrid layout: the
//! pod-level cgroup of a namespace holder, and the cgroups of containers that a family
//! runs without runc. Limits, freezing and usage metrics live here too.

use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};

/// One cgroup, present in every mounted hierarchy (cgroupfs layout).
#[derive(Debug, Clone, Default)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
}

impl Cgroup {
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

    /// Creates the cgroup at `path` (an OCI `cgroupsPath` in cgroupfs form, such as
    /// `/kubepods/pod1234/<container id>`).
    pub fn create_path(path: &str) -> anyhow::Result<Self> {
        let relative = relative_path(path)?;
        let name = relative
            .file_name()
            .context("cgroup path has no name")?
            .to_string_lossy()
            .into_owned();
        let parent = relative
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        Self::create(&parent, &name)
    }

    /// The cgroup at `path` (an OCI `cgroupsPath` in cgroupfs form) in the hierarchies
    /// where it exists, without creating it; a path in systemd's `slice:prefix:name` form
    /// names no directory and gives an empty cgroup.
    pub fn existing(path: &str) -> anyhow::Result<Self> {
        let relative = relative_path(path)?;
        if relative.as_os_str().is_empty() {
            bail!("cgroup path {path:?} names no cgroup");
        }
        let dirs = hierarchies()?
            .into_iter()
            .map(|mountpoint| mountpoint.join(&relative))
            .filter(|dir| dir.is_dir())
            .collect();
        Ok(Self { dirs })
    }

    /// Writes `value` to the control file `file` in every hierarchy that has it
    /// (`memory.limit_in_bytes` exists only in the v1 memory hierarchy, for example).
    /// Returns whether any hierarchy had the file.
    pub fn set(&self, file: &str, value: &str) -> anyhow::Result<bool> {
        let mut found = false;
        for dir in &self.dirs {
            let path = dir.join(file);
            if path.exists() {
                std::fs::write(&path, value)
                    .with_context(|| format!("write {value:?} to {}", path.display()))?;
                found = true;
            }
        }
        Ok(found)
    }

    /// Reads the control file `file` from the first hierarchy that has it.
    pub fn get(&self, file: &str) -> Option<String> {
        self.dirs
            .iter()
            .find_map(|dir| std::fs::read_to_string(dir.join(file)).ok())
    }

    /// Pids of the processes in the cgroup.
    pub fn procs(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .dirs
            .iter()
            .filter_map(|dir| std::fs::read_to_string(dir.join("cgroup.procs")).ok())
            .flat_map(|text| {
                text.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Freezes (`true`) or thaws the processes of the cgroup.
    pub fn freeze(&self, frozen: bool) -> anyhow::Result<()> {
        let v1 = self.set("freezer.state", if frozen { "FROZEN" } else { "THAWED" })?;
        if !v1 && !self.set("cgroup.freeze", if frozen { "1" } else { "0" })? {
            anyhow::bail!("no freezer for cgroup {:?}", self.dirs.first());
        }
        Ok(())
    }

    /// Applies the memory and CPU limits of OCI `resources`.
    pub fn apply(&self, resources: &oci_spec::runtime::LinuxResources) -> anyhow::Result<()> {
        if let Some(limit) = resources.memory().as_ref().and_then(|m| m.limit()) {
            if limit > 0 {
                let value = limit.to_string();
                if !self.set("memory.limit_in_bytes", &value)? {
                    self.set("memory.max", &value)?;
                }
            }
        }
        if let Some(cpu) = resources.cpu() {
            let period = cpu.period().unwrap_or(100_000);
            if let Some(quota) = cpu.quota().filter(|q| *q > 0) {
                if !self.set("cpu.cfs_period_us", &period.to_string())?
                    || !self.set("cpu.cfs_quota_us", &quota.to_string())?
                {
                    self.set("cpu.max", &format!("{quota} {period}"))?;
                }
            }
            if let Some(shares) = cpu.shares().filter(|s| *s > 0) {
                self.set("cpu.shares", &shares.to_string())?;
            }
        }
        Ok(())
    }

    /// Resource usage, as containerd's `io.containerd.cgroups.v1.Metrics` or `v2`.
    pub fn metrics(&self) -> containerd_shim_protos::protobuf::well_known_types::any::Any {
        use containerd_shim_protos::cgroups::metrics as v1;
        use containerd_shim_protos::cgroups_v2::metrics as v2;

        let number = |file: &str| {
            self.get(file)
                .and_then(|t| t.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let stat = |file: &str, key: &str| {
            self.get(file)
                .and_then(|text| {
                    text.lines().find_map(|l| {
                        l.strip_prefix(key)
                            .and_then(|v| v.trim().parse::<u64>().ok())
                    })
                })
                .unwrap_or(0)
        };
        if is_unified() {
            let mut metrics = v2::Metrics::new();
            metrics.pids = Some(v2::PidsStat {
                current: number("pids.current"),
                ..Default::default()
            })
            .into();
            metrics.cpu = Some(v2::CPUStat {
                usage_usec: stat("cpu.stat", "usage_usec "),
                user_usec: stat("cpu.stat", "user_usec "),
                system_usec: stat("cpu.stat", "system_usec "),
                ..Default::default()
            })
            .into();
            metrics.memory = Some(v2::MemoryStat {
                usage: number("memory.current"),
                usage_limit: number("memory.max"),
                anon: stat("memory.stat", "anon "),
                file: stat("memory.stat", "file "),
                inactive_file: stat("memory.stat", "inactive_file "),
                ..Default::default()
            })
            .into();
            return pack(&metrics);
        }
        let mut metrics = v1::Metrics::new();
        metrics.pids = Some(v1::PidsStat {
            current: number("pids.current"),
            ..Default::default()
        })
        .into();
        metrics.cpu = Some(v1::CPUStat {
            usage: Some(v1::CPUUsage {
                total: number("cpuacct.usage"),
                user: number("cpuacct.usage_user"),
                kernel: number("cpuacct.usage_sys"),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
        .into();
        metrics.memory = Some(v1::MemoryStat {
            cache: stat("memory.stat", "cache "),
            rss: stat("memory.stat", "rss "),
            total_inactive_file: stat("memory.stat", "total_inactive_file "),
            usage: Some(v1::MemoryEntry {
                usage: number("memory.usage_in_bytes"),
                limit: number("memory.limit_in_bytes"),
                max: number("memory.max_usage_in_bytes"),
                failcnt: number("memory.failcnt"),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
        .into();
        pack(&metrics)
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
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(err),
        }
        // A cgroup v1 cpuset starts with no CPUs and no memory nodes, and takes no process
        // until it has some. An existing directory is filled too: whoever created it may
        // not have filled it yet (pods are created side by side under one parent).
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

fn pack<M: containerd_shim_protos::protobuf::MessageFull>(
    message: &M,
) -> containerd_shim_protos::protobuf::well_known_types::any::Any {
    let mut any = containerd_shim_protos::protobuf::well_known_types::any::Any::new();
    any.type_url = M::descriptor().full_name().to_string();
    any.value = message.write_to_bytes().unwrap_or_default();
    any
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
    fn existing_never_names_a_hierarchy_root_or_a_missing_cgroup() {
        assert!(Cgroup::existing("/").is_err());
        assert!(Cgroup::existing("").is_err());
        let missing = Cgroup::existing("/kuasar-no-such-cgroup/x").unwrap();
        assert!(missing.dirs().is_empty(), "{:?}", missing.dirs());
    }

    /// Needs root, as the sandboxer does: it creates cgroups under a parent of its own.
    #[test]
    fn cgroups_created_side_by_side_under_a_new_parent_all_get_cpus_and_memory_nodes() {
        let parent = format!("kuasar-unit-{}", std::process::id());
        let created: Vec<Cgroup> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..16)
                .map(|i| {
                    let parent = &parent;
                    scope.spawn(move || Cgroup::create(parent, &format!("pod-{i}")))
                })
                .collect();
            workers
                .into_iter()
                .map(|worker| worker.join().unwrap().unwrap())
                .collect()
        });
        let mut empty = Vec::new();
        for cgroup in &created {
            for dir in cgroup.dirs() {
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    let Ok(value) = std::fs::read_to_string(dir.join(file)) else {
                        continue;
                    };
                    let at_root = hierarchies()
                        .unwrap()
                        .into_iter()
                        .find(|mountpoint| dir.starts_with(mountpoint))
                        .and_then(|mountpoint| std::fs::read_to_string(mountpoint.join(file)).ok())
                        .unwrap_or_default();
                    if value.trim().is_empty() && !at_root.trim().is_empty() {
                        empty.push(dir.join(file));
                    }
                }
            }
        }
        for cgroup in &created {
            cgroup.remove().unwrap();
        }
        Cgroup::existing(&parent).unwrap().remove().unwrap();
        assert!(empty.is_empty(), "left empty: {empty:?}");
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
