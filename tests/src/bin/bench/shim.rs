//! The runc family on the shim path (containerd 2.x with `sandboxer = "shim"`: one
//! `containerd-shim-kuasar-runc-v2` per pod forwarding to the sandboxer) next to its native
//! path (the sandboxer as containerd's proxy plugin), same sandboxer, same containerd: start
//! latency, and per-pod memory with the shim's own RSS.

use anyhow::{ensure, Context, Result};
use kuasar_tests::images::BUSYBOX_IMAGE;
use kuasar_tests::shim::{shim_handler, shim_pids};
use kuasar_tests::{Harness, KUASAR_RUNC_HANDLER};

use crate::{
    expect_count, holders, median, min_max, remove_pod, rotated, start_pod_with, Memory, Options,
    SETTLE,
};

/// The two paths compared, in the order of even iterations and rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Native,
    Shim,
}

impl Path {
    const ALL: [Self; 2] = [Self::Native, Self::Shim];

    fn order(index: usize) -> [Self; 2] {
        rotated(Self::ALL, index)
    }

    fn cri_name(self) -> String {
        match self {
            Self::Native => KUASAR_RUNC_HANDLER.to_string(),
            Self::Shim => shim_handler("runc"),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Shim => "shim",
        }
    }
}

#[derive(Debug, Default)]
struct Samples {
    native: Vec<f64>,
    shim: Vec<f64>,
}

impl Samples {
    fn of(&mut self, path: Path) -> &mut Vec<f64> {
        match path {
            Path::Native => &mut self.native,
            Path::Shim => &mut self.shim,
        }
    }

    fn get(&self, path: Path) -> &[f64] {
        match path {
            Path::Native => &self.native,
            Path::Shim => &self.shim,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct LatencyResults {
    total: Samples,
    run_pod: Samples,
    create: Samples,
    start: Samples,
}

pub(crate) async fn measure_latency(h: &Harness, options: &Options) -> Result<LatencyResults> {
    let container = h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
    for round in 0..options.warmup {
        for path in Path::order(round) {
            let name = format!("warm-{}-{round}", path.label());
            start_pod_with(h, &path.cri_name(), &name, &container).await?;
        }
    }
    let mut results = LatencyResults::default();
    for iteration in 0..options.iterations {
        for path in Path::order(iteration) {
            let name = format!("lat-{}-{iteration}", path.label());
            let times = start_pod_with(h, &path.cri_name(), &name, &container).await?;
            eprintln!(
                "shim latency {}/{}: {:<7} {:7.1} ms (RunPodSandbox {:.1}, CreateContainer {:.1}, \
                 StartContainer {:.1})",
                iteration + 1,
                options.iterations,
                path.label(),
                times.total,
                times.run_pod,
                times.create,
                times.start
            );
            results.total.of(path).push(times.total);
            results.run_pod.of(path).push(times.run_pod);
            results.create.of(path).push(times.create);
            results.start.of(path).push(times.start);
        }
    }
    Ok(results)
}

pub(crate) fn print_latency(results: &LatencyResults, options: &Options) {
    println!(
        "runc family, native path vs shim path on containerd 2.1.9: start latency \
         (RunPodSandbox -> container started), {} iterations alternating",
        options.iterations
    );
    for path in Path::ALL {
        let values = results.total.get(path);
        let (min, max) = min_max(values);
        println!(
            "  {:<13}  median {:7.1} ms  (min {:.1}, max {:.1}; medians of RunPodSandbox {:.1}, \
             CreateContainer {:.1}, StartContainer {:.1})",
            path.label(),
            median(values),
            min,
            max,
            median(results.run_pod.get(path)),
            median(results.create.get(path)),
            median(results.start.get(path)),
        );
    }
    let ratio = median(&results.total.shim) / median(&results.total.native);
    println!("  {:<13}  {ratio:.3}", "ratio shim/native");
}

/// One memory measurement of one path, per pod.
#[derive(Debug, Clone, Copy)]
struct MemorySample {
    /// Holders, sandboxer growth and (shim path) shims, divided by the number of pods.
    total: Memory,
    /// The shims (zero on the native path).
    shims: Memory,
}

async fn measure_memory_once(
    h: &Harness,
    path: Path,
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
            let name = format!("mem-{}-{round}-{index}", path.label());
            let pod = h.run_pod(&name, &path.cri_name()).await?;
            pods.push(pod);
            let pod = pods.last().expect("a pod was just pushed");
            let container = h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
            h.start_container(pod, &container).await?;
        }
        tokio::time::sleep(SETTLE).await;
        let holders = holders(layout, sandboxer);
        expect_count("namespace holders", &holders, count)?;
        let shims = shim_pids(layout);
        expect_count(
            "pod shims",
            &shims,
            if path == Path::Shim { count } else { 0 },
        )?;
        let holders = Memory::sum(&holders)?;
        let shims = Memory::sum(&shims)?;
        let growth = Memory::of(sandboxer)?.minus(idle);
        Ok(MemorySample {
            total: holders.plus(growth).plus(shims).per(count),
            shims: shims.per(count),
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
    // The shims leave shortly after their pods; the next round counts shims again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !shim_pids(layout).is_empty() {
        ensure!(
            std::time::Instant::now() < deadline,
            "shims outlived their pods"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(sample)
}

#[derive(Debug, Default)]
pub(crate) struct MemoryResults {
    rss: Samples,
    pss: Samples,
    shim_rss: Vec<f64>,
    shim_pss: Vec<f64>,
}

pub(crate) async fn measure_memory(h: &Harness, options: &Options) -> Result<MemoryResults> {
    let mut results = MemoryResults::default();
    for round in 0..options.rounds {
        for path in Path::order(round) {
            let sample = measure_memory_once(h, path, options.pods, round).await?;
            eprintln!(
                "shim memory {}/{}: {:<7} per pod RSS {:8.0} PSS {:8.0} KiB (shim RSS {:.0} PSS \
                 {:.0})",
                round + 1,
                options.rounds,
                path.label(),
                sample.total.rss,
                sample.total.pss,
                sample.shims.rss,
                sample.shims.pss,
            );
            results.rss.of(path).push(sample.total.rss);
            results.pss.of(path).push(sample.total.pss);
            if path == Path::Shim {
                results.shim_rss.push(sample.shims.rss);
                results.shim_pss.push(sample.shims.pss);
            }
        }
    }
    Ok(results)
}

pub(crate) fn print_memory(results: &MemoryResults, options: &Options) {
    println!(
        "runc family, native path vs shim path: per-pod memory (holder + sandboxer growth + \
         shim), {} pods, {} rounds (medians)",
        options.pods, options.rounds
    );
    for path in Path::ALL {
        println!(
            "  {:<13}  RSS {:7.0} KiB/pod  PSS {:7.0} KiB/pod",
            path.label(),
            median(results.rss.get(path)),
            median(results.pss.get(path)),
        );
    }
    println!(
        "  {:<13}  RSS {:7.0} KiB  PSS {:7.0} KiB  (one process per pod)",
        "shim process",
        median(&results.shim_rss),
        median(&results.shim_pss),
    );
}
