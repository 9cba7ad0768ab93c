//! containerd's Sandbox API types and gRPC service, generated from `proto/`.
//!
//! The module tree mirrors the protobuf packages, which the generated code relies on.

/// `containerd.*` packages.
pub mod containerd {
    /// `containerd.types`: mounts, sandboxes, platforms and metrics.
    pub mod types {
        tonic::include_proto!("containerd.types");
    }

    /// `containerd.services.*` packages.
    pub mod services {
        /// `containerd.services.sandbox.*` packages.
        pub mod sandbox {
            /// `containerd.services.sandbox.v1`: the controller service a sandboxer serves.
            pub mod v1 {
                tonic::include_proto!("containerd.services.sandbox.v1");
            }
        }
    }
}

pub use containerd::services::sandbox::v1 as sandbox;
pub use containerd::types;
