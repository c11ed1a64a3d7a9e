//! Generated protocol types and gRPC stubs shared by the LB server, the thin
//! client and the examples.
//!
//! - [`grpc::lb::v1`]: the grpclb protocol spoken with stock gRPC clients.
//! - [`registry::v1`]: the embedded registry's registration API.
//! - [`helloworld`]: the greeter used by examples, tests and benchmarks.

/// `grpc.lb.v1`: the grpclb protocol.
pub mod grpc {
    /// `grpc.lb`
    pub mod lb {
        /// `grpc.lb.v1`
        #[allow(missing_docs, clippy::all)]
        pub mod v1 {
            tonic::include_proto!("grpc.lb.v1");
        }
    }
}

/// `lb.registry.v1`: registration API of the embedded registry.
pub mod registry {
    /// `lb.registry.v1`
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("lb.registry.v1");
    }
}

/// `helloworld`: the example greeter service.
#[allow(missing_docs, clippy::all)]
pub mod helloworld {
    tonic::include_proto!("helloworld");
}

pub use prost_types;
