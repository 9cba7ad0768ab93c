//! Container bundles carried into the VM through the shared directory.
//!
//! containerd prepares a container on the host: a bundle whose `config.json` names host
//! paths, a root filesystem to mount, host files and directories to bind. For the
//! guest, each container gets `<share>/<id>/` holding its mounted root filesystem, a bind
//! of every host path its mounts name (`mounts/<n>`), and a `config.json` rewritten to
//! those guest paths and to the VM's namespaces.
//!
//! The guest can write to the shared directory, so the host never creates, mounts or
//! writes anything by path inside it: a container's directory is put together in a
//! staging directory the guest cannot see, then moved into the share whole (its mounts
//! move with it). A symlink the guest plants there can thus never redirect a host write
//! or mount.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use kuasar_sandbox::task::Mount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use serde_json::Value;

/// Namespaces a container shares with its pod: in the VM, the guest's own (the guest
/// is the pod). Paths of host namespaces mean nothing there.
const POD_NAMESPACES: [&str; 3] = ["network", "ipc", "uts"];

/// Process settings that name host security modules the guest does not run.
const HOST_ONLY_PROCESS_KEYS: [&str; 2] = ["apparmorProfile", "selinuxLabel"];

/// The guest directory of container `id`'s shared bundle.
pub fn guest_bundle(id: &str) -> PathBuf {
    Path::new(vmm_task::GUEST_SHARE_DIR).join(id)
}

/// The spec containerd wrote into the host bundle `bundle`.
pub fn load_spec(bundle: &Path) -> anyhow::Result<Value> {
    let file = bundle.join("config.json");
    let bytes = std::fs::read(&file).with_context(|| format!("read {}", file.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parse {}", file.display()))
}

/// Shares container `id` (its host spec `spec`, root filesystem `rootfs`) under
/// `share_dir`, putting it together in `staging_dir` (on the same file system, not
/// shared) first, and returns its bundle as the guest sees it.
pub async fn prepare(
    share_dir: &Path,
    staging_dir: &Path,
    id: &str,
    spec: Value,
    rootfs: &[Mount],
) -> anyhow::Result<PathBuf> {
    let dir = staging_dir.join(id);
    // What a sandboxer that died while sharing left.
    remove(staging_dir, id)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;

    let prepared = async {
        kuasar_sandbox::mount::mount_rootfs(&dir, rootfs)
            .await
            .map_err(|err| anyhow::anyhow!("{err}"))?;
        let mounts_dir = dir.join("mounts");
        let guest_mounts = guest_bundle(id).join("mounts");
        let spec = guest_spec(spec, |n, source| {
            let target = mounts_dir.join(n.to_string());
            bind(Path::new(source), &target)?;
            Ok(guest_mounts.join(n.to_string()).display().to_string())
        })?;
        let file = dir.join("config.json");
        std::fs::write(&file, serde_json::to_vec(&spec)?)
            .with_context(|| format!("write {}", file.display()))?;
        // Replaces at most an empty directory the guest made; fails on anything else.
        let shared = share_dir.join(id);
        std::fs::rename(&dir, &shared)
            .with_context(|| format!("move {} to {}", dir.display(), shared.display()))?;
        anyhow::Ok(guest_bundle(id))
    }
    .await;
    if prepared.is_err() {
        if let Err(err) = remove(staging_dir, id) {
            tracing::warn!(container_id = %id, error = format!("{err:#}"), "cannot clean up a half-shared bundle");
        }
    }
    prepared
}

/// Rewrites a container's spec for the guest. `bind(n, source)` shares the host path of
/// the `n`th mount and returns its guest path.
pub fn guest_spec(
    mut spec: Value,
    mut bind: impl FnMut(usize, &str) -> anyhow::Result<String>,
) -> anyhow::Result<Value> {
    let Some(object) = spec.as_object_mut() else {
        bail!("the spec is not a JSON object");
    };
    object.insert(
        "root".into(),
        serde_json::json!({ "path": "rootfs", "readonly": object
        .get("root")
        .and_then(|root| root.get("readonly"))
        .cloned()
        .unwrap_or(Value::Bool(false)) }),
    );
    object.remove("hooks");
    if let Some(process) = object.get_mut("process").and_then(Value::as_object_mut) {
        for key in HOST_ONLY_PROCESS_KEYS {
            process.remove(key);
        }
    }
    if let Some(mounts) = object.get_mut("mounts").and_then(Value::as_array_mut) {
        for (n, entry) in mounts.iter_mut().enumerate() {
            if !is_bind(entry) {
                continue;
            }
            let Some(source) = entry.get("source").and_then(Value::as_str) else {
                continue;
            };
            if !source.starts_with('/') {
                bail!("bind mount source {source:?} is not an absolute path");
            }
            let guest = bind(n, source).with_context(|| format!("share {source}"))?;
            entry["source"] = Value::String(guest);
        }
    }
    if let Some(linux) = object.get_mut("linux").and_then(Value::as_object_mut) {
        linux.remove("mountLabel");
        if let Some(namespaces) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
            namespaces.retain(|ns| {
                let kind = ns.get("type").and_then(Value::as_str).unwrap_or_default();
                !POD_NAMESPACES.contains(&kind) && ns.get("path").is_none()
            });
            // The guest runs cgroup v2 whatever the host does: a container sees its own
            // cgroup at /sys/fs/cgroup only in a cgroup namespace of its own, which
            // containerd asks for on v2 hosts alone.
            if !namespaces
                .iter()
                .any(|ns| ns.get("type") == Some(&Value::from("cgroup")))
            {
                namespaces.push(serde_json::json!({ "type": "cgroup" }));
            }
        }
    }
    Ok(spec)
}

/// Rewrites an exec's process spec for the guest.
pub fn guest_process(spec: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut process: Value =
        serde_json::from_slice(spec).context("parse the exec's process spec")?;
    if let Some(object) = process.as_object_mut() {
        for key in HOST_ONLY_PROCESS_KEYS {
            object.remove(key);
        }
    }
    Ok(serde_json::to_vec(&process)?)
}

fn is_bind(entry: &Value) -> bool {
    let kind = entry
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let options = entry
        .get("options")
        .and_then(Value::as_array)
        .map(|options| options.iter().filter_map(Value::as_str).collect::<Vec<_>>())
        .unwrap_or_default();
    kind == "bind" || options.iter().any(|o| *o == "bind" || *o == "rbind")
}

/// Binds host path `source` (a file or a directory) at `target`.
fn bind(source: &Path, target: &Path) -> anyhow::Result<()> {
    let metadata =
        std::fs::metadata(source).with_context(|| format!("stat {}", source.display()))?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    if metadata.is_dir() {
        std::fs::create_dir_all(target)
    } else {
        std::fs::File::create(target).map(drop)
    }
    .with_context(|| format!("create {}", target.display()))?;
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("bind {} at {}", source.display(), target.display()))
}

/// Unmounts everything under `<share_dir>/<id>` and removes it. The directory is
/// removed only once nothing is mounted below it: a bind still in place would let the
/// removal reach into the host path it shows.
pub fn remove(share_dir: &Path, id: &str) -> anyhow::Result<()> {
    let dir = share_dir.join(id);
    if !dir.exists() {
        return Ok(());
    }
    unmount_below(&dir)?;
    ensure_unmounted(&dir)?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))
}

/// Fails, naming them, while anything is mounted at or below `dir`.
pub fn ensure_unmounted(dir: &Path) -> anyhow::Result<()> {
    let left = mounts_below(dir)?;
    if !left.is_empty() {
        let left: Vec<String> = left.iter().map(|p| p.display().to_string()).collect();
        bail!("{} still has mounts: {}", dir.display(), left.join(", "));
    }
    Ok(())
}

/// Unmounts every mount at or below `dir`, deepest first.
pub fn unmount_below(dir: &Path) -> anyhow::Result<()> {
    let mut mounts = mounts_below(dir)?;
    mounts.sort_by_key(|path| std::cmp::Reverse(path.components().count()));
    for path in mounts {
        match umount2(&path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(err) => return Err(err).with_context(|| format!("unmount {}", path.display())),
        }
    }
    Ok(())
}

/// Mount points at or below `dir`.
fn mounts_below(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    Ok(mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape(field)))
        .filter(|path| path.starts_with(dir))
        .collect())
}

/// Decodes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn host_paths_and_namespaces_give_way_to_the_guests() {
        let spec = json!({
            "root": { "path": "/run/containerd/x/rootfs", "readonly": true },
            "process": { "args": ["sh"], "apparmorProfile": "cri-containerd.apparmor.d" },
            "hooks": { "prestart": [{ "path": "/usr/bin/hook" }] },
            "mounts": [
                { "destination": "/proc", "type": "proc", "source": "proc" },
                { "destination": "/etc/hosts", "type": "bind", "source": "/var/lib/c/hosts", "options": ["rbind", "ro"] },
                { "destination": "/data", "source": "/srv/data", "options": ["rbind", "rw"] }
            ],
            "linux": {
                "namespaces": [
                    { "type": "pid" },
                    { "type": "mount" },
                    { "type": "network", "path": "/proc/42/ns/net" },
                    { "type": "ipc", "path": "/proc/42/ns/ipc" },
                    { "type": "uts" }
                ],
                "cgroupsPath": "/kubepods/pod1/c1"
            }
        });
        let mut shared = Vec::new();
        let guest = guest_spec(spec, |n, source| {
            shared.push(source.to_string());
            Ok(format!("/guest/{n}"))
        })
        .unwrap();
        assert_eq!(shared, ["/var/lib/c/hosts", "/srv/data"]);
        assert_eq!(guest["root"], json!({ "path": "rootfs", "readonly": true }));
        assert!(guest.get("hooks").is_none());
        assert!(guest["process"].get("apparmorProfile").is_none());
        assert_eq!(guest["mounts"][0]["source"], "proc");
        assert_eq!(guest["mounts"][1]["source"], "/guest/1");
        assert_eq!(guest["mounts"][2]["source"], "/guest/2");
        assert_eq!(
            guest["linux"]["namespaces"],
            json!([{ "type": "pid" }, { "type": "mount" }, { "type": "cgroup" }])
        );
        assert_eq!(guest["linux"]["cgroupsPath"], "/kubepods/pod1/c1");
    }

    /// A scratch directory of its own for each test, removed at the end.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kuasar-share-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn bundle_with_bind(root: &Path, source: &Path) -> PathBuf {
        let bundle = root.join("bundle");
        std::fs::create_dir_all(&bundle).unwrap();
        let spec = json!({
            "root": { "path": "rootfs" },
            "mounts": [{ "destination": "/data", "type": "bind", "source": source, "options": ["rbind"] }]
        });
        std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
        bundle
    }

    #[tokio::test]
    async fn a_bundle_is_put_together_aside_and_moved_into_the_share_with_its_mounts() {
        let root = scratch("move");
        let (share, staging) = (root.join("share"), root.join("staging"));
        std::fs::create_dir_all(&share).unwrap();
        let data = root.join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("kept"), "host data").unwrap();
        let bundle = bundle_with_bind(&root, &data);

        let spec = load_spec(&bundle).unwrap();
        let guest = prepare(&share, &staging, "c1", spec, &[]).await.unwrap();
        assert_eq!(guest, guest_bundle("c1"));
        let shared = share.join("c1");
        let spec: Value =
            serde_json::from_slice(&std::fs::read(shared.join("config.json")).unwrap()).unwrap();
        assert_eq!(
            spec["mounts"][0]["source"],
            format!("{}/c1/mounts/0", vmm_task::GUEST_SHARE_DIR)
        );
        assert_eq!(
            std::fs::read_to_string(shared.join("mounts/0/kept")).unwrap(),
            "host data"
        );
        assert!(!staging.join("c1").exists(), "the staging copy stayed");

        remove(&share, "c1").unwrap();
        assert!(!shared.exists());
        assert_eq!(
            std::fs::read_to_string(data.join("kept")).unwrap(),
            "host data"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[tokio::test]
    async fn a_symlink_planted_in_the_share_never_redirects_the_host() {
        let root = scratch("symlink");
        let (share, staging) = (root.join("share"), root.join("staging"));
        std::fs::create_dir_all(&share).unwrap();
        let victim = root.join("victim");
        std::fs::create_dir_all(&victim).unwrap();
        // What root in the guest could do: the container's directory as a symlink.
        std::os::unix::fs::symlink(&victim, share.join("c1")).unwrap();
        let data = root.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let bundle = bundle_with_bind(&root, &data);

        let err = prepare(&share, &staging, "c1", load_spec(&bundle).unwrap(), &[])
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("move"), "{err:#}");
        assert_eq!(
            std::fs::read_dir(&victim).unwrap().count(),
            0,
            "the host wrote through the symlink"
        );
        assert!(!staging.join("c1").exists(), "the staging copy stayed");
        crate::share::ensure_unmounted(&root).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn relative_bind_sources_are_refused() {
        let spec = json!({ "mounts": [{ "destination": "/x", "type": "bind", "source": "data" }] });
        let err = guest_spec(spec, |_, _| Ok(String::new())).unwrap_err();
        assert!(format!("{err:#}").contains("\"data\""), "{err:#}");
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape("/run/a\\040b"), "/run/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/end\\04"), "/end\\04");
    }
}
