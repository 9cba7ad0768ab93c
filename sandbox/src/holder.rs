//! The namespace holder: the one small process per pod that keeps the pod's namespaces
//! alive and whose `/proc/<pid>/ns/*` the pod's containers join.
//!
//! It is the sandboxer's own binary, re-executed with the hidden `hold-namespaces`
//! command: every sandboxer's `main` starts with [`run_if_requested`]. It joins the
//! network namespace CRI prepared, unshares IPC and UTS (and PID when the pod shares one
//! PID namespace), sets the pod's hostname, reports its pid on stdout and sleeps, reaping
//! orphans when it is the pod's PID 1.

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::{fork, ForkResult, Pid};

use crate::pod::PodNamespaces;
use crate::reaper::{self, ExitReceiver};

/// Name of the hidden command that turns this binary into a holder.
pub const COMMAND: &str = "hold-namespaces";

/// How long a holder may take to report that the namespaces are ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// What a holder sets up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HolderSpec {
    /// Network namespace to join; `None` keeps the host's.
    pub netns: Option<PathBuf>,
    /// Hostname of the pod, set in its own UTS namespace.
    pub hostname: Option<String>,
    /// Unshare the IPC namespace.
    pub ipc: bool,
    /// Unshare the UTS namespace.
    pub uts: bool,
    /// Unshare the PID namespace; the holder becomes its PID 1.
    pub pid: bool,
}

impl HolderSpec {
    /// The namespaces a pod gets from its CRI namespace options.
    pub fn for_pod(namespaces: PodNamespaces, netns: Option<PathBuf>, hostname: &str) -> Self {
        let uts = !namespaces.host_network;
        Self {
            netns: if namespaces.host_network { None } else { netns },
            hostname: (uts && !hostname.is_empty()).then(|| hostname.to_string()),
            ipc: !namespaces.host_ipc,
            uts,
            pid: namespaces.shared_pid,
        }
    }

    fn to_args(&self) -> Vec<String> {
        let mut args = vec![COMMAND.to_string()];
        if let Some(netns) = &self.netns {
            args.extend(["--netns".into(), netns.display().to_string()]);
        }
        if let Some(hostname) = &self.hostname {
            args.extend(["--hostname".into(), hostname.clone()]);
        }
        for (flag, on) in [
            ("--ipc", self.ipc),
            ("--uts", self.uts),
            ("--pid", self.pid),
        ] {
            if on {
                args.push(flag.into());
            }
        }
        args
    }

    fn from_args(args: &[String]) -> anyhow::Result<Self> {
        let mut spec = Self::default();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--netns" => spec.netns = Some(args.next().context("--netns needs a path")?.into()),
                "--hostname" => {
                    spec.hostname = Some(args.next().context("--hostname needs a name")?.clone())
                }
                "--ipc" => spec.ipc = true,
                "--uts" => spec.uts = true,
                "--pid" => spec.pid = true,
                other => bail!("unknown holder argument {other:?}"),
            }
        }
        Ok(spec)
    }
}

/// A running holder.
#[derive(Debug)]
pub struct Holder {
    /// Host pid of the process holding the namespaces.
    pub pid: u32,
    /// Delivers the holder's exit.
    pub exit: ExitReceiver,
}

/// Starts a holder for `spec` and waits until its namespaces are ready.
pub async fn spawn(spec: &HolderSpec) -> anyhow::Result<Holder> {
    let mut command = crate::process::own_binary();
    command
        .args(spec.to_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (mut child, launcher_exit) =
        reaper::spawn(&mut command).context("start namespace holder")?;
    let line = crate::process::read_report(&mut child, READY_TIMEOUT, "namespace holder").await?;
    let pid: u32 = match line.trim().parse() {
        Ok(pid) => pid,
        Err(_) => bail!(
            "namespace holder failed: {}",
            crate::process::failure_output(&mut child).await
        ),
    };
    // With a PID namespace the launcher forks the holder and exits; its re-parented child
    // is the holder.
    let exit = if pid == child.id() {
        launcher_exit
    } else {
        reaper::watch(pid)
    };
    Ok(Holder { pid, exit })
}

/// Runs the holder and exits when this process was started as one; returns otherwise.
///
/// Call first thing in `main`, before any thread or runtime exists.
pub fn run_if_requested() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some(COMMAND) {
        return;
    }
    match run(&args[2..]) {
        Ok(()) => std::process::exit(0),
        Err(err) => {
            eprintln!("{err:#}");
            std::process::exit(1);
        }
    }
}

/// Body of the `hold-namespaces` command; runs before any thread exists and never
/// returns while the pod lives.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let spec = HolderSpec::from_args(args)?;

    if let Some(netns) = &spec.netns {
        let file = std::fs::File::open(netns)
            .with_context(|| format!("open network namespace {}", netns.display()))?;
        setns(&file, CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("join network namespace {}", netns.display()))?;
    }
    let mut flags = CloneFlags::empty();
    flags.set(CloneFlags::CLONE_NEWIPC, spec.ipc);
    flags.set(CloneFlags::CLONE_NEWUTS, spec.uts);
    flags.set(CloneFlags::CLONE_NEWPID, spec.pid);
    if !flags.is_empty() {
        unshare(flags).context("unshare pod namespaces")?;
    }
    if let Some(hostname) = &spec.hostname {
        nix::unistd::sethostname(hostname).with_context(|| format!("set hostname {hostname:?}"))?;
    }

    if spec.pid {
        // SAFETY: the process is single-threaded here (no runtime was started), so the
        // child may run arbitrary code after fork.
        match unsafe { fork() }.context("fork the pod's PID 1")? {
            ForkResult::Parent { child } => {
                report(child.as_raw() as u32)?;
                std::process::exit(0);
            }
            ForkResult::Child => {}
        }
    } else {
        report(std::process::id())?;
    }
    crate::process::detach_stdio()?;
    sleep_and_reap()
}

fn report(pid: u32) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{pid}").context("report holder pid")?;
    stdout.flush().context("report holder pid")
}

extern "C" fn on_sigchld(_: libc::c_int) {}

fn sleep_and_reap() -> anyhow::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_sigchld),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler does nothing, so it is async-signal-safe.
    unsafe { sigaction(Signal::SIGCHLD, &action) }.context("install SIGCHLD handler")?;
    loop {
        while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            if status == nix::sys::wait::WaitStatus::StillAlive {
                break;
            }
        }
        nix::unistd::pause();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_round_trip() {
        let spec = HolderSpec {
            netns: Some("/var/run/netns/cni-1".into()),
            hostname: Some("web-0".into()),
            ipc: true,
            uts: true,
            pid: true,
        };
        assert_eq!(HolderSpec::from_args(&spec.to_args()[1..]).unwrap(), spec);
        assert!(HolderSpec::from_args(&["--bogus".into()]).is_err());
    }

    #[test]
    fn host_network_pods_keep_host_network_and_uts() {
        let namespaces = PodNamespaces {
            host_network: true,
            host_ipc: false,
            shared_pid: false,
            host_pid: false,
        };
        let spec = HolderSpec::for_pod(namespaces, Some("/x".into()), "node");
        assert_eq!(spec.netns, None);
        assert!(!spec.uts && spec.hostname.is_none() && spec.ipc && !spec.pid);
    }
}
