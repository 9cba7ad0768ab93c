//! What every Kuasar sandboxer shares.
//!
//! A sandboxer family (runc, wasm, application kernel, microVM) implements [`Sandboxer`] for
//! its pods and [`task::ContainerRuntime`] for the containers inside them; this crate serves
//! containerd's Sandbox API over gRPC, the Task API over ttrpc, and owns the plumbing in
//! between: process exits, stdio, events, pod cgroups and configuration.

pub mod api;
pub mod cgroup;
pub mod config;
pub mod controller;
pub mod error;
pub mod events;
pub mod holder;
pub mod id;
pub mod io;
pub mod launch;
pub mod mount;
pub mod oci;
pub mod oom;
pub mod pod;
pub mod pod_sandboxer;
pub mod process;
pub mod reaper;
pub mod relay;
pub mod server;
pub mod state;
pub mod task;

pub use controller::{SandboxExit, SandboxRequest, SandboxStatus, Sandboxer, StartedSandbox};
pub use error::{Error, Result};
pub use pod_sandboxer::PodSandboxer;
