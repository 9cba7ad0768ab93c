//! WebAssembly containers: each process is a worker running one module, in the
//! container's own cgroup with the limits from its spec.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio as ProcessStdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use kuasar_sandbox::cgroup::Cgroup;
use kuasar_sandbox::error::{Error, Result};
use kuasar_sandbox::io::{Console, Stdio};
use kuasar_sandbox::mount::unmount_all;
use kuasar_sandbox::reaper;
use kuasar_sandbox::task::{ContainerRuntime, CreateContainer, ExecProcess, KillTarget, Spawned};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{Process, Spec};

use crate::engine::ModuleCache;
use crate::worker::{self, WorkerSpec, CONTROL_FD};

/// How long a worker may take to load and link its module.
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs WebAssembly containers with a shared module cache.
pub struct WasmRuntime {
    cache: Arc<ModuleCache>,
    containers: Mutex<HashMap<String, WasmContainer>>,
}

struct WasmContainer {
    rootfs: PathBuf,
    preopens: Vec<(PathBuf, String)>,
    cgroup: Option<Cgroup>,
    /// The init worker's control socket, until the container starts.
    control: Option<UnixStream>,
    init_pid: u32,
}

impl WasmRuntime {
    /// A runtime compiling modules into `cache`.
    pub fn new(cache: ModuleCache) -> Self {
        Self {
            cache: Arc::new(cache),
            containers: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, WasmContainer>> {
        self.containers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn cgroup_of(&self, id: &str) -> Result<Option<Cgroup>> {
        let containers = self.lock();
        let container = containers
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("container {id:?}")))?;
        Ok(container.cgroup.clone())
    }

    /// Compiles the module a process names and starts its worker, stopped before `_start`.
    async fn launch(
        &self,
        id: &str,
        process: &Process,
        rootfs: &Path,
        preopens: &[(PathBuf, String)],
        stdio: &Stdio,
        cgroup: Option<&Cgroup>,
    ) -> Result<(Spawned, UnixStream)> {
        let args = process.args().clone().unwrap_or_default();
        let module = args.first().cloned().ok_or_else(|| {
            Error::InvalidArgument(format!("container {id:?} names no module to run"))
        })?;
        let cwd = process.cwd().display().to_string();
        let host_module = resolve(rootfs, &cwd, &module).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "module {module} of container {id:?} is outside its root filesystem"
            ))
        })?;
        if !host_module.is_file() {
            return Err(Error::InvalidArgument(format!(
                "module {module} of container {id:?} does not exist in its image"
            )));
        }

        let cache = self.cache.clone();
        let shown = module.clone();
        let compiled = tokio::task::spawn_blocking(move || cache.prepare(&host_module, &shown))
            .await
            .context("compile task")?
            .map_err(|err| Error::InvalidArgument(format!("container {id:?}: {err:#}")))?;

        let mut preopens = preopens.to_vec();
        if cwd != "/" {
            if let Some(host_cwd) = resolve(rootfs, "/", &cwd).filter(|p| p.is_dir()) {
                preopens.push((host_cwd, ".".into()));
            }
        }
        let mut env = process.env().clone().unwrap_or_default();
        env.push(format!("PWD={cwd}"));
        let spec = WorkerSpec {
            compiled,
            module: module.clone(),
            args,
            env,
            preopens,
        };
        let spec_json = serde_json::to_string(&spec).context("encode worker spec")?;

        let fds = stdio
            .open_direct()
            .with_context(|| format!("open stdio of container {id:?}"))?;
        let (ours, theirs) = UnixStream::pair().context("create worker control socket")?;
        let mut command = kuasar_sandbox::process::own_binary();
        command.arg(worker::COMMAND).arg(spec_json);
        command.stdin(
            fds.stdin
                .map_or_else(ProcessStdio::null, ProcessStdio::from),
        );
        command.stdout(
            fds.stdout
                .map_or_else(ProcessStdio::null, ProcessStdio::from),
        );
        command.stderr(
            fds.stderr
                .map_or_else(ProcessStdio::null, ProcessStdio::from),
        );
        let control_fd = theirs.as_raw_fd();
        // SAFETY: only dup2 and fcntl, which are async-signal-safe, run between fork and
        // exec; they install the control socket at CONTROL_FD without close-on-exec.
        unsafe {
            command.pre_exec(move || {
                let rc = if control_fd == CONTROL_FD {
                    libc::fcntl(CONTROL_FD, libc::F_SETFD, 0)
                } else {
                    libc::dup2(control_fd, CONTROL_FD)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (child, exit) = reaper::spawn(&mut command).context("start module worker")?;
        drop(command);
        drop(theirs);
        let pid = child.id();
        if let Some(cgroup) = cgroup {
            if let Err(err) = cgroup.add(pid) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                return Err(err
                    .context(format!("place container {id:?} in its cgroup"))
                    .into());
            }
        }
        // The worker loads the module only once it is accounted to the container.
        if let Err(err) = (&ours).write_all(&[1]) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            return Err(Error::Internal(
                anyhow::Error::new(err).context(format!("let the worker of {id:?} load")),
            ));
        }

        ours.set_read_timeout(Some(LOAD_TIMEOUT))
            .context("control socket")?;
        let report = {
            let control = ours.try_clone().context("control socket")?;
            tokio::task::spawn_blocking(move || worker::read_report(&control))
                .await
                .context("worker report")?
        };
        if let Err(err) = report {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            return Err(Error::InvalidArgument(format!("container {id:?}: {err:#}")));
        }
        tracing::debug!(container_id = %id, module = %module, pid, "module loaded");
        Ok((
            Spawned {
                pid,
                exit,
                console: None,
                oom: None,
            },
            ours,
        ))
    }
}

/// Host path of `path` (absolute, or relative to `cwd`) inside `rootfs`, refusing `..`.
fn resolve(rootfs: &Path, cwd: &str, path: &str) -> Option<PathBuf> {
    let full = if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        Path::new(cwd).join(path)
    };
    let mut host = rootfs.to_path_buf();
    for component in full.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => host.push(part),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(host)
}

/// Directories a container's modules see: the root filesystem as `/`, and each bind
/// mount of a directory (CRI volumes) at its destination.
fn preopens(spec: &Spec, rootfs: &Path) -> Vec<(PathBuf, String)> {
    let mut preopens = vec![(rootfs.to_path_buf(), "/".to_string())];
    for mount in spec.mounts().as_deref().unwrap_or_default() {
        let is_bind = mount
            .options()
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|o| o == "bind" || o == "rbind")
            || mount.typ().as_deref() == Some("bind");
        let Some(source) = mount.source() else {
            continue;
        };
        if is_bind && source.is_dir() {
            preopens.push((source.clone(), mount.destination().display().to_string()));
        }
    }
    preopens
}

#[async_trait]
impl ContainerRuntime for WasmRuntime {
    async fn create(&self, container: &CreateContainer) -> Result<Spawned> {
        let id = &container.id;
        let config = container.bundle.join("config.json");
        let spec = Spec::load(&config).map_err(|err| {
            Error::InvalidArgument(format!(
                "container {id:?}: read {}: {err}",
                config.display()
            ))
        })?;
        let process = spec
            .process()
            .clone()
            .ok_or_else(|| Error::InvalidArgument(format!("container {id:?} has no process")))?;

        let rootfs =
            kuasar_sandbox::mount::mount_rootfs(&container.bundle, &container.rootfs).await?;
        let cgroup = match spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().as_ref())
        {
            Some(path) => {
                let cgroup = Cgroup::create_path(&path.display().to_string());
                match cgroup {
                    Ok(cgroup) => {
                        if let Some(resources) =
                            spec.linux().as_ref().and_then(|l| l.resources().as_ref())
                        {
                            cgroup
                                .apply(resources)
                                .with_context(|| format!("apply limits of container {id:?}"))?;
                        }
                        Some(cgroup)
                    }
                    Err(err) => {
                        let _ = unmount_all(&rootfs);
                        return Err(err
                            .context(format!("create cgroup of container {id:?}"))
                            .into());
                    }
                }
            }
            None => None,
        };
        let preopens = preopens(&spec, &rootfs);

        let launched = self
            .launch(
                id,
                &process,
                &rootfs,
                &preopens,
                &container.stdio,
                cgroup.as_ref(),
            )
            .await;
        let (mut spawned, control) = match launched {
            Ok(launched) => launched,
            Err(err) => {
                if let Some(cgroup) = &cgroup {
                    let _ = cgroup.remove();
                }
                let _ = unmount_all(&rootfs);
                return Err(err);
            }
        };
        spawned.oom = cgroup
            .as_ref()
            .and_then(|c| {
                c.dirs()
                    .iter()
                    .find(|d| {
                        d.join("memory.events").exists() || d.join("memory.oom_control").exists()
                    })
                    .cloned()
            })
            .and_then(|dir| kuasar_sandbox::oom::watch(&dir).ok());
        self.lock().insert(
            id.clone(),
            WasmContainer {
                rootfs,
                preopens,
                cgroup,
                control: Some(control),
                init_pid: spawned.pid,
            },
        );
        Ok(spawned)
    }

    async fn start(&self, id: &str) -> Result<Option<Console>> {
        let control = self
            .lock()
            .get_mut(id)
            .ok_or_else(|| Error::NotFound(format!("container {id:?}")))?
            .control
            .take()
            .ok_or_else(|| {
                Error::FailedPrecondition(format!("container {id:?} was started already"))
            })?;
        (&control)
            .write_all(&[1])
            .with_context(|| format!("start the module of container {id:?}"))?;
        Ok(None)
    }

    async fn exec(&self, exec: &ExecProcess) -> Result<Spawned> {
        let id = &exec.container_id;
        let process: Process = serde_json::from_slice(&exec.spec).map_err(|err| {
            Error::InvalidArgument(format!(
                "exec {:?} of container {id:?}: bad process spec: {err}",
                exec.exec_id
            ))
        })?;
        let (rootfs, preopens, cgroup) = {
            let containers = self.lock();
            let container = containers
                .get(id)
                .ok_or_else(|| Error::NotFound(format!("container {id:?}")))?;
            (
                container.rootfs.clone(),
                container.preopens.clone(),
                container.cgroup.clone(),
            )
        };
        let (spawned, control) = self
            .launch(
                id,
                &process,
                &rootfs,
                &preopens,
                &exec.stdio,
                cgroup.as_ref(),
            )
            .await?;
        (&control)
            .write_all(&[1])
            .with_context(|| format!("start exec {:?} of container {id:?}", exec.exec_id))?;
        Ok(spawned)
    }

    async fn kill(&self, id: &str, target: KillTarget, signal: u32) -> Result<()> {
        let signal = Signal::try_from(signal as i32)
            .map_err(|_| Error::InvalidArgument(format!("unknown signal {signal}")))?;
        let pids = match target {
            KillTarget::Exec(pid) => vec![pid],
            KillTarget::Init { all } => {
                let containers = self.lock();
                let container = containers
                    .get(id)
                    .ok_or_else(|| Error::NotFound(format!("container {id:?}")))?;
                match (&container.cgroup, all) {
                    (Some(cgroup), true) => cgroup.procs(),
                    _ => vec![container.init_pid],
                }
            }
        };
        let mut delivered = false;
        for pid in pids {
            delivered |= kill(Pid::from_raw(pid as i32), signal).is_ok();
        }
        if !delivered {
            return Err(Error::NotFound(format!(
                "process of container {id:?}: not running"
            )));
        }
        Ok(())
    }

    async fn delete(&self, id: &str) -> Result<()> {
        let Some(container) = self.lock().remove(id) else {
            return Ok(());
        };
        let _ = kill(Pid::from_raw(container.init_pid as i32), Signal::SIGKILL);
        if let Some(cgroup) = &container.cgroup {
            for pid in cgroup.procs() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            let cgroup = cgroup.clone();
            tokio::task::spawn_blocking(move || cgroup.remove())
                .await
                .context("cgroup task")?
                .with_context(|| format!("remove cgroup of container {id:?}"))?;
        }
        let _ = unmount_all(&container.rootfs);
        Ok(())
    }

    async fn pause(&self, id: &str) -> Result<()> {
        let cgroup = self
            .cgroup_of(id)?
            .ok_or_else(|| Error::Unimplemented("pausing a container without a cgroup".into()))?;
        cgroup.freeze(true).map_err(Error::from)
    }

    async fn resume(&self, id: &str) -> Result<()> {
        let cgroup = self
            .cgroup_of(id)?
            .ok_or_else(|| Error::Unimplemented("resuming a container without a cgroup".into()))?;
        cgroup.freeze(false).map_err(Error::from)
    }

    async fn update(&self, id: &str, resources: &[u8]) -> Result<()> {
        let resources: oci_spec::runtime::LinuxResources = serde_json::from_slice(resources)
            .map_err(|err| {
                Error::InvalidArgument(format!(
                    "resources of container {id:?} are not LinuxResources JSON: {err}"
                ))
            })?;
        let cgroup = self
            .cgroup_of(id)?
            .ok_or_else(|| Error::FailedPrecondition(format!("container {id:?} has no cgroup")))?;
        cgroup.apply(&resources).map_err(Error::from)
    }

    async fn stats(&self, id: &str) -> Result<Any> {
        let cgroup = self
            .cgroup_of(id)?
            .ok_or_else(|| Error::FailedPrecondition(format!("container {id:?} has no cgroup")))?;
        Ok(cgroup.metrics())
    }

    async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let containers = self.lock();
        let container = containers
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("container {id:?}")))?;
        Ok(match &container.cgroup {
            Some(cgroup) => cgroup.procs(),
            None => vec![container.init_pid],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_resolve_inside_the_rootfs() {
        let rootfs = Path::new("/b/rootfs");
        assert_eq!(
            resolve(rootfs, "/", "/hello.wasm").unwrap(),
            Path::new("/b/rootfs/hello.wasm")
        );
        assert_eq!(
            resolve(rootfs, "/app", "main.wasm").unwrap(),
            Path::new("/b/rootfs/app/main.wasm")
        );
        assert_eq!(resolve(rootfs, "/", "/../../etc/passwd"), None);
    }
}
