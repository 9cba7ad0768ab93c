//! Root filesystems of containers: the mounts containerd prepares, mounted where the
//! bundle expects them.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::error::Result;
use crate::task::Mount;

/// Mounts `mounts` (usually one overlay) at `<bundle>/rootfs` and returns that path.
pub async fn mount_rootfs(bundle: &Path, mounts: &[Mount]) -> Result<PathBuf> {
    let target = bundle.join("rootfs");
    let mounts = mounts.to_vec();
    let mounted = target.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        std::fs::create_dir_all(&target).with_context(|| format!("create {}", target.display()))?;
        for mount in &mounts {
            containerd_shim::mount::mount_rootfs(
                Some(&mount.fs_type),
                Some(&mount.source),
                &mount.options,
                &target,
            )
            .with_context(|| format!("mount {} rootfs at {}", mount.fs_type, target.display()))?;
        }
        Ok(())
    })
    .await
    .context("mount task")??;
    Ok(mounted)
}

/// Unmounts everything stacked at `target`; nothing mounted there is fine.
pub fn unmount_all(target: &Path) -> anyhow::Result<()> {
    loop {
        match nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return Ok(()),
            Err(err) => return Err(err).with_context(|| format!("unmount {}", target.display())),
        }
    }
}
