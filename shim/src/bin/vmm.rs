//! `containerd-shim-kuasar-vmm-v2`: the shim binary for the vmm family's sandboxer.

fn main() -> std::process::ExitCode {
    kuasar_shim::main()
}
