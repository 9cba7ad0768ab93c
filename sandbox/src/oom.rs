//! Out-of-memory notifications for a container's memory cgroup, v1 and v2.

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use anyhow::Context;
use tokio::sync::mpsc;

/// Receives one message per OOM kill in the watched cgroup; closes when the cgroup goes.
pub type OomReceiver = mpsc::UnboundedReceiver<()>;

/// Locates the memory cgroup of a container from its OCI `cgroupsPath` (cgroupfs form).
pub fn memory_cgroup(cgroups_path: &str) -> Option<PathBuf> {
    let relative = cgroups_path.trim_start_matches('/');
    if relative.is_empty() || relative.split('/').any(|part| part == "..") {
        return None;
    }
    let root = if crate::cgroup::is_unified() {
        Path::new("/sys/fs/cgroup")
    } else {
        Path::new("/sys/fs/cgroup/memory")
    };
    let path = root.join(relative);
    path.is_dir().then_some(path)
}

/// Watches the memory cgroup at `path` for OOM kills.
pub fn watch(path: &Path) -> anyhow::Result<OomReceiver> {
    let (sender, receiver) = mpsc::unbounded_channel();
    if path.join("memory.oom_control").exists() {
        watch_v1(path, sender)?;
    } else {
        watch_v2(path, sender)?;
    }
    Ok(receiver)
}

/// cgroup v1: an eventfd registered on `memory.oom_control` fires on each OOM, and once
/// more when the cgroup is removed.
fn watch_v1(path: &Path, sender: mpsc::UnboundedSender<()>) -> anyhow::Result<()> {
    use nix::sys::eventfd::{EfdFlags, EventFd};

    let control = std::fs::File::open(path.join("memory.oom_control"))
        .with_context(|| format!("open {}/memory.oom_control", path.display()))?;
    let event = EventFd::from_flags(EfdFlags::EFD_CLOEXEC).context("create eventfd")?;
    let registration = format!("{} {}", event.as_fd().as_raw_fd(), control.as_raw_fd());
    std::fs::write(path.join("cgroup.event_control"), registration)
        .with_context(|| format!("register OOM notification on {}", path.display()))?;

    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("oom-v1".into())
        .spawn(move || {
            let _control = control;
            while event.read().is_ok() {
                if !path.exists() || sender.send(()).is_err() {
                    break;
                }
            }
        })
        .context("start OOM watcher")?;
    Ok(())
}

/// cgroup v2: `memory.events` changes are signalled by inotify; an OOM kill raises its
/// `oom_kill` counter.
fn watch_v2(path: &Path, sender: mpsc::UnboundedSender<()>) -> anyhow::Result<()> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

    let events = path.join("memory.events");
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).context("create inotify")?;
    inotify
        .add_watch(
            &events,
            AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_DELETE_SELF,
        )
        .with_context(|| format!("watch {}", events.display()))?;
    let mut seen = oom_kills(&events);
    std::thread::Builder::new()
        .name("oom-v2".into())
        .spawn(move || {
            while inotify.read_events().is_ok() {
                if !events.exists() {
                    break;
                }
                let now = oom_kills(&events);
                for _ in seen..now {
                    if sender.send(()).is_err() {
                        return;
                    }
                }
                seen = seen.max(now);
            }
        })
        .context("start OOM watcher")?;
    Ok(())
}

fn oom_kills(events: &Path) -> u64 {
    std::fs::read_to_string(events)
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                line.strip_prefix("oom_kill ")
                    .and_then(|n| n.trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_paths_that_leave_the_hierarchy() {
        assert_eq!(memory_cgroup("/../../etc"), None);
        assert_eq!(memory_cgroup(""), None);
        assert_eq!(memory_cgroup("/kuasar-no-such-cgroup/x"), None);
    }
}
