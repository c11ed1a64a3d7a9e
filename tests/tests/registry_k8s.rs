//! The Kubernetes registry source (`--registry k8s://prod`) against the
//! API server stand-in (`lb_tests::kube_api`: no API server can run here),
//! with real greeter processes behind the slices: slices joined per
//! Service, the named port, zones, readiness, terminating endpoints leaving
//! before they stop, a malformed slice rejected, a watch resumed from its
//! bookmark without a list, and a 410 Gone after an outage re-listing —
//! with calls flowing and none failing.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_tests::kube_api::{Ep, KubeApi, Request};
use lb_tests::{free_port, wait_backends, wait_until, Caller, Greeter, Lb};

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpointslices_become_lists_and_follow_every_change() {
    let api = KubeApi::start(Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let port = free_port();
    let ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let mut greeters = Vec::new();
    for ip in ips {
        greeters.push(Greeter::start_on(&format!("{ip}:{port}"), "none", &[]).await);
    }
    let ports = [("metrics", 9090), ("grpc", port)];
    api.put_slice(
        "prod",
        "greeter-a",
        "greeter",
        &[Ep::ready(ips[0], "zone-a"), Ep::ready(ips[1], "zone-b")],
        &ports,
    );
    api.put_slice(
        "prod",
        "greeter-b",
        "greeter",
        &[Ep::ready(ips[2], "zone-c")],
        &ports,
    );
    // Another namespace: not watched by k8s://prod.
    api.put_slice(
        "other",
        "greeter-x",
        "greeter",
        &[Ep::ready("127.0.0.9", "zone-a")],
        &ports,
    );

    let lb = Lb::start_with_env(
        &[
            "--registry",
            "k8s://prod",
            "--k8s-port",
            "grpc",
            "--domain-suffix",
            ".svc.cluster.local",
        ],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    )
    .await;
    lb.wait_ready(Duration::from_secs(15)).await;
    let all: Vec<SocketAddr> = ips.iter().map(|ip| addr(ip, port)).collect();
    let ch = lb_tests::channel("greeter.prod.svc.cluster.local", &[lb.addr]);
    assert!(
        wait_backends(&ch, 3, Duration::from_secs(10)).await,
        "{:?}",
        lb.backends("greeter.prod")
    );
    assert!(
        !lb.knows_backend("greeter.prod", addr("127.0.0.9", port)),
        "another namespace leaked in"
    );
    // Zones and pods from the slices.
    let zones: Vec<String> = lb
        .backends("greeter.prod")
        .iter()
        .map(|b| {
            format!(
                "{}={}",
                b["address"].as_str().unwrap(),
                b["locality"]["zone"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        zones,
        [
            format!("{}=zone-a", all[0]),
            format!("{}=zone-b", all[1]),
            format!("{}=zone-c", all[2])
        ]
    );

    let caller = Caller::start(&ch, 2, Duration::from_millis(10));
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A terminating endpoint leaves the list while it still serves; only
    // then does its process stop: no call fails.
    let mut terminating = Ep::ready(ips[1], "zone-b");
    terminating.ready = false;
    terminating.terminating = true;
    let t = Instant::now();
    api.put_slice(
        "prod",
        "greeter-a",
        "greeter",
        &[Ep::ready(ips[0], "zone-a"), terminating],
        &ports,
    );
    assert!(
        wait_until(Duration::from_secs(3), || !ch
            .ready_backends()
            .contains(&all[1]))
        .await,
        "a terminating endpoint stayed listed"
    );
    let left_after = t.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    greeters[1].proc.terminate(Duration::from_secs(5));

    // Not ready: out; ready again: back.
    let mut unready = Ep::ready(ips[2], "zone-c");
    unready.ready = false;
    api.put_slice("prod", "greeter-b", "greeter", &[unready], &ports);
    assert!(
        wait_until(Duration::from_secs(3), || !ch
            .ready_backends()
            .contains(&all[2]))
        .await
    );
    api.put_slice(
        "prod",
        "greeter-b",
        "greeter",
        &[Ep::ready(ips[2], "zone-c")],
        &ports,
    );
    assert!(
        wait_until(Duration::from_secs(3), || ch
            .ready_backends()
            .contains(&all[2]))
        .await
    );

    // A malformed slice is rejected and counted; nothing else changes.
    api.put_raw(
        "prod",
        "greeter-fqdn",
        serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"labels": {"kubernetes.io/service-name": "greeter"}},
            "addressType": "FQDN", "endpoints": [{"addresses": ["greeter.example"]}],
            "ports": [{"name": "grpc", "port": port}]}),
    );
    assert!(
        wait_until(Duration::from_secs(3), || lb.metric(
            "lb_registry_rejects_total{source=\"k8s\",kind=\"bad_address\"}"
        ) >= 1.0)
        .await
    );
    assert_eq!(lb.backends("greeter.prod").len(), 2);

    // A watch that ends (timeout, a proxy in front of the API server)
    // resumes from its last bookmark: a watch, no new list.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = api.requests().len();
    let seen = api.resource_version();
    api.close_watches();
    assert!(
        wait_until(Duration::from_secs(5), || api.requests().len() > before).await,
        "no new request after the watch closed"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after: Vec<Request> = api.requests()[before..].to_vec();
    assert!(
        matches!(after.first(), Some(Request::Watch { from: Some(rv), bookmarks: true }) if *rv >= seen),
        "expected a watch from version {seen} or later: {after:?}"
    );
    assert!(
        !after.iter().any(|r| matches!(r, Request::List { .. })),
        "re-listed: {after:?}"
    );

    // An outage during which the history is compacted: the LB serves what
    // it knew, then its watch gets 410 Gone, it lists again, and the
    // change made meanwhile (greeter-b deleted) takes effect.
    let mut api = api;
    api.stop();
    // Let the dropped connections go before the change is made.
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.delete_slice("prod", "greeter-b");
    api.compact();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        ch.ready_backends().contains(&all[2]),
        "the last known state is served during the outage"
    );
    let before = api.requests().len();
    api.restart().await;
    assert!(
        wait_until(Duration::from_secs(10), || !ch
            .ready_backends()
            .contains(&all[2]))
        .await,
        "the deletion made during the outage never arrived: {:?}",
        &api.requests()[before..]
    );
    let after: Vec<Request> = api.requests()[before..].to_vec();
    assert!(
        after.iter().any(|r| matches!(r, Request::List { .. })),
        "no re-list after 410: {after:?}"
    );
    assert_eq!(ch.ready_backends(), vec![all[0]]);

    let calls = caller.stop().await;
    assert!(
        calls.failures.is_empty(),
        "failed calls: {:?}",
        &calls.failures[..calls.failures.len().min(5)]
    );
    assert!(calls.ok() > 100);
    eprintln!("terminating endpoint left the list after {left_after:?}");
    // Nothing but the outage itself was worth a warning.
    let warns: Vec<String> = lb
        .log_lines("WARN")
        .into_iter()
        .filter(|l| {
            !l.contains("registry source failing") && !l.contains("registry entry rejected")
        })
        .collect();
    assert!(warns.is_empty(), "{warns:?}");
}

#[tokio::test]
async fn every_namespace_with_k8s_and_a_missing_kubeconfig_is_a_clear_error() {
    let api = KubeApi::start(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let port = free_port();
    let g1 = Greeter::start_on(&format!("127.0.0.2:{port}"), "none", &[]).await;
    let g2 = Greeter::start_on(&format!("127.0.0.3:{port}"), "none", &[]).await;
    api.put_slice(
        "prod",
        "greeter-a",
        "greeter",
        &[Ep::ready("127.0.0.2", "")],
        &[("grpc", port)],
    );
    api.put_slice(
        "staging",
        "greeter-a",
        "greeter",
        &[Ep::ready("127.0.0.3", "")],
        &[("grpc", port)],
    );
    // Slices of no Service (no label) are not asked for.
    api.put_raw(
        "prod",
        "orphan",
        serde_json::json!({"addressType": "IPv4", "metadata": {}, "endpoints": []}),
    );
    let lb = Lb::start_with_env(
        &["--registry", "k8s://"],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    )
    .await;
    lb.wait_ready(Duration::from_secs(15)).await;
    assert!(lb.knows_backend("greeter.prod", g1.addr));
    assert!(lb.knows_backend("greeter.staging", g2.addr));
    assert_eq!(lb.metric_sum("lb_registry_rejects_total"), 0.0);

    // Without any configuration the LB still starts, says why it has no
    // Kubernetes client, and is not ready.
    let lb = Lb::start_with_env(
        &["--registry", "k8s://prod"],
        &[
            ("KUBECONFIG", "/nonexistent/kubeconfig"),
            ("HOME", dir.path().to_str().unwrap()),
        ],
    )
    .await;
    assert!(
        wait_until(Duration::from_secs(5), || lb
            .log_lines("WARN")
            .iter()
            .any(|l| l.contains("no Kubernetes client configuration")))
        .await,
        "{:?}",
        std::fs::read_to_string(&lb.proc.log)
    );
    assert_eq!(lb.get("/readyz").0, 503);
}

/// A slice that stops parsing on the watch path (its gRPC port renamed,
/// its address type changed) takes its endpoints out of the lists, as a
/// re-list would; rejected, counted and logged. Fixed, they come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slice_that_stops_parsing_on_the_watch_leaves_the_lists() {
    let api = KubeApi::start(Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let port = free_port();
    let ports = [("grpc", port)];
    // Two well-formed slices of one service.
    let put_both = || {
        for (slice, ip) in [("greeter-a", "127.0.0.2"), ("greeter-b", "127.0.0.3")] {
            api.put_slice("prod", slice, "greeter", &[Ep::ready(ip, "")], &ports);
        }
    };
    put_both();
    let lb = Lb::start_with_env(
        &["--registry", "k8s://prod", "--k8s-port", "grpc"],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    )
    .await;
    lb.wait_ready(Duration::from_secs(15)).await;
    let (a, b) = (addr("127.0.0.2", port), addr("127.0.0.3", port));
    assert!(lb.knows_backend("greeter.prod", a) && lb.knows_backend("greeter.prod", b));

    // The port renamed over the watch: greeter-b no longer yields endpoints.
    api.put_slice(
        "prod",
        "greeter-b",
        "greeter",
        &[Ep::ready("127.0.0.3", "")],
        &[("grpc-v2", port)],
    );
    assert!(
        wait_until(Duration::from_secs(3), || !lb
            .knows_backend("greeter.prod", b))
        .await,
        "a slice whose port was renamed kept its endpoints: {:?}",
        lb.backends("greeter.prod")
    );
    assert!(lb.knows_backend("greeter.prod", a));
    assert!(lb.metric("lb_registry_rejects_total{source=\"k8s\",kind=\"bad_address\"}") >= 1.0);
    assert!(
        lb.log_lines("WARN")
            .iter()
            .any(|l| l.contains("prod/greeter-b")),
        "{:?}",
        lb.log_lines("WARN")
    );

    // The address type changed over the watch: the same.
    api.put_raw(
        "prod",
        "greeter-a",
        serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"labels": {"kubernetes.io/service-name": "greeter"}},
            "addressType": "FQDN", "endpoints": [{"addresses": ["greeter.example"]}],
            "ports": [{"name": "grpc", "port": port}]}),
    );
    assert!(
        wait_until(Duration::from_secs(3), || !lb
            .knows_backend("greeter.prod", a))
        .await,
        "a slice turned FQDN kept its endpoints: {:?}",
        lb.backends("greeter.prod")
    );

    // Fixed: back in the lists.
    put_both();
    assert!(
        wait_until(Duration::from_secs(3), || lb
            .knows_backend("greeter.prod", a)
            && lb.knows_backend("greeter.prod", b))
        .await,
        "{:?}",
        lb.backends("greeter.prod")
    );
}
