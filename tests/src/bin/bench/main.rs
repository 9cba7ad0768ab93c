//! `kuasar-bench`: each sandbox family against its baseline on one containerd, alternating
//! between the CRI handlers compared:
//!
//! - the runc sandboxer against containerd's own runc shim: start latency (RunPodSandbox
//!   until a started container) and the memory of the processes that exist only to manage
//!   pods;
//! - the wasm sandboxer against the runc sandboxer: start latency with a cold and a warm
//!   module cache, per-pod memory and container start throughput;
//! - the quark sandboxer against containerd's runc shim driving runsc: start latency and
//!   per-pod memory;
//! - the vmm sandboxer: where a microVM pod's start time goes, container start in a running
//!   VM next to the runc sandboxer, and host memory per VM pod;
//! - the runc family through its shim binary (containerd 2.x, `sandboxer = "shim"`) next to
//!   its native path: start latency and per-pod memory, the shim's own RSS included.
//!
//! Needs root, like the end-to-end tests; prints a table and never fails on a missed target.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

mod quark;
mod runc;
mod shim;
mod vmm;
mod wasm;

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1::ContainerConfig;
use kuasar_tests::{cleanup, Harness, HarnessOptions, Layout, Pod};

/// How long the pods of a memory round run before their processes are measured, so that
/// lazily started work (shim goroutines, first requests) is part of what is measured.
const SETTLE: Duration = Duration::from_secs(2);

/// Name of containerd's runc shim binary.
const SHIM_BINARY: &str = "containerd-shim-runc-v2";

/// First argument of the sandboxer's namespace holders.
const HOLDER_COMMAND: &str = "hold-namespaces";

const USAGE: &str = "usage: kuasar-bench [--iterations N] [--vm-iterations N] [--pods K] \
[--rounds R] [--warmup W] [--burst B] [--only SECTIONS]

  --iterations N    start latency samples per handler (default 10)
  --vm-iterations N start latency samples per handler in the vmm section (default 5)
  --pods K          pods running at once for the memory measurement (default 5; the vmm
                    section runs at most 3 VMs at once)
  --rounds R        memory and throughput measurements per handler (default 3)
  --warmup W        unmeasured pod starts per handler before the latency runs (default 1)
  --burst B         containers started at once in the throughput measurement (default 50)
  --only SECTIONS   comma-separated sections to run: runc, wasm, quark, vmm, shim (default
                    all)

Runs as root against a private containerd; the sandboxer binaries are taken from
KUASAR_RUNC_SANDBOXER, KUASAR_WASM_SANDBOXER, KUASAR_QUARK_SANDBOXER and
KUASAR_VMM_SANDBOXER (else target/debug), the shim from KUASAR_SHIM_RUNC, runsc from KUASAR_RUNSC (else the one
scripts/setup.sh unpacked), the guest image from KUASAR_GUEST_DIR (else .cache/guest).";

/// The benchmark's sections, each comparing one family with its baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    /// runc sandboxer against containerd's runc shim.
    Runc,
    /// wasm sandboxer against the runc sandboxer.
    Wasm,
    /// quark sandboxer against containerd's runc shim driving runsc.
    Quark,
    /// vmm sandboxer: its pods' start and memory, next to the runc sandboxer.
    Vmm,
    /// The runc family through its shim, next to its native path.
    Shim,
}

impl Section {
    const ALL: [Self; 5] = [Self::Runc, Self::Wasm, Self::Quark, Self::Vmm, Self::Shim];

    fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "runc" => Self::Runc,
            "wasm" => Self::Wasm,
            "quark" => Self::Quark,
            "vmm" => Self::Vmm,
            "shim" => Self::Shim,
            other => bail!("unknown section {other:?} (runc, wasm, quark, vmm or shim)"),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    iterations: usize,
    vm_iterations: usize,
    pods: usize,
    rounds: usize,
    warmup: usize,
    burst: usize,
    sections: Vec<Section>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            iterations: 10,
            vm_iterations: 5,
            pods: 5,
            rounds: 3,
            warmup: 1,
            burst: 50,
            sections: Section::ALL.to_vec(),
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
            if flag == "--only" {
                let value = match inline {
                    Some(value) => value,
                    None => args.next().context("--only needs sections")?.clone(),
                };
                options.sections = value
                    .split(',')
                    .map(|name| Section::parse(name.trim()))
                    .collect::<Result<_>>()?;
                continue;
            }
            let slot = match flag {
                "-h" | "--help" => return Ok(None),
                "--iterations" => &mut options.iterations,
                "--vm-iterations" => &mut options.vm_iterations,
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
            ("--vm-iterations", options.vm_iterations),
            ("--pods", options.pods),
            ("--rounds", options.rounds),
            ("--burst", options.burst),
        ] {
            ensure!(value > 0, "{flag} must be at least 1");
        }
        Ok(Some(options))
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

/// `all` rotated left by `index`, so that over successive indices each element takes every
/// position in turn: the order in which compared handlers run in round `index`.
fn rotated<T: Copy, const N: usize>(mut all: [T; N], index: usize) -> [T; N] {
    all.rotate_left(index % N);
    all
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

/// Runs pod `name` on CRI handler `runtime` with `container` and removes it again (not timed).
async fn start_pod_with(
    h: &Harness,
    runtime: &str,
    name: &str,
    container: &ContainerConfig,
) -> Result<StartTimes> {
    start_pod_then(h, runtime, name, container, remove_pod).await
}

/// Runs pod `name` on CRI handler `runtime` with `container`, then hands it to `remove` (not
/// timed), whatever the start's outcome once the pod exists.
async fn start_pod_then(
    h: &Harness,
    runtime: &str,
    name: &str,
    container: &ContainerConfig,
    remove: impl AsyncFnOnce(&Harness, &Pod) -> Result<()>,
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
    let removed = remove(h, &pod).await;
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
            is_shim && has_flag(&args, "-address", &address)
        })
        .collect()
}

/// Whether `args` hold the flag `name` followed by `value`.
fn has_flag(args: &[String], name: &str, value: &str) -> bool {
    args.windows(2).any(|w| w[0] == name && w[1] == value)
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
    let wants = |section| options.sections.contains(&section);
    let harness_options = HarnessOptions {
        sandboxer: wants(Section::Runc)
            || wants(Section::Wasm)
            || wants(Section::Vmm)
            || wants(Section::Shim),
        wasm_sandboxer: wants(Section::Wasm),
        quark_sandboxer: wants(Section::Quark),
        vmm_sandboxer: wants(Section::Vmm),
        ..Default::default()
    };
    // The shim section needs containerd's shim-mode handlers, which leave the others as
    // they are.
    let harness = if wants(Section::Shim) {
        kuasar_tests::shim::start(
            kuasar_tests::shim::ShimMode::Containerd2Shim,
            harness_options,
        )
        .await?
    } else {
        Harness::start_with(harness_options).await?
    };
    eprintln!(
        "benchmark run in {} (sandboxer pids: runc {:?}, wasm {:?}, quark {:?}, vmm {:?}; \
         containerd pid {:?})",
        harness.layout().run_dir.display(),
        harness.sandboxer_pid(),
        harness.wasm_sandboxer_pid(),
        harness.quark_sandboxer_pid(),
        harness.vmm_sandboxer_pid(),
        harness.containerd_pid()
    );
    harness
        .run(async |h: &Harness| {
            let work = async {
                if wants(Section::Runc) {
                    let latency = runc::measure_latency(h, &options).await?;
                    runc::print_latency(&latency, &options);
                    let memory = runc::measure_memory(h, &options).await?;
                    runc::print_memory(&memory, &options);
                    expect_clean(h, "the runc sections").await?;
                }
                if wants(Section::Wasm) {
                    let latency = wasm::measure_latency(h, &options).await?;
                    wasm::print_latency(&latency, &options);
                    let memory = wasm::measure_memory(h, &options).await?;
                    wasm::print_memory(&memory, &options);
                    let throughput = wasm::measure_throughput(h, &options).await?;
                    wasm::print_throughput(&throughput, &options);
                    expect_clean(h, "the wasm sections").await?;
                }
                if wants(Section::Quark) {
                    let latency = quark::measure_latency(h, &options).await?;
                    quark::print_latency(&latency, &options);
                    let memory = quark::measure_memory(h, &options).await?;
                    quark::print_memory(&memory, &options);
                    expect_clean(h, "the quark sections").await?;
                }
                if wants(Section::Vmm) {
                    let latency = vmm::measure_latency(h, &options).await?;
                    vmm::print_latency(&latency, &options);
                    let memory = vmm::measure_memory(h, &options).await?;
                    vmm::print_memory(&memory, &options);
                    expect_clean(h, "the vmm sections").await?;
                }
                if wants(Section::Shim) {
                    let latency = shim::measure_latency(h, &options).await?;
                    shim::print_latency(&latency, &options);
                    let memory = shim::measure_memory(h, &options).await?;
                    shim::print_memory(&memory, &options);
                    expect_clean(h, "the shim sections").await?;
                }
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
                vm_iterations: 5,
                pods: 2,
                rounds: 1,
                warmup: 1,
                burst: 50,
                sections: Section::ALL.to_vec(),
            }
        );
        assert_eq!(Options::parse(&args(&["--help"])).unwrap(), None);
        assert!(Options::parse(&args(&["--pods", "0"])).is_err());
        assert!(Options::parse(&args(&["--pods"])).is_err());
        assert!(Options::parse(&args(&["--bogus"])).is_err());
        let parsed = Options::parse(&args(&["--only", "quark,runc"]))
            .unwrap()
            .unwrap();
        assert_eq!(parsed.sections, [Section::Quark, Section::Runc]);
        let parsed = Options::parse(&args(&["--only", "vmm", "--vm-iterations=2"]))
            .unwrap()
            .unwrap();
        assert_eq!(parsed.sections, [Section::Vmm]);
        assert_eq!(parsed.vm_iterations, 2);
        assert!(Options::parse(&args(&["--only", "kvm"])).is_err());
        assert!(Options::parse(&args(&["--vm-iterations", "0"])).is_err());
        let parsed = Options::parse(&args(&["--burst", "7"])).unwrap().unwrap();
        assert_eq!(parsed.burst, 7);
        assert!(Options::parse(&args(&["--burst", "0"])).is_err());
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
}
