//! Adversarial tests of the runc sandboxer: bad input on its own Sandbox API socket,
//! concurrency, processes killed with SIGKILL mid-flight, leaks over many short-lived
//! containers and exec edge cases. Needs root.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1::{ContainerState, PodSandboxState};
use kuasar_sandbox::api::sandbox::controller_client::ControllerClient;
use kuasar_sandbox::api::sandbox::{
    ControllerCreateRequest, ControllerShutdownRequest, ControllerStartRequest,
    ControllerStatusRequest, ControllerStopRequest, ControllerWaitRequest,
};
use kuasar_tests::cri::text;
use kuasar_tests::harness::wait_until;
use kuasar_tests::images::BUSYBOX_IMAGE;
use kuasar_tests::{Harness, KUASAR_RUNC_HANDLER};
use tonic::transport::Channel;

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a CRI call may take before it counts as hanging.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

type Controller = ControllerClient<Channel>;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A client of the sandboxer's own Sandbox API socket.
async fn controller(h: &Harness) -> Result<Controller> {
    let socket = h.layout().sandboxer_socket.clone();
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")?
        .timeout(Duration::from_secs(60))
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                tokio::net::UnixStream::connect(socket)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .context("connect to the sandboxer socket")?;
    Ok(ControllerClient::new(channel))
}

fn varint(mut value: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Appends a length-delimited protobuf field.
fn bytes_field(field: u32, value: &[u8], out: &mut Vec<u8>) {
    varint(u64::from(field << 3 | 2), out);
    varint(value.len() as u64, out);
    out.extend_from_slice(value);
}

/// A `runtime.v1.PodSandboxConfig` in protobuf wire format (the tests crate has no prost of
/// its own): metadata, hostname and, when not empty, `linux.cgroup_parent`.
fn encode_pod_config(name: &str, uid: &str, cgroup_parent: &str) -> Vec<u8> {
    let mut metadata = Vec::new();
    bytes_field(1, name.as_bytes(), &mut metadata);
    bytes_field(2, uid.as_bytes(), &mut metadata);
    bytes_field(3, b"kuasar-test", &mut metadata);
    let mut config = Vec::new();
    bytes_field(1, &metadata, &mut config);
    bytes_field(2, name.as_bytes(), &mut config);
    if !cgroup_parent.is_empty() {
        let mut linux = Vec::new();
        bytes_field(1, cgroup_parent.as_bytes(), &mut linux);
        bytes_field(8, &linux, &mut config);
    }
    config
}

const POD_CONFIG_TYPE_URL: &str = "type.googleapis.com/runtime.v1.PodSandboxConfig";

/// A create request for sandbox `id` with `options` bytes typed as a PodSandboxConfig.
fn create_request(id: &str, netns_path: &str, options: Option<Vec<u8>>) -> ControllerCreateRequest {
    let mut request = ControllerCreateRequest {
        sandbox_id: id.to_string(),
        netns_path: netns_path.to_string(),
        options: options.as_ref().map(|_| Default::default()),
        ..Default::default()
    };
    if let (Some(any), Some(value)) = (request.options.as_mut(), options) {
        any.type_url = POD_CONFIG_TYPE_URL.to_string();
        any.value = value;
    }
    request
}

fn start_request(id: &str) -> ControllerStartRequest {
    ControllerStartRequest {
        sandbox_id: id.to_string(),
        ..Default::default()
    }
}

fn status_request(id: &str) -> ControllerStatusRequest {
    ControllerStatusRequest {
        sandbox_id: id.to_string(),
        verbose: true,
        ..Default::default()
    }
}

fn shutdown_request(id: &str) -> ControllerShutdownRequest {
    ControllerShutdownRequest {
        sandbox_id: id.to_string(),
        ..Default::default()
    }
}

fn stop_request(id: &str) -> ControllerStopRequest {
    ControllerStopRequest {
        sandbox_id: id.to_string(),
        timeout_secs: 0,
        ..Default::default()
    }
}

fn wait_request(id: &str) -> ControllerWaitRequest {
    ControllerWaitRequest {
        sandbox_id: id.to_string(),
        ..Default::default()
    }
}

fn read_cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// State field of `/proc/<pid>/stat` (`Z` for a zombie).
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().next()?.chars().next()
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Children of `parent` (alive, not zombies).
fn children_of(parent: u32) -> Vec<(u32, String)> {
    all_pids()
        .into_iter()
        .filter(|pid| parent_pid(*pid) == Some(parent) && proc_state(*pid) != Some('Z'))
        .map(|pid| (pid, read_cmdline(pid)))
        .collect()
}

/// Namespace holders the sandboxer `sandboxer` has as children.
fn holders_of(sandboxer: u32) -> Vec<(u32, String)> {
    children_of(sandboxer)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("hold-namespaces"))
        .collect()
}

/// Processes of container `container_id`, found by its cgroup (`<cgroup parent>/<id>`).
fn container_processes(container_id: &str) -> Vec<(u32, String)> {
    all_pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|c| c.contains(container_id))
        })
        .map(|pid| (pid, read_cmdline(pid)))
        .collect()
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Every path below `dir`, directories included.
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() && !path.is_symlink() {
            out.extend(tree(&path));
        }
        out.insert(path);
    }
    out
}

/// Cgroup directories named `name` directly below `relative_parent` in any hierarchy.
fn cgroup_dirs_named(relative_parent: &str, name: &str) -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    let mut roots = vec![base.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(base) {
        roots.extend(entries.flatten().map(|e| e.path()));
    }
    roots
        .into_iter()
        .map(|root| {
            root.join(relative_parent.trim_start_matches('/'))
                .join(name)
        })
        .filter(|p| p.is_dir())
        .collect()
}

/// "ok", or the code and message of a failed Sandbox API call.
fn outcome<T>(result: &std::result::Result<T, tonic::Status>) -> String {
    match result {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("{:?}: {}", e.code(), e.message()),
    }
}

/// What of sandbox `id` a direct Sandbox API test may leave on the host: holder processes,
/// pod cgroups and CRI pod files.
fn sandbox_traces(h: &Harness, id: &str) -> Vec<String> {
    let mut traces = Vec::new();
    if let Some(pid) = h.sandboxer_pid() {
        traces.extend(
            holders_of(pid)
                .into_iter()
                .map(|(p, c)| format!("holder {p} {c}")),
        );
    }
    traces.extend(
        cgroup_dirs_named(h.cgroup_parent(), id)
            .into_iter()
            .map(|d| format!("cgroup {}", d.display())),
    );
    let cri_root = h.layout().containerd_root.join("io.containerd.grpc.v1.cri");
    for dir in [
        cri_root.join("sandboxes").join(id),
        h.layout().cri_state_dir().join("sandboxes").join(id),
    ] {
        if dir.exists() {
            traces.push(format!("pod files {}", dir.display()));
        }
    }
    traces
}

// ---------------------------------------------------------------------------------------
// 1. Bad input on the Sandbox API
// ---------------------------------------------------------------------------------------

#[test]
fn pod_config_encoder_matches_the_sandboxers_decoder() {
    let bytes = encode_pod_config("enc", "uid-1", "/kuasar-test-x");
    let mut any_request = create_request("x", "", Some(bytes));
    let any = any_request.options.take().expect("options set");
    let config = kuasar_sandbox::controller::decode_pod_config(Some(&any))
        .expect("decodes")
        .expect("is a pod config");
    assert_eq!(config.hostname, "enc");
    assert_eq!(config.metadata.unwrap().uid, "uid-1");
    assert_eq!(config.linux.unwrap().cgroup_parent, "/kuasar-test-x");
}

#[tokio::test]
async fn garbage_pod_options_are_invalid_argument_naming_the_sandbox() -> Result<()> {
    Harness::start_with_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let mut c = controller(h).await?;
            let id = "adv-garbage-options";
            let err = c
                .create(create_request(id, "", Some(vec![0xff, 0xff, 0xff, 0x07])))
                .await
                .err()
                .context("create with undecodable PodSandboxConfig options succeeded")?;
            ensure!(
                err.code() == tonic::Code::InvalidArgument,
                "garbage options: {err:?}"
            );
            ensure!(
                err.message().contains(id),
                "message does not name the sandbox: {err:?}"
            );
            // Nothing half-created: the id is unknown and can be created properly.
            let status = c.status(status_request(id)).await.err();
            ensure!(
                status.as_ref().map(|s| s.code()) == Some(tonic::Code::NotFound),
                "sandbox known after a rejected create: {status:?}"
            );
            c.create(create_request(id, "", None)).await?;
            c.shutdown(shutdown_request(id)).await?;
            Ok(())
        })
        .await
}

#[tokio::test]
async fn unknown_sandbox_ids_are_not_found_for_every_call() -> Result<()> {
    Harness::start_with_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let mut c = controller(h).await?;
            let id = "adv-never-created";
            let start = c.start(start_request(id)).await.err();
            let stop = c.stop(stop_request(id)).await.err();
            let wait = tokio::time::timeout(CALL_TIMEOUT, c.wait(wait_request(id)))
                .await
                .context("Wait of an unknown sandbox hangs")?
                .err();
            let shutdown = c.shutdown(shutdown_request(id)).await.err();
            for (call, err) in [
                ("Start", start),
                ("Stop", stop),
                ("Wait", wait),
                ("Shutdown", shutdown),
            ] {
                let err = err.with_context(|| format!("{call} of an unknown sandbox succeeded"))?;
                ensure!(
                    err.code() == tonic::Code::NotFound && err.message().contains(id),
                    "{call} of an unknown sandbox: {err:?}"
                );
            }
            Ok(())
        })
        .await
}

#[tokio::test]
async fn missing_netns_fails_start_naming_the_path_and_other_pods_still_run() -> Result<()> {
    Harness::start_with_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let mut c = controller(h).await?;
            let sandboxer = h.sandboxer_pid().context("no sandboxer")?;
            let id = "adv-missing-netns";
            let netns = h.layout().run_dir.join("no-such-netns");
            let options = encode_pod_config("nonet", "nonet-uid", h.cgroup_parent());
            c.create(create_request(id, &netns.to_string_lossy(), Some(options)))
                .await?;
            let err = tokio::time::timeout(CALL_TIMEOUT, c.start(start_request(id)))
                .await
                .context("Start with a missing netns hangs")?
                .err()
                .context("a sandbox with a missing netns started")?;
            ensure!(
                err.message().contains(&*netns.to_string_lossy()),
                "error does not name the netns path: {err:?}"
            );
            ensure!(
                err.message().contains(id),
                "error does not name the sandbox: {err:?}"
            );
            ensure!(
                holders_of(sandboxer).is_empty(),
                "holder left after a failed start: {:?}",
                holders_of(sandboxer)
            );
            let status = c.status(status_request(id)).await?.into_inner();
            ensure!(
                status.state == "SANDBOX_NOTREADY",
                "failed sandbox reports {status:?}"
            );

            // The sandboxer keeps serving other pods.
            let pod = h.run_pod("after-netns", KUASAR_RUNC_HANDLER).await?;
            let cfg = h.container_config("echo", BUSYBOX_IMAGE, &["sh", "-c", "echo ok"]);
            let cid = h.start_container(&pod, &cfg).await?;
            let exited = h.cri().wait_container_exited(&cid, EXIT_TIMEOUT).await?;
            ensure!(exited.exit_code == 0, "container exit {}", exited.exit_code);

            c.shutdown(shutdown_request(id)).await?;
            let traces = sandbox_traces(h, id);
            ensure!(
                traces.iter().all(|t| !t.contains(id)),
                "left behind: {traces:?}"
            );
            h.remove_pod_and_check(&pod).await
        })
        .await
}

/// A netns path that is a regular file, and a hostname the kernel refuses: Start fails with
/// a message naming the culprit, and no holder is left.
#[tokio::test]
async fn non_netns_file_and_overlong_hostname_fail_start_cleanly() -> Result<()> {
    Harness::start_with_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let mut c = controller(h).await?;
            let sandboxer = h.sandboxer_pid().context("no sandboxer")?;

            let not_netns = h.layout().run_dir.join("not-a-netns");
            std::fs::write(&not_netns, "plain file")?;
            let id = "adv-file-netns";
            let options = encode_pod_config("filens", "filens-uid", h.cgroup_parent());
            c.create(create_request(
                id,
                &not_netns.to_string_lossy(),
                Some(options),
            ))
            .await?;
            let err = tokio::time::timeout(CALL_TIMEOUT, c.start(start_request(id)))
                .await
                .context("Start with a non-netns file hangs")?
                .err()
                .context("a regular file was accepted as network namespace")?;
            ensure!(
                err.message().contains(&*not_netns.to_string_lossy()),
                "error does not name the netns path: {err:?}"
            );
            c.shutdown(shutdown_request(id)).await?;

            let hostname = "h".repeat(100);
            let id = "adv-long-hostname";
            let options = encode_pod_config(&hostname, "longhost-uid", h.cgroup_parent());
            c.create(create_request(id, "", Some(options))).await?;
            let err = tokio::time::timeout(CALL_TIMEOUT, c.start(start_request(id)))
                .await
                .context("Start with an overlong hostname hangs")?
                .err()
                .context("a 100-character hostname was accepted")?;
            ensure!(
                err.message().contains("hostname"),
                "error does not mention the hostname: {err:?}"
            );
            c.shutdown(shutdown_request(id)).await?;

            wait_until("no holder is left", Duration::from_secs(5), || {
                holders_of(sandboxer).is_empty()
            })
            .await?;
            for id in ["adv-file-netns", "adv-long-hostname"] {
                let traces = sandbox_traces(h, id);
                ensure!(traces.is_empty(), "{id} left behind: {traces:?}");
            }
            Ok(())
        })
        .await
}

#[tokio::test]
async fn cgroup_parent_with_dotdot_is_rejected_and_writes_nothing_outside() -> Result<()> {
    Harness::start_with_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let mut c = controller(h).await?;
            let sandboxer = h.sandboxer_pid().context("no sandboxer")?;
            let id = format!("adv-escape-{}", h.layout().id);
            let escape = format!(
                "{}/../../kuasar-adv-escape-{}",
                h.cgroup_parent(),
                h.layout().id
            );
            let options = encode_pod_config("escape", "escape-uid", &escape);
            c.create(create_request(&id, "", Some(options))).await?;
            let result = tokio::time::timeout(CALL_TIMEOUT, c.start(start_request(&id)))
                .await
                .context("Start with an escaping cgroup parent hangs")?;
            let outside: Vec<PathBuf> = [
                cgroup_dirs_named("", &format!("kuasar-adv-escape-{}", h.layout().id)),
                cgroup_dirs_named("..", &format!("kuasar-adv-escape-{}", h.layout().id)),
            ]
            .concat();
            // Clean up before judging.
            let shutdown = c.shutdown(shutdown_request(&id)).await;
            ensure!(outside.is_empty(), "cgroups created outside: {outside:?}");
            let err = match result {
                Ok(started) => bail!("escaping cgroup parent accepted: {started:?}"),
                Err(err) => err,
            };
            ensure!(
                err.message().contains(".."),
                "error does not explain the cgroup parent: {err:?}"
            );
            ensure!(
                err.message().contains(&id),
                "error does not name the sandbox: {err:?}"
            );
            shutdown?;
            wait_until(
                "the holder is gone after a failed start",
                Duration::from_secs(5),
                || holders_of(sandboxer).is_empty(),
            )
            .await?;
            let traces = sandbox_traces(h, &id);
            ensure!(traces.is_empty(), "left behind: {traces:?}");
            Ok(())
        })
        .await
}

#[tokio::test]
async fn longest_id_works_and_longer_ids_are_rejected() -> Result<()> {
    Harness::start_with_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let mut c = controller(h).await?;
            let longest = format!("l{}", "0123456789".repeat(8))[..76].to_string();
            let options = encode_pod_config("long", "long-uid", h.cgroup_parent());
            c.create(create_request(&longest, "", Some(options)))
                .await?;
            let started = c.start(start_request(&longest)).await?.into_inner();
            ensure!(started.pid > 0, "no pid: {started:?}");
            let status = c.status(status_request(&longest)).await?.into_inner();
            ensure!(status.state == "SANDBOX_READY", "{status:?}");
            c.shutdown(shutdown_request(&longest)).await?;
            let traces = sandbox_traces(h, &longest);
            ensure!(traces.is_empty(), "left behind: {traces:?}");

            for len in [77, 255, 4096] {
                let id = "a".repeat(len);
                let err = c
                    .create(create_request(&id, "", None))
                    .await
                    .err()
                    .with_context(|| format!("an id of {len} characters was accepted"))?;
                ensure!(
                    err.code() == tonic::Code::InvalidArgument,
                    "id of {len}: {err:?}"
                );
            }
            Ok(())
        })
        .await
}

#[tokio::test]
async fn shutdown_twice_and_wait_across_shutdown() -> Result<()> {
    Harness::start_with_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let mut c = controller(h).await?;
            let sandboxer = h.sandboxer_pid().context("no sandboxer")?;

            // Started sandbox: a pending Wait returns once it is shut down.
            let id = "adv-wait-started";
            let options = encode_pod_config("waiter", "waiter-uid", h.cgroup_parent());
            c.create(create_request(id, "", Some(options))).await?;
            c.start(start_request(id)).await?;
            let mut waiter = c.clone();
            let wait = tokio::spawn(async move { waiter.wait(wait_request(id)).await });
            // Time for the Wait to reach the sandboxer before the sandbox is shut down.
            tokio::time::sleep(Duration::from_secs(1)).await;
            ensure!(!wait.is_finished(), "Wait returned while the sandbox runs");
            c.shutdown(shutdown_request(id)).await?;
            let waited = tokio::time::timeout(CALL_TIMEOUT, wait)
                .await
                .context("Wait hangs after Shutdown")??;
            let waited = waited.context("Wait failed across Shutdown")?.into_inner();
            ensure!(waited.exited_at.is_some(), "no exit time: {waited:?}");

            let second = c.shutdown(shutdown_request(id)).await;
            if let Err(err) = &second {
                ensure!(
                    err.code() == tonic::Code::NotFound,
                    "second shutdown: {err:?}"
                );
            }
            ensure!(holders_of(sandboxer).is_empty(), "holder left");

            // Never started: Wait returns on Shutdown too.
            let id = "adv-wait-created";
            c.create(create_request(id, "", None)).await?;
            let mut waiter = c.clone();
            let wait = tokio::spawn(async move { waiter.wait(wait_request(id)).await });
            // Time for the Wait to reach the sandboxer before the sandbox is shut down.
            tokio::time::sleep(Duration::from_secs(1)).await;
            c.shutdown(shutdown_request(id)).await?;
            tokio::time::timeout(CALL_TIMEOUT, wait)
                .await
                .context("Wait of a never started sandbox hangs after Shutdown")??
                .context("Wait failed")?;
            ensure!(
                sandbox_traces(h, id).is_empty(),
                "{:?}",
                sandbox_traces(h, id)
            );
            Ok(())
        })
        .await
}

/// A Start whose caller hangs up halfway (a shim killed, containerd's deadline passed) still
/// runs to its end, so the Shutdown that follows ends the namespace holder it started.
#[tokio::test]
async fn a_start_abandoned_by_its_caller_leaves_no_holder_once_shut_down() -> Result<()> {
    Harness::start_with_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let mut c = controller(h).await?;
            let sandboxer = h.sandboxer_pid().context("no sandboxer")?;
            // Deadlines from 1 to 34 ms: the caller leaves at every stage of the start.
            for round in 0..12u64 {
                let id = format!("adv-abandoned-{round}");
                let options = encode_pod_config(&id, &format!("{id}-uid"), h.cgroup_parent());
                c.create(create_request(&id, "", Some(options))).await?;
                let mut start = tonic::Request::new(start_request(&id));
                start.set_timeout(Duration::from_millis(1 + 3 * round));
                let answered = c.start(start).await.is_ok();
                c.shutdown(shutdown_request(&id)).await?;
                wait_until("the holder ends", Duration::from_secs(10), || {
                    holders_of(sandboxer).is_empty()
                })
                .await
                .with_context(|| {
                    format!(
                        "round {round} (start answered: {answered}): holders {:?}",
                        holders_of(sandboxer)
                    )
                })?;
            }
            Ok(())
        })
        .await
}

/// Stop of a created (never started) sandbox, then Start, then Shutdown: whatever Start
/// answers, Shutdown must leave no holder and no cgroup behind.
#[tokio::test]
async fn start_after_stop_then_shutdown_leaves_nothing() -> Result<()> {
    Harness::start_with_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let mut c = controller(h).await?;
            let sandboxer = h.sandboxer_pid().context("no sandboxer")?;
            let id = "adv-stop-then-start";
            let options = encode_pod_config("restart", "restart-uid", h.cgroup_parent());
            c.create(create_request(id, "", Some(options))).await?;
            c.stop(stop_request(id)).await?;
            let started = c.start(start_request(id)).await;
            let status = c.status(status_request(id)).await?.into_inner();
            let first = c.shutdown(shutdown_request(id)).await;
            let second = c.shutdown(shutdown_request(id)).await;
            let holders = holders_of(sandboxer);
            let cgroups = cgroup_dirs_named(h.cgroup_parent(), id);
            // Clean up what the sandboxer left, so that the harness teardown can finish.
            for (pid, _) in &holders {
                kuasar_tests::cleanup::signal(*pid, libc::SIGKILL)?;
            }
            let summary = format!(
                "Create, Stop, Start ({}; then status {} pid {}), Shutdown ({}), Shutdown ({}) \
                 left holders {holders:?} and cgroups {cgroups:?}",
                outcome(&started),
                status.state,
                status.pid,
                outcome(&first),
                outcome(&second),
            );
            eprintln!("{summary}");
            // A Start that succeeds must give a ready sandbox; Shutdown must free everything.
            ensure!(
                started.is_err() || status.state == "SANDBOX_READY",
                "{summary}"
            );
            ensure!(
                holders.is_empty() && cgroups.is_empty() && first.is_ok(),
                "{summary}"
            );
            Ok(())
        })
        .await
}

// ---------------------------------------------------------------------------------------
// 2. Concurrency
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn ten_pods_started_concurrently_all_run_and_are_removed() -> Result<()> {
    Harness::start_with_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let mut tasks = tokio::task::JoinSet::new();
            for n in 0..10 {
                let name = format!("conc-{n}");
                let config = h.pod_config(&name)?;
                let container = h.container_config("main", BUSYBOX_IMAGE, &["sleep", "3600"]);
                let cri = h.cri().clone();
                tasks.spawn(async move {
                    let pod = cri.run_pod(&config, KUASAR_RUNC_HANDLER).await?;
                    let cid = cri.create_container(&pod, &container, &config).await?;
                    cri.start_container(&cid).await?;
                    Ok::<_, anyhow::Error>((pod, cid))
                });
            }
            let mut started = Vec::new();
            while let Some(result) = tasks.join_next().await {
                started.push(result??);
            }
            ensure!(started.len() == 10);
            for (pod, cid) in &started {
                let status = h.cri().pod_status(pod).await?;
                ensure!(
                    status.state == PodSandboxState::SandboxReady as i32,
                    "pod {pod} not ready"
                );
                let status = h.cri().container_status(cid).await?;
                ensure!(
                    status.state == ContainerState::ContainerRunning as i32,
                    "container {cid} not running: {status:?}"
                );
            }
            let ips: BTreeSet<String> = {
                let mut ips = BTreeSet::new();
                for (pod, _) in &started {
                    let status = h.cri().pod_status(pod).await?;
                    ips.insert(status.network.map(|n| n.ip).unwrap_or_default());
                }
                ips
            };
            ensure!(ips.len() == 10, "pods share addresses: {ips:?}");

            let mut tasks = tokio::task::JoinSet::new();
            for (pod, _) in started {
                let cri = h.cri().clone();
                tasks.spawn(async move {
                    cri.stop_pod(&pod).await?;
                    cri.remove_pod(&pod).await
                });
            }
            while let Some(result) = tasks.join_next().await {
                result??;
            }
            ensure!(h.cri().list_pods().await?.is_empty(), "pods remain");
            ensure!(
                h.cri().list_containers(None).await?.is_empty(),
                "containers remain"
            );
            let sandboxer = h.sandboxer_pid().context("no sandboxer")?;
            ensure!(holders_of(sandboxer).is_empty(), "holders remain");
            let left = h.leftovers()?;
            ensure!(left.is_empty(), "after concurrent removal:\n{left}");
            Ok(())
        })
        .await
}

// ---------------------------------------------------------------------------------------
// 3. SIGKILL mid-operation
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn killed_holder_makes_the_pod_notready_and_removal_still_cleans_up() -> Result<()> {
    Harness::start_with_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let mut c = controller(h).await?;
            let pod = h.run_pod("victim", KUASAR_RUNC_HANDLER).await?;
            let cfg = h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
            let cid = h.start_container(&pod, &cfg).await?;
            let holder = c.status(status_request(&pod.id)).await?.into_inner().pid;
            ensure!(holder > 0, "no holder pid");
            ensure!(
                read_cmdline(holder).contains("hold-namespaces"),
                "pid {holder} is not a holder: {}",
                read_cmdline(holder)
            );
            kuasar_tests::cleanup::signal(holder, libc::SIGKILL)?;

            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let status = h.cri().pod_status(&pod.id).await?;
                if status.state == PodSandboxState::SandboxNotready as i32 {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "pod still READY 15s after its holder was killed"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // The containers shared the holder's PID namespace and died with it.
            let exited = h.cri().wait_container_exited(&cid, EXIT_TIMEOUT).await?;
            ensure!(
                exited.exit_code == 137,
                "container of a dead pod: exit {}",
                exited.exit_code
            );
            let controller_status = c.status(status_request(&pod.id)).await?.into_inner();
            ensure!(
                controller_status.state == "SANDBOX_NOTREADY",
                "{controller_status:?}"
            );
            h.remove_pod_and_check(&pod).await
        })
        .await
}

#[tokio::test]
async fn killed_container_process_reports_exit_137() -> Result<()> {
    Harness::start_with_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("kill-ctr", KUASAR_RUNC_HANDLER).await?;
            let cfg = h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
            let cid = h.start_container(&pod, &cfg).await?;
            let neighbour_cfg = h.container_config("neighbour", BUSYBOX_IMAGE, &["sleep", "3600"]);
            let neighbour = h.start_container(&pod, &neighbour_cfg).await?;
            let procs = container_processes(&cid);
            let (pid, _) = procs
                .iter()
                .find(|(_, cmd)| cmd == "sleep 3600")
                .with_context(|| format!("no sleep process in container cgroup: {procs:?}"))?;
            kuasar_tests::cleanup::signal(*pid, libc::SIGKILL)?;
            let exited = h.cri().wait_container_exited(&cid, EXIT_TIMEOUT).await?;
            ensure!(exited.exit_code == 137, "exit code {}", exited.exit_code);
            let pod_status = h.cri().pod_status(&pod.id).await?;
            ensure!(
                pod_status.state == PodSandboxState::SandboxReady as i32,
                "pod not ready after a container was killed"
            );
            let status = h.cri().container_status(&neighbour).await?;
            ensure!(
                status.state == ContainerState::ContainerRunning as i32,
                "neighbour: {status:?}"
            );
            h.cri().remove_container(&cid).await?;
            h.remove_pod_and_check(&pod).await
        })
        .await
}

/// The sandboxer is SIGKILLed while a pod runs. Restart is not supported; CRI calls that
/// need it must fail in bounded time, and the harness teardown must still clean the host.
#[tokio::test]
async fn killed_sandboxer_gives_errors_not_hangs_and_teardown_cleans_up() -> Result<()> {
    let h = Harness::start_with_sandboxer().await?;
    let layout = h.layout().clone();
    let outcome: Result<Vec<String>> = async {
        let pod = h.run_pod("orphan", KUASAR_RUNC_HANDLER).await?;
        let cfg = h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
        let cid = h.start_container(&pod, &cfg).await?;
        let sandboxer = h.sandboxer_pid().context("no sandboxer")?;
        kuasar_tests::cleanup::signal(sandboxer, libc::SIGKILL)?;
        tokio::time::sleep(Duration::from_millis(500)).await;

        let mut report = Vec::new();
        macro_rules! timed {
            ($name:expr, $call:expr) => {{
                let began = Instant::now();
                let result = tokio::time::timeout(CALL_TIMEOUT, $call).await;
                let elapsed = began.elapsed();
                match &result {
                    Err(_) => report.push(format!("{}: HANGS (> {CALL_TIMEOUT:?})", $name)),
                    Ok(Ok(_)) => report.push(format!("{}: ok in {elapsed:?}", $name)),
                    Ok(Err(e)) => report.push(format!("{}: error in {elapsed:?}: {e:#}", $name)),
                }
                result
            }};
        }
        let _ = timed!("PodSandboxStatus", h.cri().pod_status(&pod.id));
        let _ = timed!("ContainerStatus", h.cri().container_status(&cid));
        let exec = timed!("ExecSync", h.cri().exec_sync(&cid, &["true"], 5));
        let config = h.pod_config("after-kill")?;
        let run = timed!(
            "RunPodSandbox",
            h.cri().run_pod(&config, KUASAR_RUNC_HANDLER)
        );
        let stop = timed!("StopPodSandbox", h.cri().stop_pod(&pod.id));
        let remove = timed!("RemovePodSandbox", h.cri().remove_pod(&pod.id));
        eprintln!("after SIGKILL of the sandboxer:\n  {}", report.join("\n  "));
        ensure!(
            !report.iter().any(|r| r.contains("HANGS")),
            "CRI calls hang once the sandboxer is gone:\n{}",
            report.join("\n")
        );
        ensure!(
            run.is_ok_and(|r| r.is_err()),
            "a pod ran without a sandboxer"
        );
        let _ = (exec, stop, remove);
        Ok(report)
    }
    .await;
    if let Err(e) = &outcome {
        eprintln!("test failed: {e:#}");
        h.print_log_tails();
    }
    let began = Instant::now();
    let teardown = h.teardown();
    eprintln!(
        "teardown took {:?}: {}",
        began.elapsed(),
        teardown
            .as_ref()
            .map(|_| "ok".to_string())
            .unwrap_or_else(|e| format!("{e:#}"))
    );
    let left = kuasar_tests::harness::leftovers_of(&layout, &[])?;
    outcome?;
    ensure!(left.is_empty(), "after teardown:\n{left}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 4. Many short-lived containers
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn twenty_short_lived_containers_leak_no_fds_processes_or_files() -> Result<()> {
    Harness::start_with_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let sandboxer = h.sandboxer_pid().context("no sandboxer")?;
            let state = h.layout().sandboxer_state.clone();
            let pod = h.run_pod("churn", KUASAR_RUNC_HANDLER).await?;

            let run_one = async |n: usize| -> Result<()> {
                let cfg = h.container_config(&format!("true-{n}"), BUSYBOX_IMAGE, &["true"]);
                let cid = h.start_container(&pod, &cfg).await?;
                let exited = h.cri().wait_container_exited(&cid, EXIT_TIMEOUT).await?;
                ensure!(exited.exit_code == 0, "true exited {}", exited.exit_code);
                h.cri().remove_container(&cid).await
            };
            // Warm up: the first container opens connections that stay.
            run_one(0).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let fds_before = fd_count(sandboxer);
            let threads_before = thread_count(sandboxer);
            let children_before = children_of(sandboxer);
            let files_before = tree(&state);

            for n in 1..=20 {
                run_one(n).await?;
            }
            // What ends with a container ends a moment after it (idle blocking-pool threads
            // after 10 s): measure until it has, at most 15 s.
            let deadline = Instant::now() + Duration::from_secs(15);
            let (fds_after, threads_after, children_after, files_after) = loop {
                let measured = (
                    fd_count(sandboxer),
                    thread_count(sandboxer),
                    children_of(sandboxer),
                    tree(&state),
                );
                let settled = measured.0 <= fds_before + 2
                    && measured.1 <= threads_before + 2
                    && measured.2.len() == children_before.len()
                    && measured.3.difference(&files_before).next().is_none();
                if settled || Instant::now() >= deadline {
                    break measured;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            let new_files: Vec<_> = files_after.difference(&files_before).collect();
            eprintln!(
                "fds {fds_before} -> {fds_after}, threads {threads_before} -> {threads_after}, \
                 children {} -> {}",
                children_before.len(),
                children_after.len()
            );
            ensure!(
                fds_after <= fds_before + 2,
                "sandboxer fds grew from {fds_before} to {fds_after} over 20 containers: {:?}",
                std::fs::read_dir(format!("/proc/{sandboxer}/fd"))
                    .map(|d| d
                        .flatten()
                        .filter_map(|e| std::fs::read_link(e.path()).ok())
                        .collect::<Vec<_>>())
                    .unwrap_or_default()
            );
            ensure!(
                threads_after <= threads_before + 2,
                "sandboxer threads grew from {threads_before} to {threads_after}"
            );
            ensure!(
                children_after.len() == children_before.len(),
                "sandboxer children {children_before:?} -> {children_after:?}"
            );
            ensure!(
                new_files.is_empty(),
                "new files in sandboxer state: {new_files:?}"
            );
            let zombies: Vec<u32> = all_pids()
                .into_iter()
                .filter(|p| parent_pid(*p) == Some(sandboxer) && proc_state(*p) == Some('Z'))
                .collect();
            ensure!(zombies.is_empty(), "zombie children: {zombies:?}");
            h.remove_pod_and_check(&pod).await
        })
        .await
}

// ---------------------------------------------------------------------------------------
// 5. Exec edge cases
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn exec_of_a_missing_binary_names_it() -> Result<()> {
    Harness::start_with_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("exec-missing", KUASAR_RUNC_HANDLER).await?;
            let cfg = h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
            let cid = h.start_container(&pod, &cfg).await?;
            let result = h.cri().exec_sync(&cid, &["/no/such/exec-binary"], 10).await;
            match result {
                Ok(resp) => ensure!(
                    resp.exit_code != 0 && (text(&resp.stderr).contains("/no/such/exec-binary")),
                    "exec of a missing binary: {resp:?}"
                ),
                Err(e) => {
                    let message = format!("{e:#}");
                    ensure!(
                        message.contains("/no/such/exec-binary"),
                        "error does not name the binary: {message}"
                    );
                }
            }
            // The container is unharmed and exec keeps working.
            let ok = h.cri().exec_sync(&cid, &["echo", "fine"], 10).await?;
            ensure!(text(&ok.stdout) == "fine", "{ok:?}");
            h.remove_pod_and_check(&pod).await
        })
        .await
}

#[tokio::test]
async fn exec_into_an_exited_container_fails_clearly() -> Result<()> {
    Harness::start_with_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("exec-exited", KUASAR_RUNC_HANDLER).await?;
            let cfg = h.container_config("short", BUSYBOX_IMAGE, &["true"]);
            let cid = h.start_container(&pod, &cfg).await?;
            h.cri().wait_container_exited(&cid, EXIT_TIMEOUT).await?;
            let result =
                tokio::time::timeout(CALL_TIMEOUT, h.cri().exec_sync(&cid, &["echo", "hi"], 10))
                    .await
                    .context("exec into an exited container hangs")?;
            let err = result
                .err()
                .context("exec into an exited container succeeded")?;
            let message = format!("{err:#}");
            ensure!(
                message.to_lowercase().contains("exited")
                    || message.to_lowercase().contains("not running"),
                "unclear error: {message}"
            );
            h.remove_pod_and_check(&pod).await
        })
        .await
}

#[tokio::test]
async fn exec_sync_timeout_kills_the_long_running_exec() -> Result<()> {
    Harness::start_with_sandboxer()
        .await?
        .run(async |h: &Harness| {
            let pod = h.run_pod("exec-timeout", KUASAR_RUNC_HANDLER).await?;
            let cfg = h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
            let cid = h.start_container(&pod, &cfg).await?;
            let began = Instant::now();
            let result =
                tokio::time::timeout(CALL_TIMEOUT, h.cri().exec_sync(&cid, &["sleep", "987"], 2))
                    .await
                    .context("ExecSync ignores its timeout")?;
            let elapsed = began.elapsed();
            ensure!(
                elapsed < Duration::from_secs(15),
                "ExecSync with a 2s timeout took {elapsed:?}"
            );
            match &result {
                Err(e) => ensure!(
                    format!("{e:#}").to_lowercase().contains("timeout")
                        || format!("{e:#}").to_lowercase().contains("deadline"),
                    "unclear timeout error: {e:#}"
                ),
                Ok(resp) => ensure!(resp.exit_code != 0, "timed out exec succeeded: {resp:?}"),
            }
            wait_until(
                "the timed-out exec process is killed",
                Duration::from_secs(10),
                || {
                    !container_processes(&cid)
                        .iter()
                        .any(|(_, cmd)| cmd == "sleep 987")
                },
            )
            .await?;
            let status = h.cri().container_status(&cid).await?;
            ensure!(
                status.state == ContainerState::ContainerRunning as i32,
                "container after the exec timeout: {status:?}"
            );
            let ok = h.cri().exec_sync(&cid, &["echo", "again"], 10).await?;
            ensure!(text(&ok.stdout) == "again", "{ok:?}");
            h.remove_pod_and_check(&pod).await
        })
        .await
}
