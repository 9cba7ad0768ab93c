//! `containerd-shim-kuasar-runc-v2`: the shim binary for the runc family's sandboxer.

fn main() -> std::process::ExitCode {
    kuasar_shim::main()
}
