//! The runc sandboxer against containerd's own runc shim (`io.containerd.runc.v2`): start
//! latency and the memory of the processes that exist only to manage pods.

use anyhow::{ensure, Context, Result};
use kuasar_tests::images::BUSYBOX_IMAGE;
use kuasar_tests::{cleanup, Harness, Layout, KUASAR_RUNC_HANDLER, RUNC_HANDLER};

use crate::{
    expect_count, holders, median, min_max, remove_pod, rotated, shims, start_pod_with, verdict,
    Memory, Options, StartTimes, SETTLE,
};

/// Target of the start latency ratio kuasar-runc / runc.v2.
const LATENCY_TARGET: f64 = 0.7;

/// Target of the per-pod management memory (PSS) ratio kuasar-runc / runc.v2.
const MEMORY_TARGET: f64 = 0.2;

/// Command line of the test pause image's process.
const PAUSE_COMMAND: &str = "/pause";

/// The two handlers compared, in the order of even iterations and rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handler {
    RuncV2,
    Kuasar,
}

impl Handler {
    const ALL: [Self; 2] = [Self::RuncV2, Self::Kuasar];

    /// Both handlers, the first of them alternating with `index`.
    fn order(index: usize) -> [Self; 2] {
        rotated(Self::ALL, index)
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

/// Runs a pod with one sleeping container on `handler` and removes it again (not timed).
async fn start_once(h: &Harness, handler: Handler, name: &str) -> Result<StartTimes> {
    let container = h.container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]);
    start_pod_with(h, handler.cri_name(), name, &container).await
}

#[derive(Debug, Default)]
pub(crate) struct LatencyResults {
    total: Samples,
    run_pod: Samples,
    create: Samples,
    start: Samples,
}

pub(crate) async fn measure_latency(h: &Harness, options: &Options) -> Result<LatencyResults> {
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

/// The pause processes in the run's pod cgroups.
fn pauses(layout: &Layout) -> Vec<u32> {
    cleanup::cgroup_processes(layout)
        .into_iter()
        .filter(|(_, cmdline)| cmdline == PAUSE_COMMAND)
        .map(|(pid, _)| pid)
        .collect()
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
pub(crate) struct MemoryResults {
    rss: Samples,
    pss: Samples,
    processes: Vec<(Handler, Memory)>,
    other: Vec<(Handler, Memory)>,
    sandboxer_idle: Vec<Memory>,
}

pub(crate) async fn measure_memory(h: &Harness, options: &Options) -> Result<MemoryResults> {
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

pub(crate) fn print_latency(results: &LatencyResults, options: &Options) {
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

pub(crate) fn print_memory(results: &MemoryResults, options: &Options) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handlers_alternate() {
        assert_eq!(Handler::order(0), [Handler::RuncV2, Handler::Kuasar]);
        assert_eq!(Handler::order(1), [Handler::Kuasar, Handler::RuncV2]);
    }
}
