//! The microVM family: each pod in a virtual machine of its own, with a guest agent of
//! ours (`vmm-task`) as the VM's init. This crate holds the host side: the hypervisor
//! behind [`hypervisor::Hypervisor`] (implemented for QEMU), the hybrid vsock channel to
//! the agent, and [`runtime::VmRuntime`], which boots a VM per pod and carries the
//! containers' requests, files and stdio into it.

pub mod config;
pub mod hypervisor;
pub mod network;
pub mod runtime;
pub mod share;
pub mod stdio;
pub mod vsock;
