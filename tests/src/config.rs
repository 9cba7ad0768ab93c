//! Files the harness writes before starting its daemons: the containerd configuration, the CNI
//! network list and the sandboxers' configurations.

use std::path::Path;

use crate::harness::{
    Layout, QuarkSettings, KUASAR_QUARK_HANDLER, KUASAR_RUNC_HANDLER, KUASAR_VMM_HANDLER,
    KUASAR_WASM_HANDLER, QUARK_SANDBOXER_NAME, RUNC_HANDLER, RUNSC_HANDLER, SANDBOXER_NAME,
    VMM_SANDBOXER_NAME, WASM_SANDBOXER_NAME,
};
use crate::images::PAUSE_IMAGE;

/// Runtime type containerd is told to use for the sandboxer's handler; with a Task API v3
/// address from the sandboxer containerd never launches a shim of that name.
pub const KUASAR_RUNC_RUNTIME_TYPE: &str = "io.containerd.kuasar-runc.v2";

/// Runtime type of the wasm sandboxer's handler.
pub const KUASAR_WASM_RUNTIME_TYPE: &str = "io.containerd.kuasar-wasm.v2";

/// Runtime type of the quark sandboxer's handler.
pub const KUASAR_QUARK_RUNTIME_TYPE: &str = "io.containerd.kuasar-quark.v2";

/// Runtime type of the vmm sandboxer's handler.
pub const KUASAR_VMM_RUNTIME_TYPE: &str = "io.containerd.kuasar-vmm.v2";

/// Directory of the CNI plugin binaries of Debian's containernetworking-plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// A containerd 2.x configuration (version 3) that keeps everything of containerd under the
/// run directory and serves CRI with a handler per sandboxer and one on containerd's own runc
/// shim.
pub fn containerd_config(layout: &Layout) -> String {
    let s = |p: &Path| quote(&p.to_string_lossy());
    format!(
        r#"version = 3
root = {root}
state = {state}
temp = {temp}
disabled_plugins = [
  "io.containerd.nri.v1.nri",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs",
]

[grpc]
address = {grpc}

[ttrpc]
address = {ttrpc}

[debug]
level = "info"

[plugins."io.containerd.internal.v1.opt"]
path = {opt}

[plugins."io.containerd.cri.v1.images"]
snapshotter = "overlayfs"

[plugins."io.containerd.cri.v1.images".pinned_images]
sandbox = {pause}

[plugins."io.containerd.cri.v1.images".registry]
config_path = {registry}

[plugins."io.containerd.cri.v1.runtime"]
restrict_oom_score_adj = true
netns_mounts_under_state_dir = true
enable_cdi = false
enable_selinux = false

[plugins."io.containerd.cri.v1.runtime".cni]
bin_dirs = [{cni_bin}]
conf_dir = {cni_conf}
max_conf_num = 1

[plugins."io.containerd.cri.v1.runtime".containerd]
default_runtime_name = {runc_handler}

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.{runc_handler}]
runtime_type = "io.containerd.runc.v2"
sandboxer = "podsandbox"

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.{runc_handler}.options]
BinaryName = "runc"
Root = {runc_root}
SystemdCgroup = false

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.{runsc_handler}]
runtime_type = "io.containerd.runc.v2"
sandboxer = "podsandbox"

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.{runsc_handler}.options]
BinaryName = {runsc_binary}
Root = {runsc_root}
SystemdCgroup = false

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.{kuasar_handler}]
runtime_type = {kuasar_type}
sandboxer = {sandboxer}

[proxy_plugins.{sandboxer}]
type = "sandbox"
address = {sandboxer_socket}

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.{wasm_handler}]
runtime_type = {wasm_type}
sandboxer = {wasm_sandboxer}

[proxy_plugins.{wasm_sandboxer}]
type = "sandbox"
address = {wasm_socket}

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.{quark_handler}]
runtime_type = {quark_type}
sandboxer = {quark_sandboxer}

[proxy_plugins.{quark_sandboxer}]
type = "sandbox"
address = {quark_socket}

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.{vmm_handler}]
runtime_type = {vmm_type}
sandboxer = {vmm_sandboxer}

[proxy_plugins.{vmm_sandboxer}]
type = "sandbox"
address = {vmm_socket}
"#,
        root = s(&layout.containerd_root),
        state = s(&layout.containerd_state),
        temp = s(&layout.containerd_temp),
        grpc = s(&layout.containerd_socket),
        ttrpc = s(&layout.containerd_ttrpc_socket),
        opt = s(&layout.containerd_opt),
        pause = quote(PAUSE_IMAGE),
        registry = s(&layout.registry_dir),
        cni_bin = quote(CNI_BIN_DIR),
        cni_conf = s(&layout.cni_conf_dir),
        runc_handler = quote(RUNC_HANDLER),
        runc_root = s(&layout.runc_root),
        runsc_handler = quote(RUNSC_HANDLER),
        runsc_binary = s(&layout.runsc_v2_binary),
        runsc_root = s(&layout.runsc_v2_root),
        kuasar_handler = quote(KUASAR_RUNC_HANDLER),
        kuasar_type = quote(KUASAR_RUNC_RUNTIME_TYPE),
        sandboxer = quote(SANDBOXER_NAME),
        sandboxer_socket = s(&layout.sandboxer_socket),
        wasm_handler = quote(KUASAR_WASM_HANDLER),
        wasm_type = quote(KUASAR_WASM_RUNTIME_TYPE),
        wasm_sandboxer = quote(WASM_SANDBOXER_NAME),
        wasm_socket = s(&layout.wasm_socket),
        quark_handler = quote(KUASAR_QUARK_HANDLER),
        quark_type = quote(KUASAR_QUARK_RUNTIME_TYPE),
        quark_sandboxer = quote(QUARK_SANDBOXER_NAME),
        quark_socket = s(&layout.quark_socket),
        vmm_handler = quote(KUASAR_VMM_HANDLER),
        vmm_type = quote(KUASAR_VMM_RUNTIME_TYPE),
        vmm_sandboxer = quote(VMM_SANDBOXER_NAME),
        vmm_socket = s(&layout.vmm_socket),
    )
}

/// A CNI network list: a bridge of the harness's own with host-local addresses, no gateway
/// and no masquerading, so pods reach nothing outside the bridge.
pub fn cni_conflist(layout: &Layout) -> String {
    let config = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": layout.network_name,
        "plugins": [{
            "type": "bridge",
            "bridge": layout.bridge,
            "isGateway": false,
            "ipMasq": false,
            "hairpinMode": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": layout.subnet }]],
                "dataDir": layout.ipam_dir,
            },
        }],
    });
    serde_json::to_string_pretty(&config).expect("a JSON value always serializes")
}

/// What every sandboxer's configuration file holds: its socket, state directory, log level
/// and where containerd and CRI keep their files; `family` is appended, its own section.
fn sandboxer_file(
    layout: &Layout,
    listen: &Path,
    state_dir: &Path,
    log_level: &str,
    family: &str,
) -> String {
    let s = |p: &Path| quote(&p.to_string_lossy());
    format!(
        r#"listen = {listen}
state_dir = {state_dir}
log_level = {log_level}

[containerd]
address = {address}
ttrpc_address = {ttrpc_address}
cri_root_dir = {cri_root}
cri_state_dir = {cri_state}
{family}"#,
        listen = s(listen),
        state_dir = s(state_dir),
        log_level = quote(log_level),
        address = s(&layout.containerd_socket),
        ttrpc_address = s(&layout.containerd_ttrpc_socket),
        cri_root = s(&layout.containerd_root.join("io.containerd.grpc.v1.cri")),
        cri_state = s(&layout.cri_state_dir()),
    )
}

/// Debug logs of our crates, without the HTTP/2 and gRPC libraries' chatter.
const LOG_LEVEL: &str = "debug,h2=info,tower=info,hyper=info,hyper_util=info";

/// The wasm sandboxer's configuration file.
pub fn wasm_sandboxer_config(layout: &Layout) -> String {
    let log_level = format!("{LOG_LEVEL},cranelift=info,wasmtime=info");
    sandboxer_file(
        layout,
        &layout.wasm_socket,
        &layout.wasm_state,
        &log_level,
        "",
    )
}

/// The sandboxer's configuration file.
pub fn sandboxer_config(layout: &Layout) -> String {
    let family = "\n[runc]\nbinary = \"runc\"\n";
    sandboxer_file(
        layout,
        &layout.sandboxer_socket,
        &layout.sandboxer_state,
        LOG_LEVEL,
        family,
    )
}

/// The vmm sandboxer's configuration file: the guest image in `guest_dir`, software
/// emulation (KVM here cannot run stock kernels), a boot timeout that allows for a
/// loaded machine and still ends before the CRI client's 60 s, then the `[vmm]` lines of `settings`, which replace any of these.
pub fn vmm_sandboxer_config(
    layout: &Layout,
    guest_dir: &Path,
    vhost_vsock: &Path,
    settings: &str,
) -> String {
    let s = |p: &Path| quote(&p.to_string_lossy());
    let mut table: toml::Table = format!(
        "kernel = {kernel}\ninitrd = {initrd}\nvhost_vsock = {vhost}\naccelerator = \"tcg\"\nboot_timeout_secs = 40\n",
        kernel = s(&guest_dir.join("vmlinux")),
        initrd = s(&guest_dir.join("initramfs.cpio")),
        vhost = s(vhost_vsock),
    )
    .parse()
    .expect("the harness's own [vmm] settings are TOML");
    let overrides: toml::Table = settings.parse().expect("vmm_settings must be TOML lines");
    table.extend(overrides);
    let family = format!("\n[vmm]\n{table}");
    // Every attempt to reach the guest agent, for a boot that never gets there.
    let log_level = format!("{LOG_LEVEL},vmm_sandboxer::vsock=trace");
    sandboxer_file(
        layout,
        &layout.vmm_socket,
        &layout.vmm_state,
        &log_level,
        &family,
    )
}

/// The quark sandboxer's configuration file, with `settings` as its `[quark]` table and
/// runsc's state left at its default place, [`Layout::quark_runsc_root`].
pub fn quark_sandboxer_config(layout: &Layout, settings: &QuarkSettings) -> String {
    let flags: Vec<String> = settings.flags.iter().map(|f| quote(f)).collect();
    let family = format!(
        "\n[quark]\nbinary = {binary}\nplatform = {platform}\nnetwork = {network}\nflags = [{flags}]\n",
        binary = quote(&settings.runsc.to_string_lossy()),
        platform = quote(&settings.platform),
        network = quote(&settings.network),
        flags = flags.join(", "),
    );
    sandboxer_file(
        layout,
        &layout.quark_socket,
        &layout.quark_state,
        LOG_LEVEL,
        &family,
    )
}

/// A shell script running runsc with the global flags `settings` gives the quark sandboxer,
/// so that containerd's runc shim drives the same kernel configuration.
pub fn runsc_wrapper(settings: &QuarkSettings) -> String {
    let mut flags = vec![
        format!("--platform={}", settings.platform),
        format!("--network={}", settings.network),
    ];
    flags.extend(settings.flags.iter().cloned());
    let words: Vec<String> = std::iter::once(settings.runsc.to_string_lossy().into_owned())
        .chain(flags)
        .map(|word| shell_quote(&word))
        .collect();
    format!("#!/bin/sh\nexec {} \"$@\"\n", words.join(" "))
}

/// `word` as one single-quoted shell word.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

/// `value` as a TOML basic string.
fn quote(value: &str) -> String {
    toml::Value::String(value.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runsc_wrapper_quotes_its_words() {
        let mut settings = QuarkSettings::with_runsc("/opt/it's here/runsc".into());
        settings.flags = vec!["--overlay2=root:memory".into()];
        assert_eq!(
            runsc_wrapper(&settings),
            "#!/bin/sh\nexec '/opt/it'\\''s here/runsc' '--platform=systrap' '--network=host' \
             '--overlay2=root:memory' \"$@\"\n"
        );
    }

    #[test]
    fn configs_parse_as_toml() {
        let layout = Layout::new(Path::new("/tmp/kuasar-t/7"), 7);
        let containerd: toml::Table = containerd_config(&layout).parse().unwrap();
        assert_eq!(containerd["version"].as_integer(), Some(3));
        let runtimes =
            &containerd["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"];
        assert_eq!(
            runtimes[KUASAR_RUNC_HANDLER]["sandboxer"].as_str(),
            Some(SANDBOXER_NAME)
        );
        assert_eq!(
            runtimes[KUASAR_QUARK_HANDLER]["sandboxer"].as_str(),
            Some(QUARK_SANDBOXER_NAME)
        );
        assert_eq!(
            containerd["proxy_plugins"][QUARK_SANDBOXER_NAME]["address"].as_str(),
            Some("/tmp/kuasar-t/7/quark-sandboxer.sock")
        );

        let sandboxer: toml::Table = sandboxer_config(&layout).parse().unwrap();
        assert_eq!(
            sandboxer["listen"].as_str(),
            Some("/tmp/kuasar-t/7/runc-sandboxer.sock")
        );

        let settings = QuarkSettings {
            runsc: "/opt/runsc dir/runsc".into(),
            platform: "ptrace".to_string(),
            network: "sandbox".to_string(),
            flags: vec![
                "--overlay2=root:memory".to_string(),
                "--x=\"y\"".to_string(),
            ],
        };
        let quark: toml::Table = quark_sandboxer_config(&layout, &settings).parse().unwrap();
        assert_eq!(
            quark["state_dir"].as_str(),
            Some("/tmp/kuasar-t/7/quark-sandboxer")
        );
        assert_eq!(
            quark["quark"]["binary"].as_str(),
            Some("/opt/runsc dir/runsc")
        );
        assert_eq!(quark["quark"]["platform"].as_str(), Some("ptrace"));
        assert_eq!(quark["quark"]["network"].as_str(), Some("sandbox"));
        let flags: Vec<&str> = quark["quark"]["flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        assert_eq!(flags, ["--overlay2=root:memory", "--x=\"y\""]);
    }

    #[test]
    fn conflist_names_the_bridge() {
        let layout = Layout::new(Path::new("/tmp/kuasar-t/7"), 7);
        let conflist: serde_json::Value = serde_json::from_str(&cni_conflist(&layout)).unwrap();
        assert_eq!(conflist["plugins"][0]["bridge"], "kuasar-t7");
    }
}
