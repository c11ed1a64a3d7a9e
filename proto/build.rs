//! Compiles the .proto files under `proto/` with tonic's code generator.
//! Needs `protoc` on PATH (Debian: `protobuf-compiler`) or in `$PROTOC`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/grpc/lb/v1/load_balancer.proto",
        "proto/lb/registry/v1/registry.proto",
        "proto/helloworld/helloworld.proto",
        "proto/xds/data/orca/v3/orca_load_report.proto",
        "proto/xds/service/orca/v3/orca.proto",
        "proto/envoy/service/load_stats/v3/lrs.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
