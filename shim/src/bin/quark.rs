//! `containerd-shim-kuasar-quark-v2`: the shim binary for the quark family's sandboxer.

fn main() -> std::process::ExitCode {
    kuasar_shim::main()
}
