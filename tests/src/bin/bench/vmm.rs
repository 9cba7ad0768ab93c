//! The microVM family: where a VM pod's start time goes (QEMU, the guest kernel, the guest
//! agent, the sandboxer and containerd), how long a container takes to start in a running
//! VM next to the runc sandboxer, and the host memory one VM pod costs.
//!
//! The boot's parts come from the line the vmm sandboxer logs for every pod it starts,
//! `VM running, agent answering sandbox_id=… pid=<QEMU> start_ms=… qemu_spawn_ms=…
//! agent_answered_ms=… kernel_to_agent_ms=… guest_uptime_ms=…`; the rest is measured by the
//! CRI client. The runc sandboxer's pods, started in the same iterations, are the reference
//! for what a pod start costs without a VM.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use kuasar_tests::images::BUSYBOX_IMAGE;
use kuasar_tests::{cleanup, Harness, Layout, Pod, KUASAR_RUNC_HANDLER, KUASAR_VMM_HANDLER};

use crate::{
    all_pids, arguments, expect_count, holders, kib_field, median, min_max, ms, remove_pod,
    rotated, start_pod_then, verdict, Memory, Options, StartTimes, SETTLE,
};

/// The most VMs the section runs at once: each takes about 290 MB of host memory under
/// software emulation.
const MAX_VMS: usize = 3;

/// Target: the share of a VM pod's RunPodSandbox that is the sandboxer's own work.
const OWN_WORK_TARGET: f64 = 0.10;

/// Target: from the guest kernel's start until the agent answered, in milliseconds.
const GUEST_BOOT_TARGET_MS: f64 = 1500.0;

/// Target: the sandboxer's growth per VM pod, KiB of PSS.
const SANDBOXER_GROWTH_TARGET: f64 = 5.0 * 1024.0;

/// Message of the vmm sandboxer's log line for every pod whose VM came up.
const BOOT_MESSAGE: &str = "VM running, agent answering";

/// Length of the sandbox id prefix that names a VM's run directory.
const VM_DIR_NAME_LEN: usize = 16;

/// The vsock device backend running beside each QEMU.
const VSOCK_HELPER: &str = "vhost-device-vsock";

/// The hidden command of the sandboxer's binary that runs a pod's task relay.
const RELAY_COMMAND: &str = "relay-tasks";

/// The sleeping container of both families.
const SLEEPER: [&str; 2] = ["sleep", "3600"];

/// The two sandboxers compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handler {
    /// The vmm sandboxer: a QEMU microVM per pod.
    Vmm,
    /// The runc sandboxer: the same containerd and pod set-up without a VM.
    Runc,
}

impl Handler {
    const ALL: [Self; 2] = [Self::Vmm, Self::Runc];

    /// Both, the first of them alternating with `index`.
    fn order(index: usize) -> [Self; 2] {
        rotated(Self::ALL, index)
    }

    fn cri_name(self) -> &'static str {
        match self {
            Self::Vmm => KUASAR_VMM_HANDLER,
            Self::Runc => KUASAR_RUNC_HANDLER,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Vmm => "kuasar-vmm",
            Self::Runc => "kuasar-runc",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Self::Vmm => "vmm",
            Self::Runc => "vrunc",
        }
    }
}

/// What the vmm sandboxer logged about one pod's boot, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
struct BootLine {
    /// QEMU's pid.
    pid: u32,
    /// The sandboxer's whole start of the pod's VM (directory, boot, clock, guest set-up).
    start: f64,
    /// From the boot's start until QEMU and its vsock helper were spawned.
    qemu_spawn: f64,
    /// From the boot's start until the agent answered its health check.
    agent_answered: f64,
    /// Guest uptime when the agent process started.
    kernel_to_agent: f64,
    /// Guest uptime when the agent answered.
    guest_uptime: f64,
}

impl BootLine {
    /// Parses the sandboxer's boot line of sandbox `sandbox_id`; `None` for any other line.
    fn parse(line: &str, sandbox_id: &str) -> Option<Self> {
        let line = strip_ansi(line);
        let (_, fields) = line.split_once(BOOT_MESSAGE)?;
        let field = |key: &str| {
            fields
                .split_whitespace()
                .find_map(|token| token.strip_prefix(key)?.strip_prefix('='))
        };
        if field("sandbox_id")?.trim_matches('"') != sandbox_id {
            return None;
        }
        let number = |key: &str| field(key)?.parse::<f64>().ok();
        Some(Self {
            pid: field("pid")?.parse().ok()?,
            start: number("start_ms")?,
            qemu_spawn: number("qemu_spawn_ms")?,
            agent_answered: number("agent_answered_ms")?,
            kernel_to_agent: number("kernel_to_agent_ms")?,
            guest_uptime: number("guest_uptime_ms")?,
        })
    }

    /// The boot line of sandbox `sandbox_id` in the vmm sandboxer's log of this run.
    fn of(layout: &Layout, sandbox_id: &str) -> Result<Self> {
        let log = fs::read_to_string(&layout.vmm_log)
            .with_context(|| format!("cannot read {}", layout.vmm_log.display()))?;
        log.lines()
            .rev()
            .find_map(|line| Self::parse(line, sandbox_id))
            .with_context(|| {
                format!(
                    "no {BOOT_MESSAGE:?} line for sandbox {sandbox_id} in {}",
                    layout.vmm_log.display()
                )
            })
    }

    /// From the boot's start until the guest kernel started: spawning QEMU and its helper,
    /// then QEMU setting up the machine and loading the kernel.
    fn hypervisor(&self) -> f64 {
        self.agent_answered - self.guest_uptime
    }

    /// From QEMU's spawn until the guest kernel started.
    fn qemu_to_kernel(&self) -> f64 {
        self.hypervisor() - self.qemu_spawn
    }

    /// From the agent process's start until it answered.
    fn agent_startup(&self) -> f64 {
        self.guest_uptime - self.kernel_to_agent
    }

    /// The sandboxer's part of its own start of the VM outside the boot: the VM directory
    /// before, the guest clock and the guest's set-up after.
    fn around_boot(&self) -> f64 {
        self.start - self.agent_answered
    }
}

/// `line` without terminal colour sequences (`ESC [ … m`).
fn strip_ansi(line: &str) -> String {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// The run directory of sandbox `sandbox_id`'s VM: QEMU's and its helper's command lines
/// name it.
fn vm_dir(layout: &Layout, sandbox_id: &str) -> PathBuf {
    let name: String = sandbox_id.chars().take(VM_DIR_NAME_LEN).collect();
    layout.vmm_state.join("vms").join(name)
}

/// Whether process `pid` runs `program` (by file name, or its prefix when `prefix`) with an
/// argument inside `dir`.
fn runs_in(pid: u32, program: &str, prefix: bool, dir: &Path) -> bool {
    let args = arguments(pid);
    let name = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let named = if prefix {
        name.starts_with(program)
    } else {
        name == program
    };
    let inside = format!("{}/", dir.display());
    named && args.iter().any(|a| a.contains(&inside))
}

/// The shared memory process `pid` maps: for QEMU, the guest's RAM (a memfd).
fn shared_memory(pid: u32) -> Result<Memory> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("cannot read /proc/{pid}/smaps_rollup"))?;
    Ok(Memory {
        rss: kib_field(&status, "RssShmem:")
            .with_context(|| format!("no RssShmem in /proc/{pid}/status"))?,
        pss: kib_field(&rollup, "Pss_Shmem:")
            .with_context(|| format!("no Pss_Shmem in /proc/{pid}/smaps_rollup"))?,
    })
}

/// The vsock helpers of the VM in `dir`.
fn vsock_helpers(dir: &Path) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&pid| runs_in(pid, VSOCK_HELPER, false, dir))
        .collect()
}

/// One pod start and removal, in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// As the CRI client saw it.
    times: StartTimes,
    /// StopPodSandbox and RemovePodSandbox.
    removal: f64,
    /// The sandboxer's boot line; only for VM pods.
    boot: Option<BootLine>,
}

/// Runs a pod with one sleeping container on `handler`, removes it again and, for a VM pod,
/// reads how its boot went.
async fn start_once(h: &Harness, handler: Handler, name: &str) -> Result<Sample> {
    let container = h.container_config("sleeper", BUSYBOX_IMAGE, &SLEEPER);
    let mut removed = None;
    let remove = async |h: &Harness, pod: &Pod| {
        let began = Instant::now();
        let result = remove_pod(h, pod).await;
        removed = Some((pod.id.clone(), ms(began.elapsed())));
        result
    };
    let times = start_pod_then(h, handler.cri_name(), name, &container, remove).await?;
    let (id, removal) = removed.context("the pod was never handed over for removal")?;
    let boot = match handler {
        Handler::Vmm => Some(BootLine::of(h.layout(), &id)?),
        Handler::Runc => None,
    };
    Ok(Sample {
        times,
        removal,
        boot,
    })
}

/// Samples of both handlers taken in the same iterations: `vm[i]` and `runc[i]` ran one
/// after the other.
#[derive(Debug, Default)]
pub(crate) struct LatencyResults {
    vm: Vec<Sample>,
    runc: Vec<Sample>,
}

impl LatencyResults {
    fn of(&mut self, handler: Handler) -> &mut Vec<Sample> {
        match handler {
            Handler::Vmm => &mut self.vm,
            Handler::Runc => &mut self.runc,
        }
    }

    fn boots(&self) -> impl Iterator<Item = BootLine> + '_ {
        self.vm.iter().filter_map(|s| s.boot)
    }
}

pub(crate) async fn measure_latency(h: &Harness, options: &Options) -> Result<LatencyResults> {
    for round in 0..options.warmup {
        for handler in Handler::ALL {
            let name = format!("warm-{}-{round}", handler.tag());
            let sample = start_once(h, handler, &name).await?;
            eprintln!(
                "vmm warm-up {}/{}: {:<12} {:7.1} ms",
                round + 1,
                options.warmup,
                handler.label(),
                sample.times.total
            );
        }
    }
    let mut results = LatencyResults::default();
    for iteration in 0..options.vm_iterations {
        for handler in Handler::order(iteration) {
            let name = format!("lat-{}-{iteration}", handler.tag());
            let sample = start_once(h, handler, &name).await?;
            let t = &sample.times;
            let boot = match &sample.boot {
                Some(b) => format!(
                    "; VM boot {:.0} = spawn {:.0} + QEMU {:.0} + kernel {:.0} + agent {:.0}",
                    b.agent_answered,
                    b.qemu_spawn,
                    b.qemu_to_kernel(),
                    b.kernel_to_agent,
                    b.agent_startup()
                ),
                None => String::new(),
            };
            eprintln!(
                "vmm latency {}/{}: {:<12} RunPodSandbox {:7.1} ms, CreateContainer {:.1}, \
                 StartContainer {:.1}, removal {:.1}{boot}",
                iteration + 1,
                options.vm_iterations,
                handler.label(),
                t.run_pod,
                t.create,
                t.start,
                sample.removal,
            );
            results.of(handler).push(sample);
        }
    }
    Ok(results)
}

/// The median and extremes of `values`, as `median  (min …, max …)` in milliseconds.
fn spread(values: &[f64]) -> String {
    let (min, max) = min_max(values);
    format!("{:7.1} ms  (min {min:.1}, max {max:.1})", median(values))
}

pub(crate) fn print_latency(results: &LatencyResults, options: &Options) {
    let boots: Vec<BootLine> = results.boots().collect();
    let boot = |part: fn(&BootLine) -> f64| boots.iter().map(part).collect::<Vec<_>>();
    let vm_run_pod: Vec<f64> = results.vm.iter().map(|s| s.times.run_pod).collect();
    let runc_run_pod: Vec<f64> = results.runc.iter().map(|s| s.times.run_pod).collect();
    // Per iteration: everything of the VM pod's RunPodSandbox outside the boot, and that
    // less the runc sandboxer's RunPodSandbox of the same iteration.
    let outside: Vec<f64> = results
        .vm
        .iter()
        .filter_map(|s| Some(s.times.run_pod - s.boot?.agent_answered))
        .collect();
    let beyond_runc: Vec<f64> = outside
        .iter()
        .zip(&runc_run_pod)
        .map(|(outside, runc)| outside - runc)
        .collect();

    println!(
        "microVM pod start: RunPodSandbox and, inside it, the VM's boot until the guest agent \
         answered; {} iterations alternating with kuasar-runc; guests under QEMU software emulation (TCG); medians of \
         each part, which need not add up exactly",
        options.vm_iterations
    );
    println!(
        "  {:<58} {}",
        "RunPodSandbox, kuasar-vmm (CRI client)",
        spread(&vm_run_pod)
    );
    println!(
        "  {:<58} {}",
        "  VM boot, by the sandboxer's clock (agent_answered)",
        spread(&boot(|b| b.agent_answered))
    );
    println!(
        "  {:<58} {}",
        "    hypervisor: QEMU and vhost-device-vsock spawned",
        spread(&boot(|b| b.qemu_spawn))
    );
    println!(
        "  {:<58} {}",
        "    hypervisor: QEMU until the guest kernel started",
        spread(&boot(BootLine::qemu_to_kernel))
    );
    println!(
        "  {:<58} {}",
        "    guest kernel boot until the agent process started",
        spread(&boot(|b| b.kernel_to_agent))
    );
    println!(
        "  {:<58} {}",
        "    agent start-up until it answered",
        spread(&boot(BootLine::agent_startup))
    );
    println!(
        "  {:<58} {}",
        "  outside the VM boot (RunPodSandbox - VM boot)",
        spread(&outside)
    );
    println!(
        "  {:<58} {}",
        "    logged by the sandboxer: VM dir, clock, guest set-up",
        spread(&boot(BootLine::around_boot))
    );
    println!(
        "  {:<58} {}",
        "RunPodSandbox, kuasar-runc (no VM; same iterations)",
        spread(&runc_run_pod)
    );
    println!(
        "  (the guest's uptime starts once its kernel set up timekeeping: the kernel's earliest \
         steps count as QEMU's here)"
    );
    println!(
        "  (\"outside the VM boot\" holds containerd's CRI work (network namespace, CNI, \
         metadata) and all of the vmm sandboxer's work but the boot; kuasar-runc's \
         RunPodSandbox holds the same CRI work plus the pod set-up both sandboxers share: \
         namespace holder, cgroup, pod files, Task API server)"
    );

    let total = median(&vm_run_pod);
    let estimate = median(&beyond_runc);
    let upper = median(&outside);
    println!(
        "  {:<58} {estimate:7.1} ms  {:5.1}% of RunPodSandbox (target <= {:.0}%)  {}",
        "vmm sandboxer's own work, less kuasar-runc's RunPodSandbox",
        100.0 * estimate / total,
        100.0 * OWN_WORK_TARGET,
        verdict(estimate / total, OWN_WORK_TARGET)
    );
    println!(
        "  {:<58} {upper:7.1} ms  {:5.1}% of RunPodSandbox (target <= {:.0}%)  {}",
        "vmm sandboxer's own work, at most (containerd included)",
        100.0 * upper / total,
        100.0 * OWN_WORK_TARGET,
        verdict(upper / total, OWN_WORK_TARGET)
    );
    println!(
        "  (the first excludes the shared pod set-up too, the second includes containerd's \
         CRI work: the sandboxer's own work lies between them)"
    );
    let guest: Vec<f64> = boot(|b| b.guest_uptime);
    let guest_boot = median(&guest);
    println!(
        "  {:<58} {guest_boot:7.1} ms  (target <= {GUEST_BOOT_TARGET_MS:.0} ms)  {}",
        "guest boot to agent (kernel start -> agent answering)",
        verdict(guest_boot, GUEST_BOOT_TARGET_MS)
    );

    let part = |samples: &[Sample], f: fn(&StartTimes) -> f64| {
        samples.iter().map(|s| f(&s.times)).collect::<Vec<_>>()
    };
    println!(
        "container start in a running pod (CreateContainer + StartContainer, busybox sleep), \
         {} iterations alternating",
        options.vm_iterations
    );
    for (handler, samples) in [(Handler::Vmm, &results.vm), (Handler::Runc, &results.runc)] {
        println!(
            "  {:<13} {}  (medians of CreateContainer {:.1}, StartContainer {:.1})",
            handler.label(),
            spread(&part(samples, |t| t.create + t.start)),
            median(&part(samples, |t| t.create)),
            median(&part(samples, |t| t.start)),
        );
    }
    let container = |samples: &[Sample]| median(&part(samples, |t| t.create + t.start));
    println!(
        "  {:<13} {:.2}  (kuasar-vmm / kuasar-runc)",
        "ratio",
        container(&results.vm) / container(&results.runc)
    );
    let removal = |samples: &[Sample]| samples.iter().map(|s| s.removal).collect::<Vec<_>>();
    println!(
        "  pod removal (StopPodSandbox + RemovePodSandbox, not a target): kuasar-vmm {}, \
         kuasar-runc {}",
        spread(&removal(&results.vm)).trim(),
        spread(&removal(&results.runc)).trim()
    );
}

/// The host memory of one VM pod, and the sandboxer around it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MemorySample {
    /// QEMU, per pod.
    qemu: Memory,
    /// The part of QEMU's memory that is shared memory: the guest's RAM, per pod.
    guest_ram: Memory,
    /// vhost-device-vsock, per pod.
    vsock: Memory,
    /// The sandboxer's namespace holder, per pod.
    holder: Memory,
    /// The task relay that keeps containerd's connections across a sandboxer restart,
    /// per pod.
    relay: Memory,
    /// Any other process of the run that is not a daemon, per pod.
    other: Memory,
    /// The sandboxer with the pods less the sandboxer before them, per pod.
    growth: Memory,
    /// The sandboxer before the pods started.
    idle: Memory,
    /// The sandboxer once the pods were removed, less the sandboxer before them.
    retained: Memory,
}

impl MemorySample {
    fn total(&self) -> Memory {
        self.qemu
            .plus(self.vsock)
            .plus(self.holder)
            .plus(self.relay)
            .plus(self.other)
            .plus(self.growth)
    }
}

/// The number of VM pods running at once in a memory round.
fn vm_pods(options: &Options) -> usize {
    options.pods.min(MAX_VMS)
}

/// Runs `count` VM pods with one sleeping container each, measures the host processes of
/// each and the sandboxer, and removes the pods again.
async fn measure_memory_once(h: &Harness, count: usize, round: usize) -> Result<MemorySample> {
    ensure!(
        h.cri().list_pods().await?.is_empty(),
        "pods left over before a memory round"
    );
    let layout = h.layout();
    let sandboxer = h
        .vmm_sandboxer_pid()
        .context("the harness runs no vmm sandboxer")?;
    let daemons: Vec<u32> = h
        .containerd_pid()
        .into_iter()
        .chain(h.sandboxer_pid())
        .chain(h.wasm_sandboxer_pid())
        .chain(h.quark_sandboxer_pid())
        .chain(Some(sandboxer))
        .collect();
    let idle = Memory::of(sandboxer)?;

    let mut pods = Vec::new();
    let result: Result<MemorySample> = async {
        for index in 0..count {
            let name = format!("mem-vmm-{round}-{index}");
            let pod = h.run_pod(&name, KUASAR_VMM_HANDLER).await?;
            pods.push(pod);
            let pod = pods.last().expect("a pod was just pushed");
            let sleeper = h.container_config("sleeper", BUSYBOX_IMAGE, &SLEEPER);
            h.start_container(pod, &sleeper).await?;
        }
        tokio::time::sleep(SETTLE).await;

        let mut qemus = Vec::new();
        let mut vsocks = Vec::new();
        for pod in &pods {
            let dir = vm_dir(layout, &pod.id);
            let qemu = BootLine::of(layout, &pod.id)?.pid;
            if !runs_in(qemu, "qemu-system", true, &dir) {
                bail!(
                    "process {qemu} of pod {} is not a QEMU of {}: {:?}",
                    pod.id,
                    dir.display(),
                    arguments(qemu)
                );
            }
            qemus.push(qemu);
            let helpers = vsock_helpers(&dir);
            expect_count(&format!("{VSOCK_HELPER} of pod {}", pod.id), &helpers, 1)?;
            vsocks.extend(helpers);
        }
        let holders = holders(layout, sandboxer);
        expect_count("namespace holders", &holders, count)?;
        let known: Vec<u32> = qemus
            .iter()
            .chain(&vsocks)
            .chain(&holders)
            .copied()
            .collect();
        let (relays, others): (Vec<u32>, Vec<u32>) = cleanup::run_processes(layout, &daemons)
            .into_iter()
            .map(|(pid, _)| pid)
            .filter(|pid| !known.contains(pid))
            .partition(|&pid| arguments(pid).get(1).map(String::as_str) == Some(RELAY_COMMAND));
        expect_count("task relays", &relays, count)?;
        if !others.is_empty() {
            let described: Vec<String> = others
                .iter()
                .map(|&pid| format!("{pid} {}", arguments(pid).join(" ")))
                .collect();
            eprintln!(
                "vmm memory: further processes of the pods: {}",
                described.join("; ")
            );
        }
        let with_pods = Memory::of(sandboxer)?;
        let guest_ram = qemus.iter().try_fold(Memory::default(), |total, &pid| {
            Ok::<_, anyhow::Error>(total.plus(shared_memory(pid)?))
        })?;
        Ok(MemorySample {
            qemu: Memory::sum(&qemus)?.per(count),
            guest_ram: guest_ram.per(count),
            vsock: Memory::sum(&vsocks)?.per(count),
            holder: Memory::sum(&holders)?.per(count),
            relay: Memory::sum(&relays)?.per(count),
            other: Memory::sum(&others)?.per(count),
            growth: with_pods.minus(idle).per(count),
            idle,
            retained: Memory::default(),
        })
    }
    .await;

    let mut removal = Ok(());
    for pod in &pods {
        if let Err(e) = remove_pod(h, pod).await {
            removal = removal.and(Err(e));
        }
    }
    let mut sample = result?;
    removal?;
    sample.retained = Memory::of(sandboxer)?.minus(idle);
    Ok(sample)
}

pub(crate) async fn measure_memory(h: &Harness, options: &Options) -> Result<Vec<MemorySample>> {
    let count = vm_pods(options);
    let mut results = Vec::new();
    for round in 0..options.rounds {
        let sample = measure_memory_once(h, count, round).await?;
        let total = sample.total();
        eprintln!(
            "vmm memory {}/{}: per pod RSS {:6.0} PSS {:6.0} KiB (QEMU {:.0}/{:.0} of which guest \
             RAM {:.0}/{:.0}, {VSOCK_HELPER} \
             {:.0}/{:.0}, holder {:.0}/{:.0}, relay {:.0}/{:.0}, sandboxer growth {:.0}/{:.0}; sandboxer idle \
             {:.0}/{:.0}, retained after removal {:.0}/{:.0})",
            round + 1,
            options.rounds,
            total.rss,
            total.pss,
            sample.qemu.rss,
            sample.qemu.pss,
            sample.guest_ram.rss,
            sample.guest_ram.pss,
            sample.vsock.rss,
            sample.vsock.pss,
            sample.holder.rss,
            sample.holder.pss,
            sample.relay.rss,
            sample.relay.pss,
            sample.growth.rss,
            sample.growth.pss,
            sample.idle.rss,
            sample.idle.pss,
            sample.retained.rss,
            sample.retained.pss,
        );
        results.push(sample);
    }
    Ok(results)
}

pub(crate) fn print_memory(results: &[MemorySample], options: &Options) {
    println!(
        "microVM host memory per pod, {} VM pods with a sleeping busybox container at once, {} \
         rounds (medians, KiB per pod)",
        vm_pods(options),
        options.rounds
    );
    let of = |part: fn(&MemorySample) -> Memory| {
        let rss: Vec<f64> = results.iter().map(|s| part(s).rss).collect();
        let pss: Vec<f64> = results.iter().map(|s| part(s).pss).collect();
        (median(&rss), median(&pss))
    };
    let row = |label: &str, (rss, pss): (f64, f64)| {
        println!("  {label:<36} RSS {rss:8.0}  PSS {pss:8.0}");
    };
    row("hypervisor (QEMU)", of(|s| s.qemu));
    row("  of which guest RAM (shared memfd)", of(|s| s.guest_ram));
    row("  of which QEMU's own", of(|s| s.qemu.minus(s.guest_ram)));
    row("helper (vhost-device-vsock)", of(|s| s.vsock));
    row("helper (namespace holder)", of(|s| s.holder));
    row("helper (task relay)", of(|s| s.relay));
    let (other_rss, _) = of(|s| s.other);
    if other_rss > 0.0 {
        row("other processes of the pod", of(|s| s.other));
    }
    let (growth_rss, growth_pss) = of(|s| s.growth);
    println!(
        "  {:<36} RSS {growth_rss:8.0}  PSS {growth_pss:8.0}  (target PSS <= {:.0})  {}",
        "sandboxer growth",
        SANDBOXER_GROWTH_TARGET,
        verdict(growth_pss, SANDBOXER_GROWTH_TARGET)
    );
    row("total", of(MemorySample::total));
    let first = results.first().map(|s| s.idle).unwrap_or_default();
    let last = results.last().map(|s| s.idle).unwrap_or_default();
    let (retained_rss, retained_pss) = of(|s| s.retained);
    println!(
        "  (not counted: the sandboxer with no pods, PSS {:.0} KiB before the first round and \
         {:.0} KiB before the last; {retained_rss:.0}/{retained_pss:.0} KiB RSS/PSS more once a \
         round's pods were removed)",
        first.pss, last.pss
    );
    println!(
        "  (QEMU and vhost-device-vsock both map the guest's RAM, a shared memfd: RSS counts \
         a shared page in each, PSS splits it, so the PSS total is what the host pays; the \
         holders run the sandboxer's binary and share its pages, which lowers the sandboxer's \
         own PSS as pods start)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "2025-01-01T10:00:00.123456Z  INFO vmm_sandboxer::runtime: VM running, \
        agent answering sandbox_id=abc123 pid=4242 start_ms=2600 qemu_spawn_ms=15 \
        agent_answered_ms=2500 kernel_to_agent_ms=2300 guest_uptime_ms=2380";

    #[test]
    fn parses_the_boot_line() {
        let boot = BootLine::parse(LINE, "abc123").unwrap();
        assert_eq!(boot.pid, 4242);
        assert_eq!(boot.start, 2600.0);
        assert_eq!(boot.hypervisor(), 120.0);
        assert_eq!(boot.qemu_to_kernel(), 105.0);
        assert_eq!(boot.agent_startup(), 80.0);
        assert_eq!(boot.around_boot(), 100.0);
        assert_eq!(BootLine::parse(LINE, "abc"), None);
        assert_eq!(
            BootLine::parse("INFO sandbox started sandbox_id=abc123", "abc123"),
            None
        );
    }

    #[test]
    fn parses_a_coloured_boot_line() {
        let coloured = "\u{1b}[32m INFO\u{1b}[0m VM running, agent answering \
            \u{1b}[3msandbox_id\u{1b}[0m\u{1b}[2m=\u{1b}[0mabc123 \u{1b}[3mpid\u{1b}[0m\u{1b}[2m=\
            \u{1b}[0m7 start_ms=5 qemu_spawn_ms=1 agent_answered_ms=4 kernel_to_agent_ms=2 \
            guest_uptime_ms=3";
        let boot = BootLine::parse(coloured, "abc123").unwrap();
        assert_eq!(boot.pid, 7);
        assert_eq!(boot.hypervisor(), 1.0);
    }

    #[test]
    fn vm_directories_are_named_by_an_id_prefix() {
        let layout = Layout::new(Path::new("/tmp/kuasar-t/9"), 9);
        assert_eq!(
            vm_dir(&layout, "0123456789abcdef0123"),
            Path::new("/tmp/kuasar-t/9/vmm-sandboxer/vms/0123456789abcdef")
        );
    }

    #[test]
    fn handlers_alternate() {
        assert_eq!(Handler::order(0), [Handler::Vmm, Handler::Runc]);
        assert_eq!(Handler::order(1), [Handler::Runc, Handler::Vmm]);
    }
}
