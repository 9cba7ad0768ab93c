//! Compiles the static sandbox ("pause") binary that the test pause image runs.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = PathBuf::from("pause/pause.c");
    println!("cargo:rerun-if-changed={}", source.display());

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let binary = out_dir.join("pause");
    let compiler = env::var("CC").unwrap_or_else(|_| "gcc".to_string());
    let status = Command::new(&compiler)
        .args(["-static", "-O2", "-s", "-o"])
        .arg(&binary)
        .arg(&source)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {compiler} (scripts/setup.sh installs gcc): {e}"));
    assert!(
        status.success(),
        "{compiler} failed to build {}",
        source.display()
    );

    println!("cargo:rustc-env=KUASAR_TEST_PAUSE_BIN={}", binary.display());
}
