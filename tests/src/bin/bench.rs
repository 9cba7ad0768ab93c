//! `kuasar-bench`: the runc sandboxer against containerd's own runc shim on one containerd,
//! alternating between the two CRI handlers. Measures the start latency (RunPodSandbox until
//! a started container) and the memory of the processes that exist only to manage pods.
//! Needs root, like the end-to-end tests; prints a table and never fails on a missed target.

use std::fs;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kuasar_tests::images::BUSYBOX_IMAGE;
use kuasar_tests::{cleanup, Harness, Layout, Pod, KUASAR_RUNC_HANDLER, RUNC_HANDLER};

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

const USAGE: &str = "usage: kuasar-bench [--iterations N] [--pods K] [--rounds R] [--warmup W]

  --iterations N  start latency samples per handler (default 10)
  --pods K        pods running at once for the memory measurement (default 5)
  --rounds R      memory measurements per handler (default 3)
  --warmup W      unmeasured pod starts per handler before the latency runs (default 1)

Runs as root against a private containerd; the sandboxer binary is taken from
KUASAR_RUNC_SANDBOXER (else target/debug/runc-sandboxer).";

#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    iterations: usize,
    pods: usize,
    rounds: usize,
    warmup: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            iterations: 10,
            pods: 5,
            rounds: 3,
            warmup: 1,
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
    let config = h.pod_config(name)?;
    let container = h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
    let began = Instant::now();
    let id = h.cri().run_pod(&config, handler.cri_name()).await?;
    let pod_ready = Instant::now();
    let pod = Pod { id, config };
    let started = async {
        let id = h
            .cri()
            .create_container(&pod.id, &container, &pod.config)
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

/// The sandboxer's namespace holders of this run: `<sandboxer> hold-namespaces --netns
/// <a network namespace in the run directory> ...`.
fn holders(layout: &Layout) -> Vec<u32> {
    cleanup::run_processes(layout, &[])
        .into_iter()
        .map(|(pid, _)| pid)
        .filter(|&pid| arguments(pid).get(1).map(String::as_str) == Some(HOLDER_COMMAND))
        .collect()
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
                let holders = holders(layout);
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

async fn bench(options: Options) -> Result<()> {
    let harness = Harness::start_with_sandboxer().await?;
    eprintln!(
        "benchmark run in {} (sandboxer pid {:?}, containerd pid {:?})",
        harness.layout().run_dir.display(),
        harness.sandboxer_pid(),
        harness.containerd_pid()
    );
    harness
        .run(async |h: &Harness| {
            let work = async {
                let latency = measure_latency(h, &options).await?;
                print_latency(&latency, &options);
                let memory = measure_memory(h, &options).await?;
                print_memory(&memory, &options);
                Ok(())
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
                warmup: 1
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
    fn handlers_alternate() {
        assert_eq!(Handler::order(0), [Handler::RuncV2, Handler::Kuasar]);
        assert_eq!(Handler::order(1), [Handler::Kuasar, Handler::RuncV2]);
    }
}
