//! Stock gRPC clients balance through the LB unchanged (DESIGN §4, 11):
//! gRPC C-core through Python `grpcio`, finding the LB via DNS SRV.
//!
//! Needs a Python with `grpcio` and `dnslib`: `$LB_TEST_PYTHON`, or the
//! `.venv` that `scripts/test` creates at the workspace root.

use lb_tests::Lb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_balances_through_the_lb_via_dns_srv() {
    let lb = Lb::embedded(&[]).await;
    let greeters = lb_tests::greeters(3, &format!("lb://{}", lb.addr), &[]).await;
    let summary = lb_tests::grpcio_client(lb.addr, "greeter.svc.test", 300, 2.5).await;
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
