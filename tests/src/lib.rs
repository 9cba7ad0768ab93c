//! End-to-end test support: a CRI client, locally built test images and a harness that runs an
//! isolated containerd 2.1.9 (and the runc, wasm and quark sandboxers) per test.
//!
//! Tests need root, the packages of `scripts/setup.sh` and the containerd it unpacks.

pub mod cleanup;
pub mod config;
pub mod cri;
pub mod harness;
pub mod images;
pub mod shim;
pub mod terminal;

pub use cri::CriClient;
pub use harness::{
    Harness, HarnessOptions, Layout, Leftovers, Pod, QuarkSettings, KUASAR_QUARK_HANDLER,
    KUASAR_RUNC_HANDLER, KUASAR_VMM_HANDLER, KUASAR_WASM_HANDLER, RUNC_HANDLER, RUNSC_HANDLER,
};
