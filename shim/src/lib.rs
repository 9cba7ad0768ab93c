//! `containerd-shim-kuasar-<family>-v2`: the shim v2 binary through which containerd
//! versions that launch a shim per pod (1.6, 1.7, and 2.x in shim mode) reach a family's
//! sandboxer.
//!
//! The shim holds no sandbox logic. One shim process serves a pod: it answers the Task API
//! (v2 and v3) by passing every call through to the sandboxer's task server of the pod,
//! serves the shim-mode Sandbox API by calling the sandboxer's `Controller`, and in
//! containerd 1.6/1.7's pod-sandbox mode turns the pause container's task into the
//! sandbox's lifecycle. The family comes from the binary's name.

pub mod args;
pub mod config;
pub mod controller;
pub mod forward;
pub mod launch;
pub mod pause;
pub mod pod;
pub mod sandbox;
pub mod serve;
pub mod task;
pub mod version;

use std::process::ExitCode;

use args::{Action, Args};

/// The binaries' entry point.
pub fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let args = match Args::parse(&argv) {
        Ok(args) => args,
        Err(err) => {
            eprintln!("{err:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.action {
        Action::Version => {
            println!(
                "containerd-shim-kuasar-{}-v2 {}",
                args.family,
                env!("CARGO_PKG_VERSION")
            );
            Ok(())
        }
        Action::Help => {
            println!("{}", usage(&args.family));
            Ok(())
        }
        Action::Start => launch::start(&args),
        Action::Delete => {
            // What the clean-up could not do is said on stderr.
            let _ = kuasar_sandbox::server::init_logging("warn");
            runtime().and_then(|rt| rt.block_on(launch::delete(&args)))
        }
        Action::Serve => runtime().and_then(|rt| rt.block_on(serve::serve(&args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // containerd reports what a failed start or delete prints.
            eprintln!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

/// How containerd runs the shim of `family`, and where the shim finds its sandboxer.
fn usage(family: &str) -> String {
    let socket = config::ShimConfig::defaults(family).sandboxer_address;
    let variable = config::config_env(family);
    format!(
        "containerd-shim-kuasar-{family}-v2: containerd's shim for runtime_type \
         io.containerd.kuasar-{family}.v2, forwarding each pod to the {family} sandboxer.

containerd runs it as:
  containerd-shim-kuasar-{family}-v2 -namespace NS -address ADDR -publish-binary BIN -id ID [-debug] start
  containerd-shim-kuasar-{family}-v2 -namespace NS -address ADDR -publish-binary BIN -id ID -bundle DIR [-debug] delete
  containerd-shim-kuasar-{family}-v2 -v

The sandboxer is at {socket}, or at the sandboxer_address of the TOML
file named by ConfigPath in the runtime's options (containerd 1.6 and 1.7) or by
{variable} in containerd's environment. -family FAMILY overrides the
family the binary's name gives.",
        socket = socket.display()
    )
}

/// One thread: a shim serves one pod, and every call it serves waits on the sandboxer.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
