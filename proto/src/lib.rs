//! Generated protocol types and gRPC stubs shared by the LB server, the thin
//! client and the examples.
//!
//! - [`grpc::lb::v1`]: the grpclb protocol spoken with stock gRPC clients.
//! - [`registry::v1`]: the embedded registry's registration API.
//! - [`helloworld`]: the greeter used by examples, tests and benchmarks.
//! - [`xds`]: ORCA load reports (`xds.data.orca.v3`) and the out-of-band
//!   reporting service (`xds.service.orca.v3`).

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

/// `xds.*`: ORCA load reporting.
pub mod xds {
    /// `xds.data`
    pub mod data {
        /// `xds.data.orca`
        pub mod orca {
            /// `xds.data.orca.v3`
            #[allow(missing_docs, clippy::all)]
            pub mod v3 {
                tonic::include_proto!("xds.data.orca.v3");
            }
        }
    }
    /// `xds.service`
    pub mod service {
        /// `xds.service.orca`
        pub mod orca {
            /// `xds.service.orca.v3`
            #[allow(missing_docs, clippy::all)]
            pub mod v3 {
                tonic::include_proto!("xds.service.orca.v3");
            }
        }
    }
}

pub use prost_types;
