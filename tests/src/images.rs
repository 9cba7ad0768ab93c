//! Test images built on the spot, with no registry: a busybox image from the host's
//! busybox-static and a sandbox ("pause") image running a static binary compiled by the build.
//! Each is written as an OCI image-layout tarball and imported into containerd with `ctr`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

/// Reference of the busybox test image.
pub const BUSYBOX_IMAGE: &str = "localhost/kuasar/busybox:test";

/// Reference of the sandbox image; containerd is configured to pin it.
pub const PAUSE_IMAGE: &str = "localhost/kuasar/pause:test";

/// Name of the test image holding WASI modules.
pub const WASM_IMAGE: &str = "localhost/kuasar/wasm:test";

/// Busybox binary of the `busybox-static` package.
const BUSYBOX_BINARY: &str = "/bin/busybox";

/// Applets every test may rely on being in the busybox image's `/bin`.
pub const REQUIRED_APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "hostname", "ls", "nc", "wget", "httpd", "ps", "true", "false",
    "env", "id", "mount",
];

const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One entry of an image's single layer.
enum Entry {
    Dir(&'static str),
    File {
        path: String,
        data: Vec<u8>,
        mode: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
}

/// What an image consists of: a name, one layer and the process defaults of its config.
struct ImageSpec {
    name: &'static str,
    entries: Vec<Entry>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
}

/// Writes the busybox image as an OCI image-layout tarball at `path`.
pub fn write_busybox_layout(path: &Path) -> Result<()> {
    let busybox = fs::read(BUSYBOX_BINARY)
        .with_context(|| format!("cannot read {BUSYBOX_BINARY} (install busybox-static)"))?;

    let mut entries = base_entries();
    entries.push(Entry::File {
        path: "bin/busybox".to_string(),
        data: busybox,
        mode: 0o755,
    });
    for applet in applets()? {
        if applet.file_name().is_some_and(|name| name == "busybox") {
            continue;
        }
        let path = applet.to_string_lossy().trim_start_matches('/').to_string();
        entries.push(Entry::Symlink {
            path,
            target: "/bin/busybox".to_string(),
        });
    }

    let spec = ImageSpec {
        name: BUSYBOX_IMAGE,
        entries,
        entrypoint: Vec::new(),
        cmd: vec!["sh".to_string()],
    };
    write_layout(&spec, path)
}

/// Writes the wasm image as an OCI image-layout tarball at `path`: every test module at
/// `/<name>.wasm`, a file that is not WebAssembly at `/bad.wasm`, a `/data` directory,
/// and `/hello.wasm` as the entrypoint.
pub fn write_wasm_layout(path: &Path) -> Result<()> {
    let spec = ImageSpec {
        name: WASM_IMAGE,
        entries: wasm_entries(Path::new(env!("KUASAR_TEST_WASM_DIR")))?,
        entrypoint: vec!["/hello.wasm".to_string()],
        cmd: Vec::new(),
    };
    write_layout(&spec, path)
}

/// The wasm image's layer: the modules the build compiled into `dir`, in name order so that
/// equal modules give equal digests.
fn wasm_entries(dir: &Path) -> Result<Vec<Entry>> {
    let mut modules: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot read {}", dir.display()))?;
    modules.retain(|m| m.extension().is_some_and(|e| e == "wasm"));
    modules.sort();
    ensure!(!modules.is_empty(), "no modules in {}", dir.display());

    let mut entries = vec![Entry::Dir("data"), Entry::Dir("app")];
    for module in modules {
        let name = module
            .file_name()
            .context("module without a name")?
            .to_string_lossy()
            .into_owned();
        let data =
            fs::read(&module).with_context(|| format!("cannot read {}", module.display()))?;
        entries.push(Entry::File {
            path: name,
            data,
            mode: 0o755,
        });
    }
    entries.push(Entry::File {
        path: "bad.wasm".to_string(),
        data: b"this is not wasm\n".to_vec(),
        mode: 0o755,
    });
    Ok(entries)
}

/// Writes the sandbox image as an OCI image-layout tarball at `path`.
pub fn write_pause_layout(path: &Path) -> Result<()> {
    let binary = env!("KUASAR_TEST_PAUSE_BIN");
    let pause = fs::read(binary).with_context(|| format!("cannot read pause binary {binary}"))?;

    let mut entries = base_entries();
    entries.push(Entry::File {
        path: "pause".to_string(),
        data: pause,
        mode: 0o755,
    });

    let spec = ImageSpec {
        name: PAUSE_IMAGE,
        entries,
        entrypoint: vec!["/pause".to_string()],
        cmd: Vec::new(),
    };
    write_layout(&spec, path)
}

/// Imports the image-layout tarball `tarball` into namespace `k8s.io` of the containerd at
/// `address`, unpacked for the host's platform.
pub fn import(ctr: &Path, address: &Path, tarball: &Path) -> Result<()> {
    let output = Command::new(ctr)
        .arg("--address")
        .arg(address)
        .args(["--namespace", "k8s.io", "images", "import", "--platform"])
        .arg(format!("linux/{}", oci_arch()))
        .arg(tarball)
        .output()
        .with_context(|| format!("cannot run {}", ctr.display()))?;
    if !output.status.success() {
        bail!(
            "ctr images import {} failed ({}): {}",
            tarball.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The OCI architecture name of the host.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Directories and files every test image has.
fn base_entries() -> Vec<Entry> {
    let mut entries: Vec<Entry> = [
        "bin", "dev", "etc", "proc", "root", "sys", "tmp", "usr", "var",
    ]
    .into_iter()
    .map(Entry::Dir)
    .collect();
    entries.extend([
        Entry::Dir("usr/bin"),
        Entry::Dir("usr/sbin"),
        Entry::Dir("sbin"),
    ]);
    entries.push(Entry::File {
        path: "etc/passwd".to_string(),
        data:
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
                .to_vec(),
        mode: 0o644,
    });
    entries.push(Entry::File {
        path: "etc/group".to_string(),
        data: b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
        mode: 0o644,
    });
    entries
}

/// Full paths of the applets the host's busybox provides, checked against
/// [`REQUIRED_APPLETS`].
fn applets() -> Result<Vec<PathBuf>> {
    let output = Command::new(BUSYBOX_BINARY)
        .arg("--list-full")
        .output()
        .with_context(|| format!("cannot run {BUSYBOX_BINARY} --list-full"))?;
    ensure!(
        output.status.success(),
        "{BUSYBOX_BINARY} --list-full failed"
    );

    let listed: Vec<PathBuf> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.is_empty() && !line.contains(".."))
        .map(|line| Path::new("/").join(line))
        .collect();
    let names: BTreeSet<String> = listed
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let missing: Vec<&str> = REQUIRED_APPLETS
        .iter()
        .copied()
        .filter(|name| !names.contains(*name))
        .collect();
    ensure!(
        missing.is_empty(),
        "{BUSYBOX_BINARY} lacks applets {missing:?}"
    );
    Ok(listed)
}

/// Writes `spec` as an OCI image-layout tarball: `oci-layout`, `index.json` and the blobs of
/// the layer, the config and the manifest.
fn write_layout(spec: &ImageSpec, path: &Path) -> Result<()> {
    let layer = layer_tar(&spec.entries).context("cannot build image layer")?;
    let layer_digest = sha256(&layer);

    let mut process = json!({ "Env": [PATH_ENV], "WorkingDir": "/" });
    if !spec.entrypoint.is_empty() {
        process["Entrypoint"] = json!(spec.entrypoint);
    }
    if !spec.cmd.is_empty() {
        process["Cmd"] = json!(spec.cmd);
    }
    let config = serde_json::to_vec(&json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": process,
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    }))?;
    let config_digest = sha256(&config);

    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))?;
    let manifest_digest = sha256(&manifest);

    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": { "architecture": oci_arch(), "os": "linux" },
            "annotations": {
                "io.containerd.image.name": spec.name,
                "org.opencontainers.image.ref.name": spec.name,
            },
        }],
    }))?;

    let file =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut archive = tar::Builder::new(file);
    append_file(
        &mut archive,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        0o644,
    )?;
    append_file(&mut archive, "index.json", &index, 0o644)?;
    append_dir(&mut archive, "blobs")?;
    append_dir(&mut archive, "blobs/sha256")?;
    for (digest, blob) in [
        (&layer_digest, &layer),
        (&config_digest, &config),
        (&manifest_digest, &manifest),
    ] {
        let name = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
        append_file(&mut archive, &name, blob, 0o644)?;
    }
    archive
        .into_inner()
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The layer tarball of `entries`, owned by root with a fixed mtime so equal inputs give equal
/// digests.
fn layer_tar(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut archive = tar::Builder::new(Vec::new());
    for entry in entries {
        match entry {
            Entry::Dir(path) => append_dir(&mut archive, path)?,
            Entry::File { path, data, mode } => append_file(&mut archive, path, data, *mode)?,
            Entry::Symlink { path, target } => {
                let mut header = header(tar::EntryType::Symlink, 0o777, 0);
                header.set_link_name(target)?;
                archive
                    .append_data(&mut header, path, std::io::empty())
                    .with_context(|| format!("cannot add symlink {path}"))?;
            }
        }
    }
    Ok(archive.into_inner()?)
}

fn append_file<W: std::io::Write>(
    archive: &mut tar::Builder<W>,
    path: &str,
    data: &[u8],
    mode: u32,
) -> Result<()> {
    let mut header = header(tar::EntryType::Regular, mode, data.len() as u64);
    archive
        .append_data(&mut header, path, data)
        .with_context(|| format!("cannot add file {path}"))
}

fn append_dir<W: std::io::Write>(archive: &mut tar::Builder<W>, path: &str) -> Result<()> {
    let mut header = header(tar::EntryType::Directory, 0o755, 0);
    archive
        .append_data(&mut header, format!("{path}/"), std::io::empty())
        .with_context(|| format!("cannot add directory {path}"))
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header
}

/// `sha256:<hex>` of `data`.
fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_of_empty_input() {
        assert_eq!(
            sha256(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn layer_is_reproducible() {
        let entries = base_entries();
        assert_eq!(layer_tar(&entries).unwrap(), layer_tar(&entries).unwrap());
    }

    #[test]
    fn wasm_image_holds_every_module_and_a_bad_one() {
        let dir = Path::new(env!("KUASAR_TEST_WASM_DIR"));
        let entries = wasm_entries(dir).unwrap();
        let file = |name: &str| {
            entries.iter().find_map(|e| match e {
                Entry::File { path, data, .. } if path == name => Some(data.clone()),
                _ => None,
            })
        };
        for module in [
            "hello",
            "exit",
            "trap",
            "loop",
            "memhog",
            "writer",
            "sleeper",
            "missing-import",
        ] {
            let data = file(&format!("{module}.wasm")).unwrap_or_else(|| panic!("no {module}"));
            assert!(
                data.starts_with(b"\0asm\x01\0\0\0"),
                "{module} is no wasm module"
            );
        }
        assert!(!file("bad.wasm").unwrap().starts_with(b"\0asm"));
        let import = file("missing-import.wasm").unwrap();
        assert!(import.windows(14).any(|w| w == b"kuasar_missing"));
        assert_eq!(
            layer_tar(&entries).unwrap(),
            layer_tar(&wasm_entries(dir).unwrap()).unwrap()
        );
    }
}
