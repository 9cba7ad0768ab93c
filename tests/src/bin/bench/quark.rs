//! The quark sandboxer against containerd's own runc shim driving runsc (the way users run
//! gVisor without its own shim): start latency and per-pod memory. Both paths run one runsc
//! sandbox per pod; what differs is what manages it.
//!
//! runc's shim cannot see the exits of containers inside runsc (runsc reports the sandbox's
//! pid for every container) and so can never stop them: the benchmark ends each baseline
//! pod as containerd ends a pod whose shim crashed, before removing it. Removal is not
//! timed.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kuasar_tests::images::BUSYBOX_IMAGE;
use kuasar_tests::{cleanup, Harness, Pod, KUASAR_QUARK_HANDLER, RUNSC_HANDLER};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{
    all_pids, arguments, has_flag, median, min_max, remove_pod, rotated, shims, start_pod_then,
    verdict, Memory, Options, StartTimes, HOLDER_COMMAND, SETTLE, SHIM_BINARY,
};

/// The sleeping container of both paths. It lets go of its stdio first: runsc wires a
/// container joining a sandbox to the stdio of `runsc start`, which runc's shim captures
/// until end-of-file, so a sleeper keeping it would hold StartContainer forever.
const SLEEPER: [&str; 3] = [
    "sh",
    "-c",
    "exec </dev/null >/dev/null 2>&1; exec sleep 3600",
];

/// How often removing a baseline pod is tried while containerd cleans up after its shim.
const REMOVE_ATTEMPTS: usize = 25;

/// How long an ended runsc sandbox may take to disappear.
const SANDBOX_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Target of the start latency ratio kuasar-quark / runc.v2 driving runsc.
const LATENCY_TARGET: f64 = 0.7;

/// The two ways of running a pod in runsc that are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handler {
    /// containerd's runc shim with runsc as its runtime binary, and a pause container.
    RuncV2,
    /// The quark sandboxer.
    Kuasar,
}

impl Handler {
    const ALL: [Self; 2] = [Self::RuncV2, Self::Kuasar];

    /// Both, the first of them alternating with `index`.
    fn order(index: usize) -> [Self; 2] {
        rotated(Self::ALL, index)
    }

    fn index(self) -> usize {
        self as usize
    }

    fn cri_name(self) -> &'static str {
        match self {
            Self::RuncV2 => RUNSC_HANDLER,
            Self::Kuasar => KUASAR_QUARK_HANDLER,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::RuncV2 => "runc.v2+runsc",
            Self::Kuasar => "kuasar-quark",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Self::RuncV2 => "qrunsc",
            Self::Kuasar => "qkuasar",
        }
    }
}

/// Start times per handler, in [`Handler::index`] order.
pub(crate) type LatencyResults = [Vec<StartTimes>; 2];

async fn start_once(h: &Harness, handler: Handler, name: &str) -> Result<StartTimes> {
    let container = h.container_config("sleeper", BUSYBOX_IMAGE, &SLEEPER);
    let remove = async |h: &Harness, pod: &Pod| remove(h, handler, std::slice::from_ref(pod)).await;
    start_pod_then(h, handler.cri_name(), name, &container, remove).await
}

/// The runsc sandbox processes of the baseline's pods: `runsc-sandbox --root=<the shim's
/// runsc root>/<namespace> ... boot ...`.
fn baseline_sandboxes(h: &Harness) -> Vec<u32> {
    let root = format!("--root={}/", h.layout().runsc_v2_root.display());
    all_pids()
        .into_iter()
        .filter(|&pid| {
            let args = arguments(pid);
            args.first().is_some_and(|a| a.starts_with("runsc-sandbox"))
                && args.iter().any(|a| a.starts_with(&root))
        })
        .collect()
}

/// containerd's runc shims of `pod`: the run's shims with `-id <pod id>`.
fn baseline_shims(h: &Harness, pod: &Pod) -> Vec<u32> {
    shims(h.layout())
        .into_iter()
        .filter(|&pid| has_flag(&arguments(pid), "-id", &pod.id))
        .collect()
}

/// Removes `pods` of `handler`. The baseline's runc shim never learns that a container in
/// runsc exited and cannot stop it, so its pods are first ended the way containerd handles a
/// crashed shim: the shim and the runsc sandbox are killed, containerd marks their tasks
/// exited and cleans up through the shim binary's `delete`.
async fn remove(h: &Harness, handler: Handler, pods: &[Pod]) -> Result<()> {
    if handler == Handler::RuncV2 {
        let shims: Vec<u32> = pods.iter().flat_map(|pod| baseline_shims(h, pod)).collect();
        for pid in shims.iter().copied().chain(baseline_sandboxes(h)) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let deadline = Instant::now() + SANDBOX_EXIT_TIMEOUT;
        while !baseline_sandboxes(h).is_empty()
            || pods.iter().any(|pod| !baseline_shims(h, pod).is_empty())
        {
            ensure!(
                Instant::now() < deadline,
                "runc shims or runsc sandboxes still running after SIGKILL"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // CRI takes the exits from containerd's events, a moment later.
        for pod in pods {
            for container in h.cri().list_containers(Some(&pod.id)).await? {
                h.cri()
                    .wait_container_exited(&container.id, SANDBOX_EXIT_TIMEOUT)
                    .await?;
            }
        }
    }
    let mut removal = Ok(());
    for pod in pods {
        let mut attempt = 1;
        // containerd cleans up after a dead shim in the background; until it has, removing
        // the pod fails ("ttrpc: closed").
        while let Err(e) = remove_pod(h, pod).await {
            if handler == Handler::Kuasar || attempt == REMOVE_ATTEMPTS {
                removal = removal.and(Err(e));
                break;
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    if handler == Handler::RuncV2 {
        removal = removal.and(delete_baseline_state(h));
    }
    removal
}

/// Deletes what runsc keeps of the baseline's containers (state files, cgroups): the shim
/// that would have deleted them was killed.
fn delete_baseline_state(h: &Harness) -> Result<()> {
    let layout = h.layout();
    let root = layout.runsc_v2_root.join("k8s.io");
    if !root.is_dir() {
        return Ok(());
    }
    let runsc = |args: &[&str]| {
        Command::new(&layout.runsc_v2_binary)
            .arg("--root")
            .arg(&root)
            .args(args)
            .output()
            .with_context(|| format!("cannot run {}", layout.runsc_v2_binary.display()))
    };
    let listed = runsc(&["list", "--quiet"])?;
    ensure!(
        listed.status.success(),
        "runsc list failed: {}",
        String::from_utf8_lossy(&listed.stderr)
    );
    // runsc's complaints about files that went with containerd's cleanup (a filestore in a
    // rootfs that is unmounted already) do not matter: what is left is checked afterwards.
    for id in String::from_utf8_lossy(&listed.stdout).split_whitespace() {
        runsc(&["delete", "--force", id])?;
    }
    Ok(())
}

pub(crate) async fn measure_latency(h: &Harness, options: &Options) -> Result<LatencyResults> {
    for round in 0..options.warmup {
        for handler in Handler::ALL {
            let name = format!("warm-{}-{round}", handler.tag());
            let times = start_once(h, handler, &name).await?;
            eprintln!(
                "quark warm-up {}/{}: {:<14} {:7.1} ms",
                round + 1,
                options.warmup,
                handler.label(),
                times.total
            );
        }
    }
    let mut results: LatencyResults = Default::default();
    for iteration in 0..options.iterations {
        for handler in Handler::order(iteration) {
            let name = format!("lat-{}-{iteration}", handler.tag());
            let times = start_once(h, handler, &name).await?;
            eprintln!(
                "quark latency {}/{}: {:<14} {:7.1} ms (RunPodSandbox {:.1}, CreateContainer {:.1}, \
                 StartContainer {:.1})",
                iteration + 1,
                options.iterations,
                handler.label(),
                times.total,
                times.run_pod,
                times.create,
                times.start
            );
            results[handler.index()].push(times);
        }
    }
    Ok(results)
}

pub(crate) fn print_latency(results: &LatencyResults, options: &Options) {
    println!(
        "application-kernel start latency (RunPodSandbox -> container started), {} iterations \
         alternating; a busybox sleep in runsc (systrap) on both paths",
        options.iterations
    );
    let of = |handler: Handler, part: fn(&StartTimes) -> f64| {
        median(
            &results[handler.index()]
                .iter()
                .map(part)
                .collect::<Vec<_>>(),
        )
    };
    for handler in Handler::ALL {
        let totals: Vec<f64> = results[handler.index()].iter().map(|t| t.total).collect();
        let (min, max) = min_max(&totals);
        println!(
            "  {:<14} median {:7.1} ms  (min {min:.1}, max {max:.1}; medians of RunPodSandbox \
             {:.1}, CreateContainer {:.1}, StartContainer {:.1})",
            handler.label(),
            median(&totals),
            of(handler, |t| t.run_pod),
            of(handler, |t| t.create),
            of(handler, |t| t.start),
        );
    }
    let ratio = of(Handler::Kuasar, |t| t.total) / of(Handler::RuncV2, |t| t.total);
    println!(
        "  {:<14} {ratio:.3}  (kuasar-quark / runc.v2+runsc, target <= {LATENCY_TARGET:.1})  {}",
        "ratio",
        verdict(ratio, LATENCY_TARGET)
    );
}

/// What a host process of a pod is, by its command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// containerd's runc shim.
    Shim,
    /// runsc's sandbox (the kernel, with its systrap stubs) and gofer processes.
    Kernel,
    /// A `runsc wait` reporting a container's exit to the sandboxer.
    Waiter,
    /// The sandboxer's namespace holder.
    Holder,
    /// Anything else of the run.
    Other,
}

impl Role {
    const ALL: [Self; 5] = [
        Self::Shim,
        Self::Kernel,
        Self::Waiter,
        Self::Holder,
        Self::Other,
    ];

    fn of(args: &[String]) -> Self {
        let program = args
            .first()
            .and_then(|a| Path::new(a).file_name())
            .and_then(|name| name.to_str())
            .unwrap_or_default();
        if program == SHIM_BINARY {
            Self::Shim
        } else if program.starts_with("runsc-sandbox") || program.starts_with("runsc-gofer") {
            Self::Kernel
        } else if program == "runsc" && args.iter().any(|a| a == "wait") {
            Self::Waiter
        } else if args.get(1).map(String::as_str) == Some(HOLDER_COMMAND) {
            Self::Holder
        } else {
            Self::Other
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Shim => "shim",
            Self::Kernel => "kernel",
            Self::Waiter => "runsc wait",
            Self::Holder => "holder",
            Self::Other => "other",
        }
    }
}

/// One per-pod memory measurement: per role, then the sandboxer's growth.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MemorySample {
    roles: [Memory; 5],
    growth: Memory,
}

impl MemorySample {
    fn total(&self) -> Memory {
        self.roles
            .iter()
            .fold(self.growth, |total, &part| total.plus(part))
    }
}

/// Memory samples per handler, in [`Handler::index`] order.
pub(crate) type MemoryResults = [Vec<MemorySample>; 2];

async fn measure_memory_once(
    h: &Harness,
    handler: Handler,
    count: usize,
    round: usize,
) -> Result<MemorySample> {
    ensure!(
        h.cri().list_pods().await?.is_empty(),
        "pods left over before a memory round"
    );
    let daemons: Vec<u32> = h
        .containerd_pid()
        .into_iter()
        .chain(h.sandboxer_pid())
        .chain(h.wasm_sandboxer_pid())
        .chain(h.quark_sandboxer_pid())
        .collect();
    let sandboxer = h.quark_sandboxer_pid();
    let idle = match (handler, sandboxer) {
        (Handler::Kuasar, Some(pid)) => Memory::of(pid)?,
        _ => Memory::default(),
    };

    let mut pods = Vec::new();
    let result: Result<MemorySample> = async {
        for index in 0..count {
            let name = format!("mem-{}-{round}-{index}", handler.tag());
            let pod = h.run_pod(&name, handler.cri_name()).await?;
            pods.push(pod);
            let pod = pods.last().expect("a pod was just pushed");
            let sleeper = h.container_config("sleeper", BUSYBOX_IMAGE, &SLEEPER);
            h.start_container(pod, &sleeper).await?;
        }
        tokio::time::sleep(SETTLE).await;
        let mut sample = MemorySample::default();
        for (pid, _) in cleanup::run_processes(h.layout(), &daemons) {
            let role = Role::of(&arguments(pid));
            // A process that ended since the listing counts for nothing.
            if let Ok(memory) = Memory::of(pid) {
                sample.roles[role as usize] = sample.roles[role as usize].plus(memory);
            }
        }
        if let (Handler::Kuasar, Some(pid)) = (handler, sandboxer) {
            sample.growth = Memory::of(pid)?.minus(idle);
        }
        for part in sample.roles.iter_mut() {
            *part = part.per(count);
        }
        sample.growth = sample.growth.per(count);
        Ok(sample)
    }
    .await;

    let removal = remove(h, handler, &pods).await;
    let sample = result?;
    removal?;
    Ok(sample)
}

pub(crate) async fn measure_memory(h: &Harness, options: &Options) -> Result<MemoryResults> {
    let mut results: MemoryResults = Default::default();
    for round in 0..options.rounds {
        for handler in Handler::order(round) {
            let sample = measure_memory_once(h, handler, options.pods, round).await?;
            let total = sample.total();
            eprintln!(
                "quark memory {}/{}: {:<14} per pod RSS {:6.0} PSS {:6.0} KiB",
                round + 1,
                options.rounds,
                handler.label(),
                total.rss,
                total.pss,
            );
            results[handler.index()].push(sample);
        }
    }
    Ok(results)
}

pub(crate) fn print_memory(results: &MemoryResults, options: &Options) {
    println!(
        "application-kernel per-pod memory with one sleeping container, {} pods, {} rounds \
         (medians, KiB per pod, RSS/PSS; every host process of the pods plus the sandboxer's \
         growth)",
        options.pods, options.rounds
    );
    let of = |handler: Handler, part: &dyn Fn(&MemorySample) -> Memory| {
        let samples = &results[handler.index()];
        let rss: Vec<f64> = samples.iter().map(|s| part(s).rss).collect();
        let pss: Vec<f64> = samples.iter().map(|s| part(s).pss).collect();
        (median(&rss), median(&pss))
    };
    for handler in Handler::ALL {
        let (rss, pss) = of(handler, &|s| s.total());
        let mut parts = Vec::new();
        for role in Role::ALL {
            let (r, p) = of(handler, &|s| s.roles[role as usize]);
            if r > 0.0 {
                parts.push(format!("{} {r:.0}/{p:.0}", role.label()));
            }
        }
        if handler == Handler::Kuasar {
            let (r, p) = of(handler, &|s| s.growth);
            parts.push(format!("sandboxer growth {r:.0}/{p:.0}"));
        }
        println!(
            "  {:<14} RSS {rss:7.0}  PSS {pss:7.0}  ({})",
            handler.label(),
            parts.join(", ")
        );
    }
    let pss = |handler| of(handler, &|s| s.total()).1;
    println!(
        "  {:<14} {:.3}  (kuasar-quark / runc.v2+runsc)",
        "ratio (PSS)",
        pss(Handler::Kuasar) / pss(Handler::RuncV2)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn roles_come_from_command_lines() {
        let of = |list: &[&str]| Role::of(&args(list));
        assert_eq!(
            of(&["/usr/bin/containerd-shim-runc-v2", "-id", "x"]),
            Role::Shim
        );
        assert_eq!(of(&["runsc-sandbox", "--root=/r", "boot"]), Role::Kernel);
        assert_eq!(of(&["runsc-gofer", "--root=/r", "gofer"]), Role::Kernel);
        assert_eq!(
            of(&["/opt/runsc", "--root", "/r", "wait", "c1"]),
            Role::Waiter
        );
        assert_eq!(of(&["/x/quark-sandboxer", "hold-namespaces"]), Role::Holder);
        assert_eq!(of(&["/bin/sleep", "3600"]), Role::Other);
    }

    #[test]
    fn paths_alternate() {
        assert_eq!(Handler::order(0), [Handler::RuncV2, Handler::Kuasar]);
        assert_eq!(Handler::order(1), [Handler::Kuasar, Handler::RuncV2]);
    }
}
