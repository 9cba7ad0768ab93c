//! Compiles what the test images hold: the static sandbox ("pause") binary, and the WASI
//! modules of the wasm image (with Debian's clang-14 and wasi-libc).

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

    let modules = out_dir.join("wasm");
    std::fs::create_dir_all(&modules).expect("create the module directory");
    println!("cargo:rerun-if-changed=wasm");
    let clang_missing = Command::new("clang-14").arg("--version").output().is_err();
    assert!(
        !clang_missing,
        "clang-14 is not installed: the wasm test modules need clang-14, lld-14, wasi-libc and \
         libclang-rt-14-dev-wasm32 (run scripts/setup.sh)"
    );
    let mut sources: Vec<PathBuf> = std::fs::read_dir("wasm")
        .expect("tests/wasm holds the module sources")
        .map(|entry| entry.expect("read tests/wasm").path())
        .filter(|path| path.extension().is_some_and(|e| e == "c"))
        .collect();
    sources.sort();
    for source in sources {
        let name = source
            .file_stem()
            .expect("a file name")
            .to_string_lossy()
            .into_owned();
        let mut command = Command::new("clang-14");
        // Debug sections of wasi-libc would make up most of each module; the name section
        // stays for backtraces.
        command.args(["--target=wasm32-wasi", "-O2", "-Wl,--strip-debug", "-o"]);
        command
            .arg(modules.join(format!("{name}.wasm")))
            .arg(&source);
        if name == "missing-import" {
            command.arg("-Wl,--allow-undefined");
        }
        let status = command
            .status()
            .unwrap_or_else(|e| panic!("cannot run clang-14 (run scripts/setup.sh): {e}"));
        assert!(
            status.success(),
            "clang-14 failed to build {} (wasi-libc, lld-14 and libclang-rt-14-dev-wasm32 \
             are needed too: run scripts/setup.sh)",
            source.display()
        );
    }
    println!("cargo:rustc-env=KUASAR_TEST_WASM_DIR={}", modules.display());
}
