//! The shim v2 binary's short-lived commands: `start`, which finds or starts the shim of the
//! container's pod and prints its address, and `delete`, which cleans up after a shim that
//! is gone.
//!
//! One shim serves a pod: the sandbox (or its pause container) starts it, and every later
//! container of the pod, recognised by CRI's sandbox-id annotation in its bundle, is given
//! the same address.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use containerd_shim_protos::api::{DeleteRequest, DeleteResponse, KillRequest};
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim_async::TaskClient;
use sha2::{Digest, Sha256};

use crate::args::Args;
use crate::config::ShimConfig;
use crate::controller::Sandboxer;
use crate::forward::dial_address;
use crate::pause;
use crate::pod::now;

/// Where shims' sockets live, whatever containerd's state directory.
pub const SOCKET_DIR: &str = "/run/containerd/s";

/// How long `start` waits for a new shim to serve its socket.
const SERVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `delete` spends cleaning up in the sandboxer.
const DELETE_TIMEOUT: Duration = Duration::from_secs(8);

/// The pause between attempts of `delete` to shut a sandbox down.
const SHUTDOWN_RETRY_PAUSE: Duration = Duration::from_millis(250);

/// How long `delete` waits for an unreachable sandboxer before giving up on it.
const PROBE_WINDOW: Duration = Duration::from_secs(2);

/// Exit status reported for a container whose shim died (SIGKILL).
const KILLED: u32 = 128 + 9;

/// Metadata key of the containerd namespace in ttrpc requests.
const NAMESPACE_KEY: &str = "containerd-namespace-ttrpc";

/// The socket of the shim of pod `sandbox_id` in containerd `address`'s namespace
/// `namespace`: the same for every container of the pod.
pub fn socket_path(address: &str, namespace: &str, sandbox_id: &str) -> PathBuf {
    let mut hash = Sha256::new();
    hash.update(b"kuasar-shim\0");
    hash.update(address.as_bytes());
    hash.update(b"\0");
    hash.update(namespace.as_bytes());
    hash.update(b"\0");
    hash.update(sandbox_id.as_bytes());
    let digest: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Path::new(SOCKET_DIR).join(format!("{}.sock", &digest[..48]))
}

/// The sandbox id of the container whose bundle is `bundle`: CRI's annotation, or the
/// container's own id (a sandbox, or a container outside CRI).
pub fn sandbox_id_of(bundle: &Path, id: &str) -> String {
    pause::annotations(bundle)
        .get(pause::SANDBOX_ID)
        .filter(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| id.to_string())
}

/// `start`: prints the address of the pod's shim, starting it for the pod's first task.
pub fn start(args: &Args) -> anyhow::Result<()> {
    let mut options = Vec::new();
    std::io::stdin()
        .read_to_end(&mut options)
        .context("cannot read the runtime options on stdin")?;
    let bundle = args.bundle_dir()?;
    let config = ShimConfig::from_runtime_options(&args.family, &options)?;
    config.save(&bundle)?;

    let sandbox_id = sandbox_id_of(&bundle, &args.id);
    let socket = socket_path(&args.address, &args.namespace, &sandbox_id);
    let serving = UnixStream::connect(&socket).is_ok();
    if sandbox_id != args.id {
        ensure!(
            serving,
            "no shim serves sandbox {sandbox_id} of container {} (socket {}): the pod is not \
             running",
            args.id,
            socket.display()
        );
    } else if !serving {
        spawn_shim(args, &bundle, &socket)?;
    }

    let address = format!("unix://{}", socket.display());
    std::fs::write(bundle.join("address"), &address)
        .with_context(|| format!("cannot write the address file in {}", bundle.display()))?;
    // containerd 2.x is told the shim speaks Task API v3, so that it calls the pod's shim
    // directly for later containers; older releases get the plain address.
    let answer = match crate::version::task_api_version(&args.address) {
        3 => serde_json::json!({"version": 3, "address": address, "protocol": "ttrpc"}).to_string(),
        _ => address,
    };
    let mut stdout = std::io::stdout();
    stdout.write_all(answer.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// Starts the pod's shim (this binary with `serve`) in a session of its own and waits
/// until it serves `socket`.
fn spawn_shim(args: &Args, bundle: &Path, socket: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(SOCKET_DIR).with_context(|| format!("cannot create {SOCKET_DIR}"))?;
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot remove stale {}", socket.display()))
        }
    }
    let program = std::env::current_exe().context("cannot locate the shim binary")?;
    let mut command = Command::new(&program);
    command
        .args(["-namespace", &args.namespace, "-address", &args.address])
        .args(["-id", &args.id, "-family", &args.family])
        .args(args.debug.then_some("-debug"))
        .arg("serve")
        .current_dir(bundle)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start the shim {}", program.display()))?;

    let deadline = Instant::now() + SERVE_TIMEOUT;
    loop {
        if UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the shim of sandbox {} exited ({status}) before serving {}; its log is in \
                 containerd's",
                args.id,
                socket.display()
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the shim of sandbox {} does not serve {} after {SERVE_TIMEOUT:?}",
                args.id,
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `delete`: containerd lost the task's shim (or its create failed); makes sure nothing of
/// the task is left in the sandboxer and prints its exit.
pub async fn delete(args: &Args) -> anyhow::Result<()> {
    let bundle = args.bundle_dir()?;
    let config = ShimConfig::load(&bundle).unwrap_or_else(|_| ShimConfig::defaults(&args.family));
    let sandbox_id = sandbox_id_of(&bundle, &args.id);
    let sandboxer = Sandboxer::new(&config.sandboxer_address);

    let cleanup = async {
        if sandbox_id == args.id {
            remove_sandbox(&sandboxer, &sandbox_id).await;
            let socket = socket_path(&args.address, &args.namespace, &sandbox_id);
            if UnixStream::connect(&socket).is_err() {
                let _ = std::fs::remove_file(&socket);
            }
        } else {
            remove_container(&sandboxer, &sandbox_id, &args.id, &args.namespace).await;
        }
    };
    if tokio::time::timeout(DELETE_TIMEOUT, cleanup).await.is_err() {
        tracing::warn!(id = %args.id, "cleanup in the sandboxer timed out");
    }

    let response = DeleteResponse {
        exit_status: KILLED,
        exited_at: Some(now()).into(),
        ..Default::default()
    };
    let mut stdout = std::io::stdout();
    stdout.write_all(&response.write_to_bytes()?)?;
    stdout.flush()?;
    Ok(())
}

async fn remove_sandbox(sandboxer: &Sandboxer, sandbox_id: &str) {
    // Nothing to do for a sandbox the sandboxer does not have, or cannot be asked about.
    if let Err(status) = sandboxer.status_within(sandbox_id, PROBE_WINDOW).await {
        if status.code() != tonic::Code::NotFound {
            tracing::warn!(%sandbox_id, error = %status.message(), "cannot remove the sandbox");
        }
        return;
    }
    if let Err(status) = sandboxer.stop(sandbox_id, 0).await {
        if status.code() != tonic::Code::NotFound {
            tracing::warn!(%sandbox_id, error = %status.message(), "cannot stop the sandbox");
        }
    }
    // Nobody asks again once this delete is over: a shutdown that fails while something of
    // the pod is still ending (a container cut halfway by the shim's death) is tried again
    // until it succeeds or the caller's time is up.
    loop {
        match sandboxer.shutdown(sandbox_id).await {
            Ok(()) => return,
            Err(status) if status.code() == tonic::Code::NotFound => return,
            Err(status) => {
                tracing::warn!(%sandbox_id, error = %status.message(), "cannot shut down the sandbox yet");
                tokio::time::sleep(SHUTDOWN_RETRY_PAUSE).await;
            }
        }
    }
}

async fn remove_container(sandboxer: &Sandboxer, sandbox_id: &str, id: &str, namespace: &str) {
    let address = match sandboxer.status_within(sandbox_id, PROBE_WINDOW).await {
        Ok(status) if !status.address.is_empty() => dial_address(&status.address),
        Ok(_) => return,
        Err(status) => {
            tracing::debug!(%sandbox_id, error = %status.message(), "no sandbox to clean up in");
            return;
        }
    };
    let Ok(client) = ttrpc::r#async::Client::connect(&address).await else {
        return;
    };
    let tasks = TaskClient::new(client);
    let context = || {
        let mut context = ttrpc::context::with_timeout(3_000_000_000);
        context
            .metadata
            .insert(NAMESPACE_KEY.to_string(), vec![namespace.to_string()]);
        context
    };
    let kill = KillRequest {
        id: id.to_string(),
        signal: 9,
        all: true,
        ..Default::default()
    };
    if let Err(err) = tasks.kill(context(), &kill).await {
        tracing::debug!(container_id = %id, error = %err, "kill after the shim's loss");
    }
    let delete = DeleteRequest {
        id: id.to_string(),
        ..Default::default()
    };
    // The container may take a moment to be reaped after the kill.
    for _ in 0..20 {
        match tasks.delete(context(), &delete).await {
            Ok(_) => return,
            Err(ttrpc::Error::RpcStatus(status)) if status.code() == ttrpc::Code::NOT_FOUND => {
                return
            }
            Err(err) => {
                tracing::debug!(container_id = %id, error = %err, "delete after the shim's loss")
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pods_containers_share_one_socket() {
        let a = socket_path("/run/containerd/containerd.sock", "k8s.io", "pod-1");
        let b = socket_path("/run/containerd/containerd.sock", "k8s.io", "pod-1");
        let other = socket_path("/run/containerd/containerd.sock", "k8s.io", "pod-2");
        let elsewhere = socket_path("/tmp/c.sock", "k8s.io", "pod-1");
        assert_eq!(a, b);
        assert_ne!(a, other);
        assert_ne!(a, elsewhere);
        assert!(a.to_string_lossy().len() < 100);
    }
}
