//! Generates the gRPC server and client for containerd's sandbox controller service.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/types.proto", "proto/sandbox.proto"], &["proto"])?;
    Ok(())
}
