//! Harness for the multi-process integration tests.
//!
//! Everything is real and local: an etcd server started from `etcd` on PATH
//! (or `$ETCD_BIN`) with a temporary data dir, `lb-server` and
//! `greeter-server` processes built from this workspace, all on loopback
//! ports chosen at run time. Every process is started by the harness and
//! stopped by PID when its handle is dropped. Process output goes to log
//! files under `target/test-logs/`.
//!
//! | item | job |
//! | --- | --- |
//! | [`proc`] | processes: ports, binaries, logs, stop by PID |
//! | [`etcd`] | one etcd member: start, kill, restart, put/delete, keys and deletes under a prefix |
//! | [`lb`] | one `lb-server` process and its admin endpoint |
//! | [`greeter`] | `greeter-server` processes |
//! | [`calls`] | calls in the background, counting where each went; waits on lists |
//! | [`fleet`] | an LB weighting by load, with three calm backends and a busy one |
//! | [`http`] | a minimal HTTP GET for the admin port |
//! | [`certs`] | a CA and certificates made at test time |
//! | [`blackhole`] | a loopback port whose packets the kernel drops (iptables) |
//! | [`browser`] | headless Chromium: a page's DOM or a screenshot |
//! | [`dns`] | a DNS server serving a zone the test rewrites |
//! | [`netns`] | test hosts in network namespaces behind one router: cuts, one-way cuts, random loss |
//! | [`shaper`] | a delaying TCP proxy on a test host: a slow link (delay and jitter) |
//! | [`relay`] | a TCP relay connecting onward from another 127.0.0.x address |
//! | [`zookeeper`] | a ZooKeeper server from Debian's package |
//! | [`consul`] | a stand-in for a Consul agent's HTTP API |
//! | [`kube_api`] | a stand-in for the Kubernetes API server's EndpointSlices |
//! | [`standin`] | the HTTP server under the stand-ins: stop, restart on the same port |
//! | [`scenario`] | what the network-fault scenarios share: a service's detail, replicas and their cluster, a client host's channel, caller and stock clients, verdicts on their calls |
//! | [`stock`] | stock gRPC peers: grpc-go and C-core backends, grpclb and xDS clients (C-core, grpc-js), Envoy |

pub mod blackhole;
pub mod browser;
pub mod calls;
pub mod certs;
pub mod consul;
pub mod dns;
pub mod etcd;
pub mod fleet;
pub mod greeter;
pub mod http;
pub mod kube_api;
pub mod lb;
pub mod netns;
pub mod proc;
pub mod relay;
pub mod scenario;
pub mod shaper;
pub mod standin;
pub mod stock;
pub mod zookeeper;

pub use calls::*;
pub use etcd::*;
pub use greeter::*;
pub use http::*;
pub use lb::*;
pub use proc::*;
pub use stock::grpcio_client;

use std::time::{Duration, Instant};

/// Waits until `cond` holds, checking every 10 ms, at most `limit`.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A fresh etcd, an LB reading it, and `n` greeters registered in it (extra
/// greeter flags in `greeter_args`).
pub async fn etcd_cluster(n: usize, greeter_args: &[&str]) -> (Etcd, Lb, Vec<Greeter>) {
    let etcd = Etcd::start().await;
    let lb = Lb::start(&["--registry", &etcd.registry_url()]).await;
    let greeters = greeters(n, &etcd.registry_url(), greeter_args).await;
    (etcd, lb, greeters)
}
