//! `kuasar-demo`: one pod on the runc sandboxer, driven step by step through containerd's CRI
//! API the way a kubelet or `crictl` would, on a private containerd 2.1.9 that is torn down
//! again at the end. Needs root, like the end-to-end tests.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use k8s_cri::v1::{DnsConfig, PodSandboxState};
use kuasar_tests::harness::{self, SANDBOXER_NAME};
use kuasar_tests::images::{BUSYBOX_IMAGE, PAUSE_IMAGE};
use kuasar_tests::{cleanup, cri, Harness, Pod, KUASAR_RUNC_HANDLER};

/// Name, hostname and Kubernetes namespace of the demo pod.
const POD_NAME: &str = "hello";
const POD_NAMESPACE: &str = "default";

/// What the first container runs.
const HELLO_SCRIPT: &str = "echo \"hello from $(hostname), a pod of the kuasar runc sandboxer\"; \
                            uname -a; cat /etc/resolv.conf | head -3";

/// What the second container is asked through ExecSync.
const PS_COMMAND: &[&str] = &["ps", "-o", "pid,ppid,user,args"];

/// First argument of the sandboxer's namespace holders.
const HOLDER_COMMAND: &str = "hold-namespaces";

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
const COMMAND_WIDTH: usize = 150;

#[tokio::main]
async fn main() -> ExitCode {
    match demo().await {
        Ok(()) => {
            println!("\nkuasar-demo: done, everything worked and nothing is left on the host");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\nkuasar-demo FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn demo() -> Result<()> {
    println!(
        "kuasar-demo: a Kubernetes-style pod on the runc sandboxer (runtime handler \
         {KUASAR_RUNC_HANDLER:?}), driven through containerd's CRI API"
    );

    step(
        1,
        "start a private containerd 2.1.9 and the runc-sandboxer",
        None,
    );
    let began = Instant::now();
    let h = Harness::start_with_sandboxer().await?;
    let started = began.elapsed();
    let layout = h.layout().clone();

    let result = tokio::select! {
        result = run_pod(&h, started) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    if result.is_err() {
        h.print_log_tails();
    }

    step(
        8,
        "tear down: stop containerd and the sandboxer, remove the run's bridge, cgroups and \
         directory",
        None,
    );
    let began = Instant::now();
    let teardown = h.teardown().context("teardown failed");
    let checked = harness::leftovers_of(&layout, &[]).and_then(|left| {
        ensure!(left.is_empty(), "the run left on the host:\n{left}");
        ensure!(
            !layout.run_dir.exists(),
            "{} still exists",
            layout.run_dir.display()
        );
        Ok(())
    });
    if result.is_err() {
        for e in [&teardown, &checked]
            .into_iter()
            .filter_map(|r| r.as_ref().err())
        {
            eprintln!("{e:#}");
        }
    }
    result?;
    teardown?;
    checked?;
    detail(
        "leftovers",
        "none: no process, mount, network namespace, cgroup, runtime state, CNI state or bridge",
    );
    detail("took", &ms(began.elapsed()));
    Ok(())
}

/// Steps 1 (the details) to 7 on the started harness.
async fn run_pod(h: &Harness, started: Duration) -> Result<()> {
    let layout = h.layout();
    let version = h.cri().version().await?;
    let status = h.cri().status().await?;
    let handlers: Vec<&str> = status
        .runtime_handlers
        .iter()
        .map(|r| r.name.as_str())
        .filter(|name| !name.is_empty())
        .collect();
    detail(
        "run directory",
        &format!(
            "{} (containerd's root, state, sockets and logs; removed at the end)",
            layout.run_dir.display()
        ),
    );
    detail(
        "containerd",
        &format!(
            "pid {}, CRI socket {}",
            pid_text(h.containerd_pid()),
            layout.containerd_socket.display()
        ),
    );
    detail(
        "runc-sandboxer",
        &format!(
            "pid {}, Sandbox API socket {}",
            pid_text(h.sandboxer_pid()),
            layout.sandboxer_socket.display()
        ),
    );
    detail(
        "CRI Version",
        &format!(
            "{} {} (CRI {})",
            version.runtime_name, version.runtime_version, version.runtime_api_version
        ),
    );
    detail("runtime handlers", &handlers.join(", "));
    detail(
        "images",
        &format!("{BUSYBOX_IMAGE}, {PAUSE_IMAGE} (built locally and imported, no registry)"),
    );
    detail(
        "containerd config",
        &format!(
            "handler {KUASAR_RUNC_HANDLER:?} -> sandboxer {SANDBOXER_NAME:?}, a sandbox proxy \
             plugin:"
        ),
    );
    let config = fs::read_to_string(&layout.containerd_config)
        .with_context(|| format!("cannot read {}", layout.containerd_config.display()))?;
    quote(&handler_sections(&config));
    detail("ready after", &ms(started));

    step(
        2,
        &format!("RunPodSandbox {POD_NAME:?} on runtime handler {KUASAR_RUNC_HANDLER:?}"),
        Some(&format!(
            "crictl runp --runtime {KUASAR_RUNC_HANDLER} pod.json"
        )),
    );
    let mut config = h.pod_config(POD_NAME)?;
    if let Some(metadata) = config.metadata.as_mut() {
        metadata.namespace = POD_NAMESPACE.to_string();
    }
    // What a kubelet passes for a ClusterFirst pod; no name is ever resolved in the demo.
    let dns_server = layout.subnet.replace(".0/24", ".10");
    config.dns_config = Some(DnsConfig {
        servers: vec![dns_server],
        searches: vec![
            format!("{POD_NAMESPACE}.svc.cluster.local"),
            "svc.cluster.local".to_string(),
            "cluster.local".to_string(),
        ],
        options: vec!["ndots:5".to_string()],
    });
    let began = Instant::now();
    let id = h.cri().run_pod(&config, KUASAR_RUNC_HANDLER).await?;
    let took = began.elapsed();
    let pod = Pod { id, config };
    let status = h.cri().pod_status(&pod.id).await?;
    let ip = status
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    ensure!(
        status.state == PodSandboxState::SandboxReady as i32,
        "pod is {} instead of ready",
        PodSandboxState::try_from(status.state)
            .map(|s| s.as_str_name())
            .unwrap_or("UNKNOWN")
    );
    ensure!(!ip.is_empty(), "the pod got no IP");
    detail("pod id", &pod.id);
    detail("state", "SANDBOX_READY");
    detail(
        "pod IP",
        &format!("{ip} (CNI bridge {} on {})", layout.bridge, layout.subnet),
    );
    detail("took", &ms(took));

    step(
        3,
        "CreateContainer + StartContainer \"hello\" (busybox), then wait until it has exited",
        Some("crictl create $POD hello.json pod.json && crictl start $CTR"),
    );
    let hello = h.container_config("hello", BUSYBOX_IMAGE, &["sh", "-c", HELLO_SCRIPT]);
    detail("command", &format!("sh -c '{HELLO_SCRIPT}'"));
    let began = Instant::now();
    let hello_id = h.start_container(&pod, &hello).await?;
    detail("container id", &hello_id);
    detail("started in", &ms(began.elapsed()));
    let exited = h
        .cri()
        .wait_container_exited(&hello_id, EXIT_TIMEOUT)
        .await?;
    detail(
        "state",
        &format!(
            "{}, exit code {}, reason {:?}",
            cri::state_name(exited.state),
            exited.exit_code,
            exited.reason
        ),
    );
    ensure!(
        exited.exit_code == 0,
        "hello exited with code {}",
        exited.exit_code
    );

    step(
        4,
        "the container's log, as `crictl logs` shows it",
        Some("crictl logs $CTR"),
    );
    detail(
        "log file",
        &cri::container_log_file(&pod.config, &hello)
            .display()
            .to_string(),
    );
    let log = h.container_log(&pod, &hello)?;
    quote(&log);
    let greeting = format!("hello from {POD_NAME}, a pod of the kuasar runc sandboxer");
    ensure!(
        log.lines().next() == Some(greeting.as_str()),
        "the log does not start with {greeting:?}"
    );
    ensure!(
        log.lines().any(|l| l.starts_with("Linux ")),
        "no uname output in the log"
    );

    step(
        5,
        "CreateContainer + StartContainer \"sleeper\" (busybox, sleep 3600), then ExecSync `ps` \
         into it",
        Some("crictl exec -s $CTR ps -o pid,ppid,user,args"),
    );
    let sleeper = h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
    let sleeper_id = h.start_container(&pod, &sleeper).await?;
    detail("container id", &sleeper_id);
    let exec = h.cri().exec_sync(&sleeper_id, PS_COMMAND, 10).await?;
    detail("exit code", &exec.exit_code.to_string());
    let ps = String::from_utf8_lossy(&exec.stdout).into_owned();
    quote(&ps);
    let stderr = String::from_utf8_lossy(&exec.stderr);
    if !stderr.trim().is_empty() {
        detail("stderr", stderr.trim());
    }
    ensure!(
        exec.exit_code == 0,
        "ps exited with code {}",
        exec.exit_code
    );
    let pid1 = ps
        .lines()
        .find(|l| l.split_whitespace().next() == Some("1"))
        .context("ps shows no PID 1")?;
    ensure!(
        pid1.contains(HOLDER_COMMAND),
        "PID 1 of the pod is not the sandboxer's holder: {pid1}"
    );
    ensure!(
        ps.contains("sleep 3600"),
        "the sleeper is not visible in the pod"
    );
    detail(
        "meaning",
        "the containers share the pod's PID namespace; its PID 1 is the sandboxer's namespace \
         holder, not a pause container",
    );

    step(6, "the process tree on the host", Some("ps -ef --forest"));
    process_tree(h, &pod, &[("hello", &hello_id), ("sleeper", &sleeper_id)]).await?;

    step(
        7,
        "StopPodSandbox + RemovePodSandbox, then check that nothing of the pod is left",
        Some("crictl stopp $POD && crictl rmp $POD"),
    );
    let began = Instant::now();
    h.remove_pod_and_check(&pod).await?;
    detail("took", &ms(began.elapsed()));
    detail(
        "left",
        "no pod, no container; no holder, container process, mount, network namespace, cgroup, \
         runtime or CNI state of the pod",
    );
    Ok(())
}

/// Prints the processes of the run as a tree and checks the sandboxer's process model: one
/// sandboxer, one holder per pod, no shim and no pause process.
async fn process_tree(h: &Harness, pod: &Pod, containers: &[(&str, &str)]) -> Result<()> {
    let layout = h.layout();
    let daemons: Vec<u32> = h
        .containerd_pid()
        .into_iter()
        .chain(h.sandboxer_pid())
        .collect();

    let mut parents = BTreeMap::new();
    for pid in all_pids() {
        if let Some(ppid) = parent_of(pid) {
            parents.insert(pid, ppid);
        }
    }
    let mut members: BTreeSet<u32> = daemons.iter().copied().collect();
    members.extend(
        cleanup::run_processes(layout, &[])
            .into_iter()
            .map(|(pid, _)| pid),
    );
    members.extend(
        cleanup::cgroup_processes(layout)
            .into_iter()
            .map(|(pid, _)| pid),
    );
    loop {
        let before = members.len();
        let children: Vec<u32> = parents
            .iter()
            .filter(|(_, ppid)| members.contains(ppid))
            .map(|(pid, _)| *pid)
            .collect();
        members.extend(children);
        if members.len() == before {
            break;
        }
    }
    members.remove(&std::process::id());

    let sandboxer_exe = h
        .sandboxer_pid()
        .and_then(|pid| fs::read_link(format!("/proc/{pid}/exe")).ok());
    let mut labels = BTreeMap::new();
    let (mut sandboxers, mut holders, mut shims, mut pauses) = (0, 0, 0, 0);
    for &pid in &members {
        let args = arguments(pid);
        let program = args
            .first()
            .and_then(|a| Path::new(a).file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let is_sandboxer_binary = sandboxer_exe.is_some()
            && fs::read_link(format!("/proc/{pid}/exe")).ok() == sandboxer_exe;
        let label = if Some(pid) == h.containerd_pid() {
            "containerd".to_string()
        } else if is_sandboxer_binary && args.get(1).map(String::as_str) == Some(HOLDER_COMMAND) {
            holders += 1;
            format!("holder of pod {POD_NAME:?}")
        } else if is_sandboxer_binary {
            sandboxers += 1;
            "runc-sandboxer".to_string()
        } else if program.starts_with("containerd-shim") {
            shims += 1;
            "a containerd shim".to_string()
        } else if program == "pause" {
            pauses += 1;
            "a pause container".to_string()
        } else if let Some((name, _)) = containers
            .iter()
            .find(|(_, id)| cgroup_of(pid).contains(id))
        {
            format!("container {name:?}")
        } else {
            String::new()
        };
        labels.insert(pid, label);
    }

    let roots: Vec<u32> = members
        .iter()
        .copied()
        .filter(|pid| parents.get(pid).is_none_or(|ppid| !members.contains(ppid)))
        .collect();
    println!("    {:<8} {:<32} COMMAND", "PID", "ROLE");
    for root in roots {
        print_tree(root, 0, &members, &parents, &labels);
    }

    let pods = h.cri().list_pods().await?.len();
    detail(
        "counted",
        &format!(
            "{sandboxers} runc-sandboxer process, {holders} namespace holder for {pods} pod, \
             {shims} containerd-shim processes, {pauses} pause processes"
        ),
    );
    ensure!(
        sandboxers == 1,
        "{sandboxers} runc-sandboxer processes instead of one"
    );
    ensure!(
        holders == pods && pods == 1,
        "{holders} holders for {pods} pods"
    );
    detail(
        "meaning",
        "one sandboxer serves every pod; per pod there is only the small holder, and the \
         containers are children of the sandboxer (their subreaper), not of a shim",
    );
    ensure!(shims == 0, "{shims} containerd shims run");
    ensure!(pauses == 0, "{pauses} pause processes run");
    ensure!(
        h.cri().list_pods().await?.iter().all(|p| p.id == pod.id),
        "unexpected pods"
    );
    Ok(())
}

fn print_tree(
    pid: u32,
    depth: usize,
    members: &BTreeSet<u32>,
    parents: &BTreeMap<u32, u32>,
    labels: &BTreeMap<u32, String>,
) {
    let branch = if depth == 0 { "" } else { "\\_ " };
    let role = format!(
        "{}{branch}{}",
        "   ".repeat(depth.saturating_sub(1)),
        labels.get(&pid).map(String::as_str).unwrap_or("")
    );
    let line = format!("{pid:<8} {role:<32} {}", arguments(pid).join(" "));
    println!("    {}", shorten(&line, COMMAND_WIDTH));
    let children = parents
        .iter()
        .filter(|(child, ppid)| **ppid == pid && members.contains(child))
        .map(|(child, _)| *child);
    for child in children {
        print_tree(child, depth + 1, members, parents, labels);
    }
}

fn shorten(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let kept: String = text.chars().take(width.saturating_sub(3)).collect();
    format!("{kept}...")
}

/// The parent of process `pid`: field 4 of `/proc/<pid>/stat`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; it ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn cgroup_of(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default()
}

/// The arguments of process `pid`, or none when it is gone.
fn arguments(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|arg| !arg.is_empty())
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn all_pids() -> Vec<u32> {
    cleanup::list_dir(Path::new("/proc"))
        .into_iter()
        .filter_map(|p| p.file_name()?.to_str()?.parse().ok())
        .collect()
}

/// The sections of containerd's configuration that wire the handler to the sandboxer.
fn handler_sections(config: &str) -> String {
    let mut keep = false;
    let mut out = String::new();
    for line in config.lines() {
        if line.starts_with('[') {
            keep = line.contains(KUASAR_RUNC_HANDLER) || line.starts_with("[proxy_plugins");
        }
        if keep && !line.trim().is_empty() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn step(number: u32, what: &str, equivalent: Option<&str>) {
    println!("\n==> {number}. {what}");
    if let Some(command) = equivalent {
        println!("    (by hand: {command})");
    }
}

fn detail(key: &str, value: &str) {
    println!("    {key:<18} {value}");
}

fn quote(text: &str) {
    for line in text.lines() {
        println!("    | {line}");
    }
}

fn pid_text(pid: Option<u32>) -> String {
    pid.map_or_else(|| "?".to_string(), |p| p.to_string())
}

fn ms(duration: Duration) -> String {
    format!("{:.0} ms", duration.as_secs_f64() * 1000.0)
}
