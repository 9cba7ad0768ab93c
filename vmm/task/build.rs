//! Generates the agent's ttrpc service from `proto/agent.proto`.

use std::path::PathBuf;

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    Codegen::new()
        .inputs(["proto/agent.proto"])
        .include("proto")
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().generate_accessors(true))
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .out_dir(&out_dir)
        .run()
        .expect("generate the agent's ttrpc code");

    // `include!` cannot take inner attributes or inner doc comments.
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = out_dir.join(name);
        let text = std::fs::read_to_string(&path).expect("read generated code");
        let kept: Vec<&str> = text
            .lines()
            .filter(|line| !line.starts_with("#!") && !line.starts_with("//!"))
            .collect();
        std::fs::write(&path, kept.join("\n")).expect("write generated code");
    }
    println!("cargo:rerun-if-changed=proto/agent.proto");
}
