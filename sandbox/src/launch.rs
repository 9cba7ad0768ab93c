//! What every sandboxer binary does between `main` and serving: its command line, its
//! configuration, logging, the subreaper, the event publisher and the Sandbox API server.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use serde::de::DeserializeOwned;

use crate::config::Config;
use crate::controller::Sandboxer;
use crate::events::EventPublisher;
use crate::{reaper, server};

/// Command-line flags every sandboxer takes; they override the configuration file. Parse
/// them with [`parse_args`], whose help names the family's own defaults.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Configuration file
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Unix socket to serve the Sandbox API on
    #[arg(long, value_name = "SOCKET")]
    pub listen: Option<PathBuf>,
    /// Directory for sandbox state
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Log filter: error, warn, info, debug, trace, or tracing directives [default: info]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
}

/// Parses the command line of `family`'s sandboxer (a [`clap::Parser`] that flattens
/// [`CommonArgs`]); its help shows the defaults of that family.
pub fn parse_args<A: clap::Parser>(family: &str) -> A {
    let defaults = Config::<()>::defaults(family);
    let helps = [
        (
            "config",
            format!(
                "Configuration file [default: {} when present]",
                crate::config::default_path(family).display()
            ),
        ),
        (
            "listen",
            format!(
                "Unix socket to serve the Sandbox API on [default: {}]",
                defaults.listen.display()
            ),
        ),
        (
            "dir",
            format!(
                "Directory for sandbox state [default: {}]",
                defaults.state_dir.display()
            ),
        ),
    ];
    let command = helps.into_iter().fold(
        <A as clap::CommandFactory>::command(),
        |command, (arg, help)| command.mut_arg(arg, |arg| arg.help(help)),
    );
    <A as clap::FromArgMatches>::from_arg_matches(&command.get_matches())
        .unwrap_or_else(|err| err.exit())
}

impl CommonArgs {
    /// Reads the configuration of `family` and applies the flags over it.
    pub fn load<F: DeserializeOwned + Default>(self, family: &str) -> anyhow::Result<Config<F>> {
        let mut config = Config::<F>::load(family, self.config.as_deref())?;
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(dir) = self.dir {
            config.state_dir = dir;
        }
        if let Some(level) = self.log_level {
            config.log_level = level;
        }
        for (flag, path) in [("--listen", &config.listen), ("--dir", &config.state_dir)] {
            if !path.is_absolute() || path.parent().is_none() {
                anyhow::bail!(
                    "{flag} must be an absolute path below /, got {}",
                    path.display()
                );
            }
        }
        Ok(config)
    }
}

/// How long in-flight work gets once the sandboxer stops serving.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves the sandboxer that `build` makes from `config` until SIGTERM or SIGINT.
///
/// Sets up logging and the state directory first, then, inside the runtime, the
/// subreaper and the publisher of task events that `build` receives.
pub fn run<F, S>(
    name: &str,
    config: Config<F>,
    build: impl FnOnce(&Config<F>, EventPublisher) -> anyhow::Result<S>,
) -> anyhow::Result<()>
where
    S: Sandboxer,
{
    server::init_logging(&config.log_level)?;
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("create state directory {}", config.state_dir.display()))?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let served = runtime.block_on(async move {
        reaper::start().context("become the subreaper of containers")?;
        let events = EventPublisher::start(config.containerd.events_address());
        tracing::info!(
            sandboxer = name,
            version = env!("CARGO_PKG_VERSION"),
            state_dir = %config.state_dir.display(),
            "starting"
        );
        let sandboxer = Arc::new(build(&config, events)?);
        sandboxer
            .recover()
            .await
            .context("recover the sandboxes of an earlier run")?;
        server::serve(&config.listen, sandboxer).await
    });
    // Copies of container stdio block in threads of their own until their streams end;
    // the sandboxer does not wait for them to stop.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    served
}

/// Turns the outcome of a sandboxer's run into its exit code, printing the error chain.
pub fn exit_code(name: &str, result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{name}: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
