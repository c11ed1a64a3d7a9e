//! Stock gRPC clients balance through the LB unchanged (DESIGN §4, 11):
//! gRPC C-core through Python `grpcio`, finding the LB via DNS SRV.
//!
//! Needs a Python with `grpcio` and `dnslib`: `$LB_TEST_PYTHON`, or the
//! `.venv` that `scripts/test` creates at the workspace root.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use lb_tests::Lb;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn python() -> PathBuf {
    let python = std::env::var_os("LB_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/bin/python"));
    assert!(
        python.exists(),
        "{} not found: run scripts/test (it creates .venv with grpcio and dnslib), \
         or set LB_TEST_PYTHON to a Python that has them",
        python.display()
    );
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_balances_through_the_lb_via_dns_srv() {
    let lb = Lb::start(&[
        "--registry",
        "memory",
        "--domain-suffix",
        ".svc.test",
        "--client-stats-interval",
        "200ms",
    ])
    .await;
    let greeters = lb_tests::greeters(3, &format!("lb://{}", lb.addr), &[]).await;
    let script = workspace().join("tests/interop/grpclb_client.py");
    let child = tokio::process::Command::new(python())
        .arg(&script)
        .args([
            "--lb-port",
            &lb.addr.port().to_string(),
            "--host",
            "greeter.svc.test",
            "--calls",
            "300",
            "--linger",
            "2.5",
        ])
        .env("GRPC_DNS_RESOLVER", "ares")
        .env("GRPC_VERBOSITY", "ERROR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start python");
    let out = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .expect("python client did not finish within 90 s")
        .expect("python client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client failed: {stdout}\n{stderr}"
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("bad output ({e}): {stdout}\n{stderr}"));
    eprintln!("grpcio summary: {summary}");
    assert_eq!(
        summary["failures"].as_array().map(Vec::len),
        Some(0),
        "{summary}"
    );

    let (_, services) = lb.get("/api/v1/services/greeter");
    for g in &greeters {
        let addr = g.addr.to_string();
        let n = summary["per_backend"][&addr].as_u64().unwrap_or(0);
        assert!(
            (90..=110).contains(&n),
            "backend {addr} got {n} of 300 grpcio calls: {summary}"
        );
        let token = summary["tokens"][&addr].as_str().unwrap_or("");
        assert!(!token.is_empty(), "grpcio sent no lb-token to {addr}");
        assert!(
            services.contains(token),
            "token {token} for {addr} is not the LB's: {services}"
        );
    }
    // The stock client opened a stream and reported client stats on it.
    assert!(lb.metric("lb_streams_total") >= 1.0);
    let started = lb.metric("lb_client_calls_total{service=\"greeter\",kind=\"started\"}");
    let received = lb.metric("lb_client_calls_total{service=\"greeter\",kind=\"known_received\"}");
    eprintln!("client stats from grpcio: started {started}, known received {received}");
    assert!(
        started > 0.0 && received > 0.0,
        "no client stats from grpcio"
    );
}
