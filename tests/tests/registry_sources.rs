//! Several registry sources behind one LB: each service comes from one
//! source; a service two sources define is served from the first given in
//! `--registry`, and the conflict is reported (admin API, metric, log) until
//! it is resolved.

use std::time::Duration;

use lb_tests::{channel, wait_until, Greeter, Lb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_combine_and_a_shared_service_is_a_reported_conflict() {
    let from_file = Greeter::start("none", &[]).await;
    let only_in_file = Greeter::start("none", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("services.json");
    std::fs::write(
        &file,
        serde_json::json!({
            "greeter": [from_file.addr.to_string()],
            "archive": [only_in_file.addr.to_string()],
        })
        .to_string(),
    )
    .unwrap();
    // Both sources in one env var, space-separated; the embedded registry first.
    let registry = format!("memory file://{}", file.display());
    let lb = Lb::start_with_env(&[], &[("LB_REGISTRY", &registry)]).await;
    let mut from_memory = Greeter::start(&format!("lb://{}", lb.addr), &[]).await;
    assert!(from_memory.wait_registered(Duration::from_secs(10)).await);
    lb.wait_ready(Duration::from_secs(10)).await;

    // greeter: the embedded registry's backend only, and the conflict shown.
    let ch = channel("greeter", &[lb.addr]);
    assert!(lb_tests::wait_backends(&ch, 1, Duration::from_secs(10)).await);
    assert!(
        wait_until(Duration::from_secs(3), || ch.ready_backends()
            == vec![from_memory.addr])
        .await,
        "{:?}",
        ch.ready_backends()
    );
    let (_, body) = lb.get("/api/v1/services/greeter");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let conflict = v["conflict"].as_str().unwrap_or_default();
    assert!(
        conflict.contains("memory") && conflict.contains("file"),
        "{body}"
    );
    let ignored = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == from_file.addr.to_string())
        .expect("the file's backend is known");
    assert_eq!(ignored["decision"]["listed"], false);
    assert!(
        ignored["decision"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("conflict"),
        "{ignored}"
    );
    assert_eq!(lb.metric("lb_registry_conflicts{service=\"greeter\"}"), 1.0);

    // A service only the file defines is served from it.
    let archive = channel("archive", &[lb.addr]);
    assert!(lb_tests::wait_backends(&archive, 1, Duration::from_secs(10)).await);
    assert_eq!(archive.ready_backends(), vec![only_in_file.addr]);

    // The embedded registration goes: the file's backend takes over, the
    // conflict is over.
    tokio::task::block_in_place(|| from_memory.proc.terminate(Duration::from_secs(10)));
    assert!(
        wait_until(Duration::from_secs(5), || ch.ready_backends()
            == vec![from_file.addr])
        .await,
        "{:?}",
        ch.ready_backends()
    );
    let (_, body) = lb.get("/api/v1/services/greeter");
    assert!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["conflict"].is_null(),
        "{body}"
    );
    assert_eq!(lb.metric("lb_registry_conflicts{service=\"greeter\"}"), 0.0);
}

/// An LB starting on 1,500 services says so in a summary, not in a few
/// lines per service (new service, listed, list changed, first health
/// result); once started, a new service is logged on its own again. The
/// backends are down (one address nobody listens on): their first checks
/// fail at once and stay failed, so every line past the startup would be a
/// real change. (1,500 probes of one live greeter would overflow its listen
/// backlog and flap.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_registry_at_startup_is_summarized_not_logged_per_service() {
    const SERVICES: usize = 1_500;
    let backend: std::net::SocketAddr = format!("127.0.0.1:{}", lb_tests::free_port())
        .parse()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("services.json");
    let mut services: serde_json::Map<String, serde_json::Value> = (0..SERVICES)
        .map(|i| {
            (
                format!("svc-{i:04}"),
                serde_json::json!([backend.to_string()]),
            )
        })
        .collect();
    std::fs::write(
        &file,
        serde_json::Value::Object(services.clone()).to_string(),
    )
    .unwrap();
    let lb = Lb::start(&["--registry", &format!("file://{}", file.display())]).await;
    lb.wait_ready(Duration::from_secs(10)).await;
    let listed = || {
        let v = lb.json("/api/v1/services");
        v.as_array()
            .or_else(|| v["services"].as_array())
            .map(|a| a.len())
            .unwrap_or(0)
    };
    assert_eq!(listed(), SERVICES);
    // Past the first health results of every backend.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let info = lb.log_lines("INFO");
    assert!(
        info.len() <= 50,
        "{} INFO lines at startup; the first ones: {:#?}",
        info.len(),
        &info[..info.len().min(10)]
    );
    assert!(
        info.iter().any(|l| l.contains("registry listed at startup")
            && l.contains(&format!("services={SERVICES}"))),
        "no startup summary: {info:#?}"
    );

    // Started: a service added now is logged as before.
    services.insert("late".into(), serde_json::json!([backend.to_string()]));
    std::fs::write(&file, serde_json::Value::Object(services).to_string()).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || lb
            .log_lines("INFO")
            .iter()
            .any(|l| l.contains("new service") && l.contains("late")))
        .await,
        "{:#?}",
        lb.log_lines("INFO")
    );
}
