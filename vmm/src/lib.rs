//! The microVM family: each pod in a virtual machine of its own, with a guest agent of
//! ours as the VM's init. This crate holds the host side; the hypervisor sits behind
//! [`hypervisor::Hypervisor`], implemented for QEMU.

pub mod hypervisor;
