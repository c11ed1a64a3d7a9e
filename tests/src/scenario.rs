//! What the network-fault scenario tests share: the one service they run
//! (`greeter`) and its detail on a replica (`/api/v1/services/greeter`:
//! what is listed, one backend's row, which replica checks what, a
//! one-line brief for failure messages); LB replicas over one registry and
//! their cluster; a client host's `LbChannel` and steady caller, the stock
//! grpc-go grpclb and grpcio xDS clients beside them, and the verdicts on
//! their calls (enough of them, at most 0.1 % failed).
//!
//! The hosts, the faults and the processes are [`crate::netns`],
//! [`crate::Lb`], [`crate::Greeter`] and [`crate::stock`]; this module
//! holds only what the scenarios repeat on top of them.

use std::net::SocketAddr;
use std::time::Duration;

use lb_client::LbChannel;
use serde_json::Value;

use crate::netns::Host;
use crate::stock::StockClient;
use crate::{wait_until, Calls, Lb};

/// The service every scenario runs.
pub const SERVICE: &str = "greeter";

/// The `LbChannel` under test names itself to the LBs with this id
/// (`client_id` in `/api/v1/clients`).
pub const CHANNEL_ID: &str = "channel-under-test";

/// The detail of [`SERVICE`] on `lb` (`Null` when not 200): see
/// [`Lb::service_json`].
pub fn service(lb: &Lb) -> Value {
    lb.service_json(SERVICE)
}

/// The backends a service detail counts as listed.
pub fn listed(v: &Value) -> usize {
    v["listed"].as_u64().unwrap_or(0) as usize
}

/// The row of the backend at `addr` in a service detail.
pub fn row(v: &Value, addr: SocketAddr) -> Option<&Value> {
    v["backends"]
        .as_array()?
        .iter()
        .find(|b| b["address"] == addr.to_string())
}

/// Whether the policy lists the backend at `addr`.
pub fn is_listed(v: &Value, addr: SocketAddr) -> bool {
    row(v, addr).is_some_and(|b| b["decision"]["listed"] == true)
}

/// A service detail in one line per backend, for failure messages: its
/// address and health, in a cluster the replica that checks it and the
/// other replicas' opinions, `left_registry_s`, and the policy's decision.
pub fn brief(v: &Value) -> String {
    let Some(rows) = v["backends"].as_array() else {
        return v.to_string();
    };
    let rows: Vec<String> = rows
        .iter()
        .map(|b| {
            // `checked_by` is there only in a cluster.
            let cluster = if b["checked_by"].is_null() {
                String::new()
            } else {
                format!(
                    " (checked by {}, opinions {})",
                    b["checked_by"], b["opinions"]
                )
            };
            format!(
                "{} {}{cluster} left_registry_s {} listed {}: {}",
                b["address"].as_str().unwrap_or("?"),
                b["health"],
                b["left_registry_s"],
                b["decision"]["listed"],
                b["decision"]["reason"]
            )
        })
        .collect();
    format!(
        "listed {} of [{}] (list version {})",
        v["listed"],
        rows.join("; "),
        v["list_version"]
    )
}

/// Which replica checks each backend of [`SERVICE`] on `lb`: (address,
/// replica id) pairs in the order of the addresses ("" where no replica
/// is named).
pub fn checkers(lb: &Lb) -> Vec<(String, String)> {
    let v = service(lb);
    let mut c: Vec<(String, String)> = v["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            (
                b["address"].as_str().unwrap_or("").to_string(),
                b["checked_by"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    c.sort();
    c
}

/// The flags of an LB replica reading `registry`, with replica id `id`,
/// lease TTL `ttl` (whole seconds) and health-check interval `interval`,
/// then `extra`.
pub fn replica_args(
    registry: &str,
    id: &str,
    ttl: Duration,
    interval: Duration,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--registry".into(),
        registry.into(),
        "--replica-id".into(),
        id.into(),
        "--replica-ttl".into(),
        format!("{}s", ttl.as_secs()),
        "--health-check-interval".into(),
        format!("{}ms", interval.as_millis()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Starts an LB on test host `host` with `args` (e.g. [`replica_args`])
/// and the extra environment `env`.
pub async fn replica_in(host: &Host, args: &[String], env: &[(&str, &str)]) -> Lb {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Lb::start_in_with_env(host, &args, env).await
}

/// Whether `lb`'s etcd session is up and it sees `n` replicas.
pub fn joined(lb: &Lb, n: usize) -> bool {
    let v = lb.json("/api/v1/cluster");
    v["view"]["connected"] == true && v["view"]["replicas"].as_array().map_or(0, Vec::len) == n
}

/// Waits up to `limit` until the replicas `lbs` have formed a cluster (each
/// one's session up, seeing all of them) in which each lists `n` backends
/// of [`SERVICE`]; panics with each one's cluster view and service
/// otherwise.
pub async fn wait_formed(lbs: &[&Lb], n: usize, limit: Duration) {
    let formed = wait_until(limit, || {
        lbs.iter()
            .all(|lb| joined(lb, lbs.len()) && listed(&service(lb)) == n)
    })
    .await;
    if !formed {
        let views: Vec<String> = lbs
            .iter()
            .map(|lb| format!("{}, {}", lb.get("/api/v1/cluster").1, brief(&service(lb))))
            .collect();
        panic!(
            "the replicas never formed a cluster listing every backend: {}",
            views.join(" / ")
        );
    }
}

/// An `LbChannel` to [`SERVICE`] through the LBs at `lbs`, naming itself
/// `client_id` when given, made on `rt`: on a test host's runtime
/// ([`crate::netns::Ns::runtime`]) it is a client on that host.
pub fn channel_on(
    rt: &tokio::runtime::Runtime,
    lbs: &[SocketAddr],
    client_id: Option<&str>,
) -> LbChannel {
    let _in = rt.enter();
    let mut builder = LbChannel::builder(SERVICE).lbs(lbs.iter().map(SocketAddr::to_string));
    if let Some(id) = client_id {
        builder = builder.client_id(id);
    }
    builder.build().expect("channel")
}

/// Waits up to `limit` until `channel` has `n` ready backends; panics with
/// `failure` and the ready backends otherwise.
pub async fn assert_connected(channel: &LbChannel, n: usize, limit: Duration, failure: &str) {
    assert!(
        wait_until(limit, || channel.ready_backends().len() == n).await,
        "{failure}: {:?}",
        channel.ready_backends()
    );
}

/// The distinct backends of the list in force in `channel`.
pub fn client_listed(channel: &LbChannel) -> usize {
    crate::calls::listed(channel).len()
}

/// The streams of kind `kind` (`clients`: BalanceLoad, `xds_clients`:
/// xDS) an LB lists from `peer`'s address.
fn streams_from(lb: &Lb, kind: &str, peer: &Host) -> usize {
    let clients = lb.json("/api/v1/clients");
    let prefix = format!("{}:", peer.ip);
    clients[kind].as_array().map_or(0, |c| {
        c.iter()
            .filter(|c| c["peer"].as_str().is_some_and(|p| p.starts_with(&prefix)))
            .count()
    })
}

/// The stock clients of one LB on a client host, calling at a steady pace
/// in the background: grpc-go's grpclb policy and C-core's xDS client
/// (grpcio).
pub struct StockClients {
    go: StockClient,
    xds: StockClient,
}

impl StockClients {
    /// Starts both on `host`, clients of the LB at `lb` for [`SERVICE`]:
    /// one call every `every` for `run_for`.
    pub fn start_in(host: &Host, lb: SocketAddr, run_for: Duration, every: Duration) -> Self {
        StockClients {
            go: StockClient::go_in(host, lb, SERVICE, run_for, every),
            xds: StockClient::xds_grpcio_in(host, &lb.to_string(), SERVICE, run_for, every),
        }
    }

    /// Waits up to 20 s until `lb` (called `lb_name` in the failure) holds
    /// their streams from `host`, beside an `LbChannel`'s there: two
    /// BalanceLoad streams (the channel's, grpc-go's) and one xDS stream.
    pub async fn wait_reached(&self, lb: &Lb, host: &Host, lb_name: &str) {
        assert!(
            wait_until(Duration::from_secs(20), || {
                streams_from(lb, "clients", host) == 2 && streams_from(lb, "xds_clients", host) == 1
            })
            .await,
            "the stock clients never reached {lb_name}: {}",
            lb.get("/api/v1/clients").1
        );
    }

    /// Waits for both to finish (each at most `limit`), prints their calls
    /// and failures after `tag`, and asserts that each made at least
    /// `min_calls` calls and that at most 0.1 % of them failed. Returns
    /// each one's name and JSON summary, for further checks.
    pub async fn finish(
        self,
        limit: Duration,
        min_calls: f64,
        tag: &str,
    ) -> Vec<(&'static str, Value)> {
        let mut summaries = Vec::new();
        for (name, client) in [("grpc-go grpclb", self.go), ("grpcio xDS", self.xds)] {
            let summary = client.finish(limit).await;
            let calls = summary["calls"].as_u64().unwrap_or(0);
            let failed = summary["failures"].as_array().map_or(0, Vec::len) as u64;
            eprintln!("{tag}: {name}: {calls} calls, {failed} failed");
            assert!(
                calls as f64 >= min_calls,
                "{tag}: {name}: too few calls to judge: {summary}"
            );
            assert!(
                failed * 1000 <= calls,
                "{tag}: {name}: {failed} of {calls} calls failed: {summary}"
            );
            summaries.push((name, summary));
        }
        summaries
    }
}

/// The verdict on an `LbChannel`'s calls (a [`crate::Caller`]'s): prints
/// them after `tag`, and asserts that at least `min_ok` succeeded and that
/// at most 0.1 % failed.
pub fn judge_calls(calls: &Calls, min_ok: f64, tag: &str) {
    let (ok, failed) = (calls.ok(), calls.failures.len() as u64);
    let first_failures: Vec<_> = calls.failures.iter().take(5).collect();
    eprintln!(
        "{tag}: LbChannel {ok} ok, {failed} failed ({:.3} %), per backend {:?}; failures: \
         {first_failures:?}",
        100.0 * ok as f64 / (ok + failed).max(1) as f64,
        calls.per_backend
    );
    assert!(ok as f64 >= min_ok, "{tag}: too few calls to judge: {ok}");
    assert!(
        failed * 1000 <= ok + failed,
        "{tag}: {failed} of {} LbChannel calls failed: {first_failures:?}",
        ok + failed
    );
}
