//! `kuasar-bench`: the runc sandboxer against containerd's own runc shim on one containerd,
//! alternating between the two CRI handlers. Measures the start latency (RunPodSandbox until
//! a started container) and the memory of the processes that exist only to manage pods.
//! Then, on the same containerd, the wasm sandboxer against the runc sandboxer: start latency
//! with a cold and a warm module cache, per-pod memory and container start throughput.
//! Needs root, like the end-to-end tests; prints a table and never fails on a missed target.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1::ContainerConfig;
use kuasar_tests::images::{BUSYBOX_IMAGE, WASM_IMAGE};
use kuasar_tests::{
    cleanup, Harness, HarnessOptions, Layout, Pod, KUASAR_RUNC_HANDLER, KUASAR_WASM_HANDLER,
    RUNC_HANDLER,
};

/// Target of the start latency ratio kuasar-runc / runc.v2.
const LATENCY_TARGET: f64 = 0.7;

/// Target of the per-pod management memory (PSS) ratio kuasar-runc / runc.v2.
const MEMORY_TARGET: f64 = 0.2;

/// How long the pods of a memory round run before their processes are measured, so that
/// lazily started work (shim goroutines, first requests) is part of what is measured.
const SETTLE: Duration = Duration::from_secs(2);

/// Name of containerd's runc shim binary.
const SHIM_BINARY: &str = "containerd-shim-runc-v2";

/// Command line of the test pause image's process.
const PAUSE_COMMAND: &str = "/pause";

/// First argument of the sandboxer's namespace holders.
const HOLDER_COMMAND: &str = "hold-namespaces";

/// Target of the start latency ratio warm wasm / kuasar-runc.
const WASM_LATENCY_TARGET: f64 = 0.30;

/// Target of the wasm container start throughput, in containers per second.
const WASM_THROUGHPUT_TARGET: f64 = 300.0;

/// First argument of the wasm sandboxer's workers.
const WORKER_COMMAND: &str = "run-module";

/// Command line of the runc sandboxer's sleeping containers.
const SLEEP_COMMAND: &str = "sleep 3600";

/// How long a throughput container may take to exit once started.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

const USAGE: &str =
    "usage: kuasar-bench [--iterations N] [--pods K] [--rounds R] [--warmup W] [--burst B]

  --iterations N  start latency samples per handler (default 10)
  --pods K        pods running at once for the memory measurement (default 5)
  --rounds R      memory and throughput measurements per handler (default 3)
  --warmup W      unmeasured pod starts per handler before the latency runs (default 1)
  --burst B       containers started at once in the throughput measurement (default 50)

Runs as root against a private containerd; the sandboxer binaries are taken from
KUASAR_RUNC_SANDBOXER and KUASAR_WASM_SANDBOXER (else target/debug).";

#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    iterations: usize,
    pods: usize,
    rounds: usize,
    warmup: usize,
    burst: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            iterations: 10,
            pods: 5,
            rounds: 3,
            warmup: 1,
            burst: 50,
        }
    }
}

impl Options {
    /// Parses the command line (without the program name); `None` asks for the usage text.
    fn parse(args: &[String]) -> Result<Option<Self>> {
        let mut options = Self::default();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) => (flag, Some(value.to_string())),
                None => (arg.as_str(), None),
            };
            let slot = match flag {
                "-h" | "--help" => return Ok(None),
                "--iterations" => &mut options.iterations,
                "--pods" => &mut options.pods,
                "--rounds" => &mut options.rounds,
                "--warmup" => &mut options.warmup,
                "--burst" => &mut options.burst,
                other => bail!("unknown argument {other:?}"),
            };
            let value = match inline {
                Some(value) => value,
                None => args
                    .next()
                    .with_context(|| format!("{flag} needs a number"))?
                    .clone(),
            };
            *slot = value
                .parse()
                .with_context(|| format!("{flag}: {value:?} is not a number"))?;
        }
        for (flag, value) in [
            ("--iterations", options.iterations),
            ("--pods", options.pods),
            ("--rounds", options.rounds),
            ("--burst", options.burst),
        ] {
            ensure!(value > 0, "{flag} must be at least 1");
        }
        Ok(Some(options))
    }
}

/// The two handlers compared, in the order of even iterations and rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handler {
    RuncV2,
    Kuasar,
}

impl Handler {
    /// Both handlers, the first of them alternating with `index`.
    fn order(index: usize) -> [Self; 2] {
        if index % 2 == 1 {
            [Self::Kuasar, Self::RuncV2]
        } else {
            [Self::RuncV2, Self::Kuasar]
        }
    }

    fn cri_name(self) -> &'static str {
        match self {
            Self::RuncV2 => RUNC_HANDLER,
            Self::Kuasar => KUASAR_RUNC_HANDLER,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::RuncV2 => "runc.v2",
            Self::Kuasar => "kuasar-runc",
        }
    }

    /// Short tag for pod names, which must be valid hostnames.
    fn tag(self) -> &'static str {
        match self {
            Self::RuncV2 => "runc",
            Self::Kuasar => "kuasar",
        }
    }
}

/// Resident and proportional set sizes, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Memory {
    rss: f64,
    pss: f64,
}

impl Memory {
    fn of(pid: u32) -> Result<Self> {
        let status = fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("cannot read /proc/{pid}/status"))?;
        let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .with_context(|| format!("cannot read /proc/{pid}/smaps_rollup"))?;
        Ok(Self {
            rss: kib_field(&status, "VmRSS:")
                .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?,
            pss: kib_field(&rollup, "Pss:")
                .with_context(|| format!("no Pss in /proc/{pid}/smaps_rollup"))?,
        })
    }

    fn sum(pids: &[u32]) -> Result<Self> {
        pids.iter().try_fold(
            Self::default(),
            |total, &pid| Ok(total.plus(Self::of(pid)?)),
        )
    }

    fn plus(self, other: Self) -> Self {
        Self {
            rss: self.rss + other.rss,
            pss: self.pss + other.pss,
        }
    }

    fn minus(self, other: Self) -> Self {
        Self {
            rss: self.rss - other.rss,
            pss: self.pss - other.pss,
        }
    }

    fn per(self, count: usize) -> Self {
        Self {
            rss: self.rss / count as f64,
            pss: self.pss / count as f64,
        }
    }
}

/// The value in kB of the `/proc` line starting with `key`, e.g. `VmRSS:   1234 kB`.
fn kib_field(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
}

/// One memory measurement of one handler, per pod.
#[derive(Debug, Clone, Copy)]
struct MemorySample {
    /// Everything that manages the pods, divided by the number of pods.
    total: Memory,
    /// runc.v2: the shims; kuasar-runc: the holders.
    processes: Memory,
    /// runc.v2: the pause processes; kuasar-runc: the sandboxer's growth.
    other: Memory,
    /// The sandboxer with no pods, before the pods were started (not per pod).
    sandboxer_idle: Memory,
}

#[derive(Debug, Default)]
struct Samples {
    runc: Vec<f64>,
    kuasar: Vec<f64>,
}

impl Samples {
    fn get(&self, handler: Handler) -> &[f64] {
        match handler {
            Handler::RuncV2 => &self.runc,
            Handler::Kuasar => &self.kuasar,
        }
    }

    fn of(&mut self, handler: Handler) -> &mut Vec<f64> {
        match handler {
            Handler::RuncV2 => &mut self.runc,
            Handler::Kuasar => &mut self.kuasar,
        }
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

fn verdict(ratio: f64, target: f64) -> &'static str {
    if ratio <= target {
        "PASS"
    } else {
        "MISS"
    }
}

/// Milliseconds of one pod start, from RunPodSandbox until StartContainer returned, and of
/// its three CRI calls.
#[derive(Debug, Clone, Copy)]
struct StartTimes {
    total: f64,
    run_pod: f64,
    create: f64,
    start: f64,
}

/// Runs a pod with one sleeping container on `handler` and removes it again (not timed).
async fn start_once(h: &Harness, handler: Handler, name: &str) -> Result<StartTimes> {
    let container = h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
    start_pod_with(h, handler.cri_name(), name, &container).await
}

/// Runs pod `name` on CRI handler `runtime` with `container` and removes it again (not timed).
async fn start_pod_with(
    h: &Harness,
    runtime: &str,
    name: &str,
    container: &ContainerConfig,
) -> Result<StartTimes> {
    let config = h.pod_config(name)?;
    let began = Instant::now();
    let id = h.cri().run_pod(&config, runtime).await?;
    let pod_ready = Instant::now();
    let pod = Pod { id, config };
    let started = async {
        let id = h
            .cri()
            .create_container(&pod.id, container, &pod.config)
            .await?;
        let created = Instant::now();
        h.cri().start_container(&id).await?;
        Ok::<_, anyhow::Error>((created, Instant::now()))
    }
    .await;
    let removed = remove_pod(h, &pod).await;
    let (created, done) = started?;
    removed?;
    Ok(StartTimes {
        total: ms(done - began),
        run_pod: ms(pod_ready - began),
        create: ms(created - pod_ready),
        start: ms(done - created),
    })
}

async fn remove_pod(h: &Harness, pod: &Pod) -> Result<()> {
    h.cri().stop_pod(&pod.id).await?;
    h.cri().remove_pod(&pod.id).await
}

#[derive(Debug, Default)]
struct LatencyResults {
    total: Samples,
    run_pod: Samples,
    create: Samples,
    start: Samples,
}

async fn measure_latency(h: &Harness, options: &Options) -> Result<LatencyResults> {
    for round in 0..options.warmup {
        for handler in Handler::order(round) {
            let name = format!("warm-{}-{round}", handler.tag());
            let times = start_once(h, handler, &name).await?;
            eprintln!(
                "warm-up {}/{}: {:<12} {:7.1} ms",
                round + 1,
                options.warmup,
                handler.label(),
                times.total
            );
        }
    }
    let mut results = LatencyResults::default();
    for iteration in 0..options.iterations {
        for handler in Handler::order(iteration) {
            let name = format!("lat-{}-{iteration}", handler.tag());
            let times = start_once(h, handler, &name).await?;
            eprintln!(
                "latency {}/{}: {:<12} {:7.1} ms (RunPodSandbox {:.1}, CreateContainer {:.1}, \
                 StartContainer {:.1})",
                iteration + 1,
                options.iterations,
                handler.label(),
                times.total,
                times.run_pod,
                times.create,
                times.start
            );
            results.total.of(handler).push(times.total);
            results.run_pod.of(handler).push(times.run_pod);
            results.create.of(handler).push(times.create);
            results.start.of(handler).push(times.start);
        }
    }
    Ok(results)
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
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

/// containerd's runc shims serving this run's containerd: `containerd-shim-runc-v2 ...
/// -address <the run's containerd socket>`.
fn shims(layout: &Layout) -> Vec<u32> {
    let address = layout.containerd_socket.to_string_lossy().into_owned();
    all_pids()
        .into_iter()
        .filter(|&pid| {
            let args = arguments(pid);
            let is_shim = args
                .first()
                .is_some_and(|a| Path::new(a).file_name() == Some(SHIM_BINARY.as_ref()));
            is_shim
                && args
                    .windows(2)
                    .any(|w| w[0] == "-address" && w[1] == address)
        })
        .collect()
}

/// The pause processes in the run's pod cgroups.
fn pauses(layout: &Layout) -> Vec<u32> {
    cleanup::cgroup_processes(layout)
        .into_iter()
        .filter(|(_, cmdline)| cmdline == PAUSE_COMMAND)
        .map(|(pid, _)| pid)
        .collect()
}

/// The namespace holders of this run started by the sandboxer `sandboxer`: `<its binary>
/// hold-namespaces --netns <a network namespace in the run directory> ...`.
fn holders(layout: &Layout, sandboxer: u32) -> Vec<u32> {
    helpers(layout, sandboxer, HOLDER_COMMAND)
}

/// Processes of this run that run the binary of process `sandboxer` with the hidden command
/// `command` as first argument.
fn helpers(layout: &Layout, sandboxer: u32, command: &str) -> Vec<u32> {
    let binary = executable(sandboxer);
    cleanup::run_processes(layout, &[])
        .into_iter()
        .map(|(pid, _)| pid)
        .filter(|&pid| {
            arguments(pid).get(1).map(String::as_str) == Some(command)
                && binary.is_some()
                && executable(pid) == binary
        })
        .collect()
}

/// The binary process `pid` runs, or none when it is gone.
fn executable(pid: u32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/exe")).ok()
}

fn expect_count(what: &str, pids: &[u32], count: usize) -> Result<()> {
    ensure!(
        pids.len() == count,
        "found {} {what} instead of {count}: {pids:?}",
        pids.len()
    );
    Ok(())
}

/// Runs `count` pods of one sleeping container each on `handler`, measures the processes that
/// manage them and removes the pods again.
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
    let layout = h.layout();
    let sandboxer = h.sandboxer_pid().context("the harness runs no sandboxer")?;
    let idle = Memory::of(sandboxer)?;

    let mut pods = Vec::new();
    let result: Result<MemorySample> = async {
        for index in 0..count {
            let name = format!("mem-{}-{round}-{index}", handler.tag());
            let pod = h.run_pod(&name, handler.cri_name()).await?;
            pods.push(pod);
            let pod = pods.last().expect("a pod was just pushed");
            let container = h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
            h.start_container(pod, &container).await?;
        }
        tokio::time::sleep(SETTLE).await;
        match handler {
            Handler::RuncV2 => {
                let shims = shims(layout);
                let pauses = pauses(layout);
                expect_count("runc shims", &shims, count)?;
                expect_count("pause processes", &pauses, count)?;
                let shims = Memory::sum(&shims)?;
                let pauses = Memory::sum(&pauses)?;
                Ok(MemorySample {
                    total: shims.plus(pauses).per(count),
                    processes: shims.per(count),
                    other: pauses.per(count),
                    sandboxer_idle: idle,
                })
            }
            Handler::Kuasar => {
                let holders = holders(layout, sandboxer);
                expect_count("namespace holders", &holders, count)?;
                let holders = Memory::sum(&holders)?;
                let growth = Memory::of(sandboxer)?.minus(idle);
                Ok(MemorySample {
                    total: holders.plus(growth).per(count),
                    processes: holders.per(count),
                    other: growth.per(count),
                    sandboxer_idle: idle,
                })
            }
        }
    }
    .await;

    let mut removal = Ok(());
    for pod in &pods {
        if let Err(e) = remove_pod(h, pod).await {
            removal = removal.and(Err(e));
        }
    }
    let sample = result?;
    removal?;
    Ok(sample)
}

#[derive(Debug, Default)]
struct MemoryResults {
    rss: Samples,
    pss: Samples,
    processes: Vec<(Handler, Memory)>,
    other: Vec<(Handler, Memory)>,
    sandboxer_idle: Vec<Memory>,
}

async fn measure_memory(h: &Harness, options: &Options) -> Result<MemoryResults> {
    let mut results = MemoryResults::default();
    for round in 0..options.rounds {
        for handler in Handler::order(round) {
            let sample = measure_memory_once(h, handler, options.pods, round).await?;
            let (what, other) = match handler {
                Handler::RuncV2 => ("shim", "pause"),
                Handler::Kuasar => ("holder", "sandboxer growth"),
            };
            eprintln!(
                "memory {}/{}: {:<12} per pod RSS {:8.0} PSS {:8.0} KiB \
                 ({what} RSS {:.0} PSS {:.0}, {other} RSS {:.0} PSS {:.0})",
                round + 1,
                options.rounds,
                handler.label(),
                sample.total.rss,
                sample.total.pss,
                sample.processes.rss,
                sample.processes.pss,
                sample.other.rss,
                sample.other.pss,
            );
            results.rss.of(handler).push(sample.total.rss);
            results.pss.of(handler).push(sample.total.pss);
            results.processes.push((handler, sample.processes));
            results.other.push((handler, sample.other));
            if handler == Handler::Kuasar {
                results.sandboxer_idle.push(sample.sandboxer_idle);
            }
        }
    }
    Ok(results)
}

fn print_latency(results: &LatencyResults, options: &Options) {
    println!(
        "start latency (RunPodSandbox -> container started), {} iterations alternating",
        options.iterations
    );
    for handler in [Handler::RuncV2, Handler::Kuasar] {
        let values = results.total.get(handler);
        let (min, max) = min_max(values);
        println!(
            "  {:<13}  median {:7.1} ms  (min {:.1}, max {:.1}; medians of RunPodSandbox {:.1}, \
             CreateContainer {:.1}, StartContainer {:.1})",
            handler.label(),
            median(values),
            min,
            max,
            median(results.run_pod.get(handler)),
            median(results.create.get(handler)),
            median(results.start.get(handler)),
        );
    }
    let ratio = median(&results.total.kuasar) / median(&results.total.runc);
    println!(
        "  {:<13}  {ratio:.3}  (target <= {LATENCY_TARGET:.2})  {}",
        "ratio",
        verdict(ratio, LATENCY_TARGET)
    );
}

fn print_memory(results: &MemoryResults, options: &Options) {
    println!(
        "per-pod management memory, {} pods, {} rounds (medians)",
        options.pods, options.rounds
    );
    let part = |list: &[(Handler, Memory)], handler: Handler| {
        let of = |f: fn(&Memory) -> f64| {
            let values: Vec<f64> = list
                .iter()
                .filter(|(h, _)| *h == handler)
                .map(|(_, m)| f(m))
                .collect();
            median(&values)
        };
        (of(|m| m.rss), of(|m| m.pss))
    };
    for handler in [Handler::RuncV2, Handler::Kuasar] {
        let (rss, pss) = (results.rss.get(handler), results.pss.get(handler));
        let (what, other) = match handler {
            Handler::RuncV2 => ("shim", "pause"),
            Handler::Kuasar => ("holder", "sandboxer growth"),
        };
        let (p_rss, p_pss) = part(&results.processes, handler);
        let (o_rss, o_pss) = part(&results.other, handler);
        println!(
            "  {:<13}  RSS {:7.0} KiB/pod  PSS {:7.0} KiB/pod  \
             ({what} {p_rss:.0}/{p_pss:.0} + {other} {o_rss:.0}/{o_pss:.0} RSS/PSS)",
            handler.label(),
            median(rss),
            median(pss),
        );
    }
    let idle =
        |f: fn(&Memory) -> f64| median(&results.sandboxer_idle.iter().map(f).collect::<Vec<_>>());
    println!(
        "  (not counted: the sandboxer's fixed footprint with no pods, RSS {:.0} KiB, PSS {:.0} KiB)",
        idle(|m| m.rss),
        idle(|m| m.pss)
    );
    println!(
        "  (holders run the sandboxer's binary and share its pages, so the sandboxer's own PSS \
         may shrink as pods start)"
    );
    let rss_ratio = median(&results.rss.kuasar) / median(&results.rss.runc);
    let pss_ratio = median(&results.pss.kuasar) / median(&results.pss.runc);
    println!("  {:<13}  {rss_ratio:.3}", "ratio (RSS)");
    println!(
        "  {:<13}  {pss_ratio:.3}  (target <= {MEMORY_TARGET:.2})  {}",
        "ratio (PSS)",
        verdict(pss_ratio, MEMORY_TARGET)
    );
}

/// The starts compared in the wasm latency section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WasmStart {
    /// `/hello.wasm` with the compiled-module cache emptied before the sample.
    Cold,
    /// `/hello.wasm` with its compiled form in the cache.
    Warm,
    /// busybox `echo hello` on the runc sandboxer.
    Runc,
}

impl WasmStart {
    const ALL: [Self; 3] = [Self::Cold, Self::Warm, Self::Runc];

    /// All three, rotated by `index` so that each takes every position in turn.
    fn order(index: usize) -> [Self; 3] {
        let mut all = Self::ALL;
        all.rotate_left(index % Self::ALL.len());
        all
    }

    fn index(self) -> usize {
        self as usize
    }

    fn label(self) -> &'static str {
        match self {
            Self::Cold => "wasm cold",
            Self::Warm => "wasm warm",
            Self::Runc => "kuasar-runc",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Self::Cold => "wcold",
            Self::Warm => "wwarm",
            Self::Runc => "krunc",
        }
    }

    fn family(self) -> Family {
        match self {
            Self::Cold | Self::Warm => Family::Wasm,
            Self::Runc => Family::Runc,
        }
    }
}

/// The two sandboxer families of the wasm sections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Wasm,
    Runc,
}

impl Family {
    /// Both families, the first of them alternating with `index`.
    fn order(index: usize) -> [Self; 2] {
        if index % 2 == 1 {
            [Self::Runc, Self::Wasm]
        } else {
            [Self::Wasm, Self::Runc]
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn cri_name(self) -> &'static str {
        match self {
            Self::Wasm => KUASAR_WASM_HANDLER,
            Self::Runc => KUASAR_RUNC_HANDLER,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Wasm => "kuasar-wasm",
            Self::Runc => "kuasar-runc",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Self::Wasm => "wasm",
            Self::Runc => "krunc",
        }
    }

    fn sandboxer_pid(self, h: &Harness) -> Result<u32> {
        match self {
            Self::Wasm => h.wasm_sandboxer_pid(),
            Self::Runc => h.sandboxer_pid(),
        }
        .with_context(|| format!("the harness runs no {} sandboxer", self.label()))
    }

    /// A container printing a greeting and exiting.
    fn hello(self, h: &Harness) -> ContainerConfig {
        match self {
            Self::Wasm => h.container_config("hello", WASM_IMAGE, &["/hello.wasm"]),
            Self::Runc => h.container_config("hello", BUSYBOX_IMAGE, &["echo", "hello"]),
        }
    }

    /// A container that sleeps until it is stopped.
    fn sleeper(self, h: &Harness) -> ContainerConfig {
        match self {
            Self::Wasm => h.container_config("sleeper", WASM_IMAGE, &["/sleeper.wasm"]),
            Self::Runc => h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]),
        }
    }

    /// Container `name` that exits with code 0 right away.
    fn quick(self, h: &Harness, name: &str) -> ContainerConfig {
        match self {
            Self::Wasm => h.container_config(name, WASM_IMAGE, &["/exit.wasm", "0"]),
            Self::Runc => h.container_config(name, BUSYBOX_IMAGE, &["true"]),
        }
    }

    /// The processes of this run that run the family's containers: the wasm sandboxer's
    /// workers, or the runc sandboxer's sleeping container processes.
    fn container_processes(self, h: &Harness) -> Result<Vec<u32>> {
        let layout = h.layout();
        Ok(match self {
            Self::Wasm => helpers(layout, self.sandboxer_pid(h)?, WORKER_COMMAND),
            Self::Runc => cleanup::cgroup_processes(layout)
                .into_iter()
                .filter(|(_, cmdline)| cmdline == SLEEP_COMMAND)
                .map(|(pid, _)| pid)
                .collect(),
        })
    }
}

/// Compiled modules in the wasm sandboxer's cache of this run.
fn compiled_modules(layout: &Layout) -> Vec<PathBuf> {
    cleanup::list_dir(&layout.wasm_state.join("modules"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm") && p.is_file())
        .collect()
}

/// Removes the compiled modules of this run's wasm sandboxer, so that the next container
/// compiles its module again.
fn clear_module_cache(layout: &Layout) -> Result<()> {
    cleanup::check_run_dir(layout)?;
    ensure!(
        layout.wasm_state.starts_with(&layout.run_dir),
        "refusing to touch {}: outside the run directory",
        layout.wasm_state.display()
    );
    for file in compiled_modules(layout) {
        fs::remove_file(&file).with_context(|| format!("cannot remove {}", file.display()))?;
    }
    Ok(())
}

/// One wasm latency sample of `kind`, with the module cache emptied first for a cold one.
async fn wasm_start_once(h: &Harness, kind: WasmStart, name: &str) -> Result<StartTimes> {
    let layout = h.layout();
    match kind {
        WasmStart::Cold => {
            clear_module_cache(layout)?;
            ensure!(
                compiled_modules(layout).is_empty(),
                "the module cache is not empty"
            );
        }
        WasmStart::Warm => ensure!(
            !compiled_modules(layout).is_empty(),
            "no compiled module in the cache before a warm start"
        ),
        WasmStart::Runc => {}
    }
    let family = kind.family();
    let times = start_pod_with(h, family.cri_name(), name, &family.hello(h)).await?;
    if family == Family::Wasm {
        ensure!(
            !compiled_modules(layout).is_empty(),
            "no compiled module in the cache after a wasm start"
        );
    }
    Ok(times)
}

/// Total and split start times per [`WasmStart`], in its index order.
#[derive(Debug, Default)]
struct WasmLatencyResults {
    total: [Vec<f64>; 3],
    run_pod: [Vec<f64>; 3],
    create: [Vec<f64>; 3],
    start: [Vec<f64>; 3],
}

async fn measure_wasm_latency(h: &Harness, options: &Options) -> Result<WasmLatencyResults> {
    for round in 0..options.warmup {
        for kind in [WasmStart::Warm, WasmStart::Runc] {
            let name = format!("warm-{}-{round}", kind.tag());
            let times =
                start_pod_with(h, kind.family().cri_name(), &name, &kind.family().hello(h)).await?;
            eprintln!(
                "wasm warm-up {}/{}: {:<12} {:7.1} ms",
                round + 1,
                options.warmup,
                kind.family().label(),
                times.total
            );
        }
    }
    let mut results = WasmLatencyResults::default();
    for iteration in 0..options.iterations {
        for kind in WasmStart::order(iteration) {
            let name = format!("lat-{}-{iteration}", kind.tag());
            let times = wasm_start_once(h, kind, &name).await?;
            eprintln!(
                "wasm latency {}/{}: {:<12} {:7.1} ms (RunPodSandbox {:.1}, CreateContainer {:.1}, \
                 StartContainer {:.1})",
                iteration + 1,
                options.iterations,
                kind.label(),
                times.total,
                times.run_pod,
                times.create,
                times.start
            );
            let i = kind.index();
            results.total[i].push(times.total);
            results.run_pod[i].push(times.run_pod);
            results.create[i].push(times.create);
            results.start[i].push(times.start);
        }
    }
    Ok(results)
}

fn print_wasm_latency(results: &WasmLatencyResults, options: &Options) {
    println!(
        "wasm start latency (RunPodSandbox -> container started), {} iterations rotating; \
         wasm /hello.wasm, kuasar-runc busybox echo hello",
        options.iterations
    );
    for kind in WasmStart::ALL {
        let i = kind.index();
        let (min, max) = min_max(&results.total[i]);
        println!(
            "  {:<13}  median {:7.1} ms  (min {:.1}, max {:.1}; medians of RunPodSandbox {:.1}, \
             CreateContainer {:.1}, StartContainer {:.1})",
            kind.label(),
            median(&results.total[i]),
            min,
            max,
            median(&results.run_pod[i]),
            median(&results.create[i]),
            median(&results.start[i]),
        );
    }
    let of = |kind: WasmStart| median(&results.total[kind.index()]);
    let cold_ratio = of(WasmStart::Cold) / of(WasmStart::Runc);
    let ratio = of(WasmStart::Warm) / of(WasmStart::Runc);
    println!("  {:<13}  {cold_ratio:.3}", "ratio cold");
    println!(
        "  {:<13}  {ratio:.3}  (warm wasm / kuasar-runc, target <= {WASM_LATENCY_TARGET:.2})  {}",
        "ratio warm",
        verdict(ratio, WASM_LATENCY_TARGET)
    );
}

/// One per-pod memory measurement of one family.
#[derive(Debug, Clone, Copy)]
struct FamilyMemory {
    /// Everything per pod: holder, container process and the sandboxer's growth.
    total: Memory,
    holder: Memory,
    /// The wasm worker or the runc container process.
    container: Memory,
    /// The sandboxer's growth per pod.
    growth: Memory,
}

/// Runs `count` pods of one sleeping container each on `family`, measures the processes that
/// exist per pod and the sandboxer's growth, and removes the pods again.
async fn measure_family_memory_once(
    h: &Harness,
    family: Family,
    count: usize,
    round: usize,
) -> Result<FamilyMemory> {
    ensure!(
        h.cri().list_pods().await?.is_empty(),
        "pods left over before a memory round"
    );
    let layout = h.layout();
    let sandboxer = family.sandboxer_pid(h)?;
    let idle = Memory::of(sandboxer)?;

    let mut pods = Vec::new();
    let result: Result<FamilyMemory> = async {
        for index in 0..count {
            let name = format!("mem-{}-{round}-{index}", family.tag());
            let pod = h.run_pod(&name, family.cri_name()).await?;
            pods.push(pod);
            let pod = pods.last().expect("a pod was just pushed");
            h.start_container(pod, &family.sleeper(h)).await?;
        }
        tokio::time::sleep(SETTLE).await;
        let holders = holders(layout, sandboxer);
        let containers = family.container_processes(h)?;
        expect_count("namespace holders", &holders, count)?;
        expect_count("container processes", &containers, count)?;
        let holder = Memory::sum(&holders)?;
        let container = Memory::sum(&containers)?;
        let growth = Memory::of(sandboxer)?.minus(idle);
        Ok(FamilyMemory {
            total: holder.plus(container).plus(growth).per(count),
            holder: holder.per(count),
            container: container.per(count),
            growth: growth.per(count),
        })
    }
    .await;

    let mut removal = Ok(());
    for pod in &pods {
        if let Err(e) = remove_pod(h, pod).await {
            removal = removal.and(Err(e));
        }
    }
    let sample = result?;
    removal?;
    Ok(sample)
}

async fn measure_family_memory(h: &Harness, options: &Options) -> Result<[Vec<FamilyMemory>; 2]> {
    let mut results: [Vec<FamilyMemory>; 2] = Default::default();
    for round in 0..options.rounds {
        for family in Family::order(round) {
            let sample = measure_family_memory_once(h, family, options.pods, round).await?;
            eprintln!(
                "wasm memory {}/{}: {:<12} per pod RSS {:6.0} PSS {:6.0} KiB (holder {:.0}/{:.0}, \
                 container {:.0}/{:.0}, sandboxer growth {:.0}/{:.0} RSS/PSS)",
                round + 1,
                options.rounds,
                family.label(),
                sample.total.rss,
                sample.total.pss,
                sample.holder.rss,
                sample.holder.pss,
                sample.container.rss,
                sample.container.pss,
                sample.growth.rss,
                sample.growth.pss,
            );
            results[family.index()].push(sample);
        }
    }
    Ok(results)
}

fn print_family_memory(results: &[Vec<FamilyMemory>; 2], options: &Options) {
    println!(
        "per-pod memory with one sleeping container, {} pods, {} rounds (medians; wasm \
         /sleeper.wasm, kuasar-runc busybox sleep 3600)",
        options.pods, options.rounds
    );
    for family in [Family::Wasm, Family::Runc] {
        let samples = &results[family.index()];
        let of = |part: fn(&FamilyMemory) -> Memory| {
            let rss: Vec<f64> = samples.iter().map(|s| part(s).rss).collect();
            let pss: Vec<f64> = samples.iter().map(|s| part(s).pss).collect();
            (median(&rss), median(&pss))
        };
        let (rss, pss) = of(|s| s.total);
        let (h_rss, h_pss) = of(|s| s.holder);
        let (c_rss, c_pss) = of(|s| s.container);
        let (g_rss, g_pss) = of(|s| s.growth);
        let container = match family {
            Family::Wasm => "worker",
            Family::Runc => "container",
        };
        println!(
            "  {:<13}  RSS {rss:7.0} KiB/pod  PSS {pss:7.0} KiB/pod  (holder {h_rss:.0}/{h_pss:.0} \
             + {container} {c_rss:.0}/{c_pss:.0} + sandboxer growth {g_rss:.0}/{g_pss:.0} \
             RSS/PSS)",
            family.label(),
        );
    }
    println!(
        "  (holders and workers run their sandboxer's binary and share its pages, so the \
         sandboxer's own PSS may shrink as pods start)"
    );
    let pss = |family: Family| {
        median(
            &results[family.index()]
                .iter()
                .map(|s| s.total.pss)
                .collect::<Vec<_>>(),
        )
    };
    println!(
        "  {:<13}  {:.3}",
        "ratio (PSS)",
        pss(Family::Wasm) / pss(Family::Runc)
    );
}

/// Creates and starts `count` containers of `family` in `pod` at once; returns the seconds
/// from the first CreateContainer to the last StartContainer returning. The containers are
/// checked to exit with code 0 and removed afterwards (not timed).
async fn burst_once(
    h: &Harness,
    family: Family,
    pod: &Pod,
    count: usize,
    round: usize,
) -> Result<f64> {
    let mut tasks = tokio::task::JoinSet::new();
    let began = Instant::now();
    for index in 0..count {
        let cri = h.cri().clone();
        let pod = pod.clone();
        let config = family.quick(h, &format!("burst-{round}-{index}"));
        tasks.spawn(async move {
            let id = cri.create_container(&pod.id, &config, &pod.config).await?;
            let started = cri.start_container(&id).await;
            Ok::<_, anyhow::Error>((id, started))
        });
    }
    let mut ids = Vec::new();
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        match joined.context("a container start task failed") {
            Ok(Ok((id, started))) => {
                ids.push(id);
                if let Err(e) = started {
                    failure.get_or_insert(e);
                }
            }
            Ok(Err(e)) | Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    let elapsed = began.elapsed();

    let mut checked = Ok(());
    for id in &ids {
        let exited = h.cri().wait_container_exited(id, EXIT_TIMEOUT).await;
        if let Err(e) = exited.and_then(|status| {
            ensure!(
                status.exit_code == 0,
                "container {id} exited with {}",
                status.exit_code
            );
            Ok(())
        }) {
            checked = checked.and(Err(e));
        }
    }
    let mut removal = Ok(());
    for id in &ids {
        if let Err(e) = h.cri().remove_container(id).await {
            removal = removal.and(Err(e));
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    checked?;
    removal?;
    ensure!(
        h.cri().list_containers(Some(&pod.id)).await?.is_empty(),
        "containers left in pod {} after a burst",
        pod.id
    );
    Ok(elapsed.as_secs_f64())
}

/// Containers started per second in each round, per family in [`Family::index`] order.
async fn measure_throughput(h: &Harness, options: &Options) -> Result<[Vec<f64>; 2]> {
    let mut pods = Vec::new();
    let result: Result<[Vec<f64>; 2]> = async {
        for family in [Family::Wasm, Family::Runc] {
            let pod = h
                .run_pod(&format!("burst-{}", family.tag()), family.cri_name())
                .await?;
            pods.push(pod);
            let pod = pods.last().expect("a pod was just pushed");
            // One unmeasured container, so that the module is compiled before the bursts.
            let id = h.start_container(pod, &family.quick(h, "prime")).await?;
            h.cri().wait_container_exited(&id, EXIT_TIMEOUT).await?;
            h.cri().remove_container(&id).await?;
        }
        let mut rates: [Vec<f64>; 2] = Default::default();
        for round in 0..options.rounds {
            for family in Family::order(round) {
                let pod = &pods[family.index()];
                let secs = burst_once(h, family, pod, options.burst, round).await?;
                let rate = options.burst as f64 / secs;
                eprintln!(
                    "throughput {}/{}: {:<12} {} containers in {:.1} ms, {rate:.1}/s",
                    round + 1,
                    options.rounds,
                    family.label(),
                    options.burst,
                    secs * 1000.0
                );
                rates[family.index()].push(rate);
            }
        }
        Ok(rates)
    }
    .await;
    let mut removal = Ok(());
    for pod in &pods {
        if let Err(e) = remove_pod(h, pod).await {
            removal = removal.and(Err(e));
        }
    }
    let rates = result?;
    removal?;
    Ok(rates)
}

fn print_throughput(rates: &[Vec<f64>; 2], options: &Options) {
    println!(
        "container start throughput, {} containers created and started at once in one running \
         pod, {} rounds (medians; wasm /exit.wasm 0, kuasar-runc busybox true)",
        options.burst, options.rounds
    );
    for family in [Family::Wasm, Family::Runc] {
        let values = &rates[family.index()];
        let (min, max) = min_max(values);
        println!(
            "  {:<13}  {:7.1} containers/s  (min {min:.1}, max {max:.1}; {:.1} ms per burst)",
            family.label(),
            median(values),
            options.burst as f64 / median(values) * 1000.0,
        );
    }
    let wasm = median(&rates[Family::Wasm.index()]);
    let runc = median(&rates[Family::Runc.index()]);
    let verdict = if wasm > WASM_THROUGHPUT_TARGET {
        "PASS"
    } else {
        "MISS"
    };
    println!(
        "  {:<13}  {wasm:.1}/s  (target > {WASM_THROUGHPUT_TARGET:.0}/s)  {verdict}",
        "kuasar-wasm"
    );
    println!("  {:<13}  {:.3}", "ratio", wasm / runc);
}

/// Checks that no pod, container or pod state of the run is left between sections.
async fn expect_clean(h: &Harness, after: &str) -> Result<()> {
    ensure!(
        h.cri().list_pods().await?.is_empty(),
        "pods left after {after}"
    );
    ensure!(
        h.cri().list_containers(None).await?.is_empty(),
        "containers left after {after}"
    );
    let left = h.leftovers()?;
    ensure!(left.is_empty(), "after {after}:\n{left}");
    Ok(())
}

async fn bench(options: Options) -> Result<()> {
    let harness = Harness::start_with(HarnessOptions {
        sandboxer: true,
        wasm_sandboxer: true,
        ..Default::default()
    })
    .await?;
    eprintln!(
        "benchmark run in {} (sandboxer pid {:?}, wasm sandboxer pid {:?}, containerd pid {:?})",
        harness.layout().run_dir.display(),
        harness.sandboxer_pid(),
        harness.wasm_sandboxer_pid(),
        harness.containerd_pid()
    );
    harness
        .run(async |h: &Harness| {
            let work = async {
                let latency = measure_latency(h, &options).await?;
                print_latency(&latency, &options);
                let memory = measure_memory(h, &options).await?;
                print_memory(&memory, &options);
                expect_clean(h, "the runc sections").await?;
                let wasm_latency = measure_wasm_latency(h, &options).await?;
                print_wasm_latency(&wasm_latency, &options);
                let wasm_memory = measure_family_memory(h, &options).await?;
                print_family_memory(&wasm_memory, &options);
                let throughput = measure_throughput(h, &options).await?;
                print_throughput(&throughput, &options);
                expect_clean(h, "the wasm sections").await
            };
            // An interrupted run still tears the harness down.
            tokio::select! {
                result = work => result,
                _ = tokio::signal::ctrl_c() => bail!("interrupted"),
            }
        })
        .await
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match Options::parse(&args) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("kuasar-bench: {e:#}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("kuasar-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kuasar-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_flags() {
        assert_eq!(Options::parse(&[]).unwrap(), Some(Options::default()));
        let parsed = Options::parse(&args(&["--iterations", "4", "--pods=2", "--rounds", "1"]))
            .unwrap()
            .unwrap();
        assert_eq!(
            parsed,
            Options {
                iterations: 4,
                pods: 2,
                rounds: 1,
                warmup: 1,
                burst: 50
            }
        );
        assert_eq!(Options::parse(&args(&["--help"])).unwrap(), None);
        assert!(Options::parse(&args(&["--pods", "0"])).is_err());
        assert!(Options::parse(&args(&["--pods"])).is_err());
        assert!(Options::parse(&args(&["--bogus"])).is_err());
    }

    #[test]
    fn medians_and_extremes() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(min_max(&[2.0, 5.0, 1.0]), (1.0, 5.0));
    }

    #[test]
    fn reads_kib_fields() {
        let status = "Name:\tx\nVmRSS:\t    1234 kB\nVmSwap:\t0 kB\n";
        assert_eq!(kib_field(status, "VmRSS:"), Some(1234.0));
        let rollup = "00400000-7fff [rollup]\nRss:  800 kB\nPss:  300 kB\nPss_Anon: 10 kB\n";
        assert_eq!(kib_field(rollup, "Pss:"), Some(300.0));
        assert_eq!(kib_field(status, "Pss:"), None);
    }

    #[test]
    fn wasm_starts_rotate() {
        use WasmStart::*;
        assert_eq!(WasmStart::order(0), [Cold, Warm, Runc]);
        assert_eq!(WasmStart::order(1), [Warm, Runc, Cold]);
        assert_eq!(WasmStart::order(2), [Runc, Cold, Warm]);
        assert_eq!(WasmStart::order(3), WasmStart::order(0));
        assert_eq!(Family::order(1), [Family::Runc, Family::Wasm]);
        let parsed = Options::parse(&args(&["--burst", "7"])).unwrap().unwrap();
        assert_eq!(parsed.burst, 7);
        assert!(Options::parse(&args(&["--burst", "0"])).is_err());
    }

    #[test]
    fn handlers_alternate() {
        assert_eq!(Handler::order(0), [Handler::RuncV2, Handler::Kuasar]);
        assert_eq!(Handler::order(1), [Handler::Kuasar, Handler::RuncV2]);
    }
}
