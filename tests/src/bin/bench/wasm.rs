//! The wasm sandboxer against the runc sandboxer: start latency with a cold and a warm
//! module cache, per-pod memory and container start throughput.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use k8s_cri::v1::ContainerConfig;
use kuasar_tests::images::{BUSYBOX_IMAGE, WASM_IMAGE};
use kuasar_tests::{cleanup, Harness, Layout, Pod, KUASAR_RUNC_HANDLER, KUASAR_WASM_HANDLER};

use crate::{
    expect_count, helpers, holders, median, min_max, remove_pod, rotated, start_pod_with, verdict,
    Memory, Options, StartTimes, SETTLE,
};

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
        rotated(Self::ALL, index)
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
    const ALL: [Self; 2] = [Self::Wasm, Self::Runc];

    /// Both families, the first of them alternating with `index`.
    fn order(index: usize) -> [Self; 2] {
        rotated(Self::ALL, index)
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
pub(crate) struct WasmLatencyResults {
    total: [Vec<f64>; 3],
    run_pod: [Vec<f64>; 3],
    create: [Vec<f64>; 3],
    start: [Vec<f64>; 3],
}

pub(crate) async fn measure_latency(h: &Harness, options: &Options) -> Result<WasmLatencyResults> {
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

pub(crate) fn print_latency(results: &WasmLatencyResults, options: &Options) {
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
pub(crate) struct FamilyMemory {
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

pub(crate) async fn measure_memory(
    h: &Harness,
    options: &Options,
) -> Result<[Vec<FamilyMemory>; 2]> {
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

pub(crate) fn print_memory(results: &[Vec<FamilyMemory>; 2], options: &Options) {
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
/// One burst: its duration, and the CPU time containerd and the family's sandboxer (with
/// the children it reaped: workers, runc, container processes) spent on it.
#[derive(Debug, Clone, Copy)]
struct Burst {
    secs: f64,
    containerd_cpu_ms: f64,
    sandboxer_cpu_ms: f64,
}

/// CPU time, in milliseconds, that process `pid` and the children it waited for have used.
fn cpu_ms(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // Fields after the command name, which may hold spaces: state is field 3, utime 14,
    // stime 15, cutime 16, cstime 17.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..15)
        .with_context(|| format!("short /proc/{pid}/stat"))?
        .iter()
        .map(|f| f.parse::<f64>().unwrap_or(0.0))
        .sum();
    // SAFETY: sysconf only reads a system constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks * 1000.0 / per_second)
}

async fn burst_once(
    h: &Harness,
    family: Family,
    pod: &Pod,
    count: usize,
    round: usize,
) -> Result<Burst> {
    let containerd = h
        .containerd_pid()
        .context("the harness runs no containerd")?;
    let sandboxer = family.sandboxer_pid(h)?;
    let cpu_before = (cpu_ms(containerd)?, cpu_ms(sandboxer)?);
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
    let cpu_after = (cpu_ms(containerd)?, cpu_ms(sandboxer)?);
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
    Ok(Burst {
        secs: elapsed.as_secs_f64(),
        containerd_cpu_ms: (cpu_after.0 - cpu_before.0) / count as f64,
        sandboxer_cpu_ms: (cpu_after.1 - cpu_before.1) / count as f64,
    })
}

/// Per family in [`Family::index`] order: containers started per second, and CPU
/// milliseconds per container of containerd and of the sandboxer, in each round.
#[derive(Debug, Default)]
pub(crate) struct ThroughputResults {
    rates: [Vec<f64>; 2],
    containerd_cpu_ms: [Vec<f64>; 2],
    sandboxer_cpu_ms: [Vec<f64>; 2],
}

pub(crate) async fn measure_throughput(
    h: &Harness,
    options: &Options,
) -> Result<ThroughputResults> {
    let mut pods = Vec::new();
    let result: Result<ThroughputResults> = async {
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
        let mut results = ThroughputResults::default();
        for round in 0..options.rounds {
            for family in Family::order(round) {
                let pod = &pods[family.index()];
                let burst = burst_once(h, family, pod, options.burst, round).await?;
                let rate = options.burst as f64 / burst.secs;
                eprintln!(
                    "throughput {}/{}: {:<12} {} containers in {:.1} ms, {rate:.1}/s (CPU ms per \
                     container: containerd {:.1}, sandboxer {:.1})",
                    round + 1,
                    options.rounds,
                    family.label(),
                    options.burst,
                    burst.secs * 1000.0,
                    burst.containerd_cpu_ms,
                    burst.sandboxer_cpu_ms,
                );
                let i = family.index();
                results.rates[i].push(rate);
                results.containerd_cpu_ms[i].push(burst.containerd_cpu_ms);
                results.sandboxer_cpu_ms[i].push(burst.sandboxer_cpu_ms);
            }
        }
        Ok(results)
    }
    .await;
    let mut removal = Ok(());
    for pod in &pods {
        if let Err(e) = remove_pod(h, pod).await {
            removal = removal.and(Err(e));
        }
    }
    let results = result?;
    removal?;
    Ok(results)
}

pub(crate) fn print_throughput(results: &ThroughputResults, options: &Options) {
    let rates = &results.rates;
    println!(
        "container start throughput, {} containers created and started at once in one running \
         pod, {} rounds (medians; wasm /exit.wasm 0, kuasar-runc busybox true)",
        options.burst, options.rounds
    );
    for family in [Family::Wasm, Family::Runc] {
        let values = &rates[family.index()];
        let (min, max) = min_max(values);
        let i = family.index();
        println!(
            "  {:<13}  {:7.1} containers/s  (min {min:.1}, max {max:.1}; {:.1} ms per burst; CPU \
             ms per container: containerd {:.1}, sandboxer with its children {:.1})",
            family.label(),
            median(values),
            options.burst as f64 / median(values) * 1000.0,
            median(&results.containerd_cpu_ms[i]),
            median(&results.sandboxer_cpu_ms[i]),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_time_is_readable() {
        let spent = cpu_ms(std::process::id()).unwrap();
        assert!(spent >= 0.0, "{spent}");
        assert!(cpu_ms(u32::MAX).is_err());
    }

    #[test]
    fn wasm_starts_rotate() {
        use WasmStart::*;
        assert_eq!(WasmStart::order(0), [Cold, Warm, Runc]);
        assert_eq!(WasmStart::order(1), [Warm, Runc, Cold]);
        assert_eq!(WasmStart::order(2), [Runc, Cold, Warm]);
        assert_eq!(WasmStart::order(3), WasmStart::order(0));
        assert_eq!(Family::order(1), [Family::Runc, Family::Wasm]);
    }
}
