//! `containerd-shim-kuasar-wasm-v2`: the shim binary for the wasm family's sandboxer.

fn main() -> std::process::ExitCode {
    kuasar_shim::main()
}
