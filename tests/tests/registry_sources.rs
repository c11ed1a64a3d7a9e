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
