//! The admin HTTP endpoint: every endpoint, every error case, the auth
//! rules, Prometheus text checked by a parser, and the dashboard page driven
//! in headless Chromium against a running LB.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use lb_tests::browser::render;
use lb_tests::{
    channel, greeters, http_request, wait_backends, wait_until, Greeter, Lb, SecretFile,
};

const TOKEN: &str = "test-admin-token-0123456789";

/// An LB (embedded registry) whose admin token is read from a file.
async fn lb_with_token() -> (Lb, SecretFile) {
    let token_file = SecretFile::new(TOKEN);
    let lb = Lb::start(&[
        "--registry",
        "memory",
        "--admin-token-file",
        &token_file.path(),
    ])
    .await;
    (lb, token_file)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Sends a request to the admin port; returns status and parsed JSON body.
fn call(
    lb: &Lb,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let (status, text) = http_request(lb.admin, method, path, &headers, body.as_bytes()).unwrap();
    (status, json(&text))
}

fn backend_path(addr: SocketAddr, action: &str) -> String {
    format!("/api/v1/services/greeter/backends/{addr}/{action}")
}

fn entries_of(lb: &Lb, addr: SocketAddr) -> u64 {
    let (_, v) = call(lb, "GET", "/api/v1/services/greeter", None, "");
    v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == addr.to_string())
        .map(|b| b["list_entries"].as_u64().unwrap())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_endpoints_answer_and_errors_are_json() {
    let (lb, _dir) = lb_with_token().await;
    let gs = greeters(3, &format!("lb://{}", lb.addr), &[]).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 3, Duration::from_secs(10)).await);

    assert_eq!(lb.get("/healthz"), (200, "ok\n".to_string()));
    let (status, ready) = call(&lb, "GET", "/readyz", None, "");
    assert_eq!((status, ready["ready"].as_bool()), (200, Some(true)));

    let (status, all) = call(&lb, "GET", "/api/v1/services", None, "");
    assert_eq!(status, 200);
    assert_eq!(all["services"][0]["name"], "greeter");
    assert_eq!(all["services"][0]["backends"], 3);
    assert_eq!(all["services"][0]["listed"], 3);
    assert_eq!(all["services"][0]["clients"], 1);

    let (status, one) = call(&lb, "GET", "/api/v1/services/greeter", None, "");
    assert_eq!(status, 200);
    let backends = one["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 3);
    for b in backends {
        assert!(gs.iter().any(|g| b["address"] == g.addr.to_string()), "{b}");
        assert_eq!(b["health"], "serving");
        assert!(b["health_since"].is_string() && b["registered_at"].is_string());
        assert_eq!(b["source"], "memory");
        assert!(b["key"].as_str().unwrap().starts_with("greeter/"));
        assert_eq!(b["decision"]["listed"], true);
        assert!(b["decision"]["reason"]
            .as_str()
            .unwrap()
            .contains("serving"));
        assert!((b["list_share"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9);
    }
    assert!(one["list_version"].as_u64().unwrap() >= 1);

    let (status, clients) = call(&lb, "GET", "/api/v1/clients", None, "");
    assert_eq!(status, 200);
    let c = &clients["clients"][0];
    assert_eq!(c["service"], "greeter");
    assert!(c["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(c["lists_sent"].as_u64().unwrap() >= 1);

    // Error cases: JSON, right codes, counted.
    let (status, e) = call(&lb, "GET", "/api/v1/services/nope", None, "");
    assert_eq!(
        (status, e["error"].as_str()),
        (404, Some("unknown_service"))
    );
    let (status, e) = call(&lb, "GET", "/no/such/path", None, "");
    assert_eq!((status, e["error"].as_str()), (404, Some("not_found")));
    let (status, e) = call(&lb, "PATCH", "/api/v1/services", None, "");
    assert_eq!(
        (status, e["error"].as_str()),
        (405, Some("method_not_allowed"))
    );
    let (status, e) = call(&lb, "DELETE", "/metrics", None, "");
    assert_eq!(
        (status, e["error"].as_str()),
        (405, Some("method_not_allowed"))
    );
    assert!(e["detail"].is_string());
    assert!(lb.metric("lb_admin_errors_total{reason=\"unknown_service\"}") >= 1.0);
    // Refusals axum writes itself (a path that is not UTF-8 once decoded, a
    // body over the limit) are JSON too, and counted.
    let (status, e) = call(&lb, "GET", "/api/v1/services/gree%ecr", None, "");
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("bad_request")),
        "{e}"
    );
    let big = format!("{{\"weight\": 1, \"pad\": \"{}\"}}", "x".repeat(100_000));
    let (status, e) = call(
        &lb,
        "PUT",
        "/api/v1/services/greeter/backends/127.0.0.1:1/weight",
        Some(TOKEN),
        &big,
    );
    assert_eq!(
        (status, e["error"].as_str()),
        (413, Some("body_too_large")),
        "{e}"
    );
    assert!(lb.metric("lb_admin_errors_total{reason=\"bad_request\"}") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text() {
    let (lb, _dir) = lb_with_token().await;
    let _gs = greeters(2, &format!("lb://{}", lb.addr), &[]).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 2, Duration::from_secs(10)).await);
    let (status, body) = lb.get("/metrics");
    assert_eq!(status, 200);
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text");
    let names: std::collections::BTreeSet<&str> =
        scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    for expected in [
        "lb_streams_open",
        "lb_streams_total",
        "lb_lists_sent_total",
        "lb_list_push_seconds",
        "lb_registry_events_total",
        "lb_health_transitions_total",
        "lb_backends",
        "lb_list_version",
        "lb_backend_weight",
        "lb_backend_healthy",
    ] {
        assert!(
            names.contains(expected),
            "{expected} missing from /metrics: {names:?}"
        );
    }
    let healthy: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "lb_backend_healthy")
        .collect();
    assert_eq!(healthy.len(), 2);
    for s in healthy {
        assert_eq!(s.labels.get("service"), Some("greeter"));
        assert!(
            matches!(s.value, prometheus_parse::Value::Gauge(v) if v == 1.0),
            "{s:?}"
        );
    }
    assert_eq!(
        scrape.docs.get("lb_streams_open").map(String::as_str),
        Some("BalanceLoad streams open now.")
    );
    let push = scrape
        .samples
        .iter()
        .find(|s| s.metric == "lb_list_push_seconds")
        .expect("push latency");
    assert!(
        matches!(push.value, prometheus_parse::Value::Histogram(_)),
        "{push:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_need_the_token_and_change_lists() {
    let (lb, _dir) = lb_with_token().await;
    let gs = greeters(3, &format!("lb://{}", lb.addr), &[]).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 3, Duration::from_secs(10)).await);
    let target = gs[0].addr;

    // Auth: missing, malformed and wrong tokens are refused and change nothing.
    let (status, e) = call(&lb, "POST", &backend_path(target, "drain"), None, "");
    assert_eq!((status, e["error"].as_str()), (401, Some("unauthorized")));
    let (status, _) = call(
        &lb,
        "POST",
        &backend_path(target, "drain"),
        Some("wrong-token-wrong-token"),
        "",
    );
    assert_eq!(status, 401);
    let (status, _) = http_request(
        lb.admin,
        "POST",
        &backend_path(target, "drain"),
        &[("Authorization", TOKEN)],
        b"",
    )
    .unwrap();
    assert_eq!(status, 401, "a token without the Bearer scheme is refused");
    assert_eq!(
        entries_of(&lb, target),
        1,
        "a refused mutation changed the list"
    );
    assert!(lb.metric("lb_admin_errors_total{reason=\"unauthorized\"}") >= 3.0);

    // Drain: out of every client's list, still registered; undrain: back.
    let (status, ok) = call(&lb, "POST", &backend_path(target, "drain"), Some(TOKEN), "");
    assert_eq!((status, ok["ok"].as_bool()), (200, Some(true)));
    assert!(
        wait_backends(&ch, 2, Duration::from_secs(5)).await,
        "drained backend still in the client's list"
    );
    assert!(!ch.ready_backends().contains(&target));
    let (_, one) = call(&lb, "GET", "/api/v1/services/greeter", None, "");
    let row = one["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == target.to_string())
        .unwrap()
        .clone();
    assert_eq!(
        (row["drained"].as_bool(), row["decision"]["reason"].as_str()),
        (Some(true), Some("drained by an operator"))
    );
    let (status, _) = call(
        &lb,
        "POST",
        &backend_path(target, "undrain"),
        Some(TOKEN),
        "",
    );
    assert_eq!(status, 200);
    assert!(wait_backends(&ch, 3, Duration::from_secs(5)).await);

    // Weight override: validated, applied, expires by itself.
    for (body, error) in [
        ("{\"weight\": ", "bad_json"),
        ("{\"weight\": \"heavy\"}", "bad_json"),
        ("{\"weight\": 3, \"extra\": 1}", "bad_json"),
        ("{\"weight\": 0}", "bad_weight"),
        ("{\"weight\": 20000}", "bad_weight"),
        ("{\"weight\": 3, \"ttl_seconds\": 0}", "bad_ttl"),
    ] {
        let (status, e) = call(
            &lb,
            "PUT",
            &backend_path(target, "weight"),
            Some(TOKEN),
            body,
        );
        assert_eq!((status, e["error"].as_str()), (400, Some(error)), "{body}");
    }
    let (status, e) = call(
        &lb,
        "PUT",
        "/api/v1/services/greeter/backends/127.0.0.1:1/weight",
        Some(TOKEN),
        "{\"weight\": 2}",
    );
    assert_eq!(
        (status, e["error"].as_str()),
        (404, Some("unknown_backend"))
    );
    let (status, e) = call(
        &lb,
        "PUT",
        "/api/v1/services/greeter/backends/not-an-address/weight",
        Some(TOKEN),
        "{\"weight\": 2}",
    );
    assert_eq!((status, e["error"].as_str()), (400, Some("bad_address")));
    let (status, e) = call(
        &lb,
        "POST",
        "/api/v1/services/nope/backends/127.0.0.1:1/drain",
        Some(TOKEN),
        "",
    );
    assert_eq!(
        (status, e["error"].as_str()),
        (404, Some("unknown_service"))
    );

    let (status, _) = call(
        &lb,
        "PUT",
        &backend_path(target, "weight"),
        Some(TOKEN),
        "{\"weight\": 3, \"ttl_seconds\": 2}",
    );
    assert_eq!(status, 200);
    assert_eq!(entries_of(&lb, target), 3, "override not applied");
    assert!(
        wait_until(Duration::from_secs(5), || entries_of(&lb, target) == 1).await,
        "override did not expire"
    );
    let (status, _) = call(
        &lb,
        "PUT",
        &backend_path(target, "weight"),
        Some(TOKEN),
        "{\"weight\": 4}",
    );
    assert_eq!(status, 200);
    assert_eq!(entries_of(&lb, target), 4);
    let (status, _) = call(
        &lb,
        "DELETE",
        &backend_path(target, "weight"),
        Some(TOKEN),
        "",
    );
    assert_eq!(status, 200);
    assert_eq!(entries_of(&lb, target), 1, "override not cleared");
    assert_eq!(lb.metric("lb_admin_mutations_total{reason=\"drain\"}"), 1.0);
    assert_eq!(
        lb.metric("lb_admin_mutations_total{reason=\"weight_override\"}"),
        2.0
    );

    // Nothing a request sent broke anything.
    assert_eq!(lb.get("/healthz").0, 200);
    assert_eq!(lb_tests::call_n(&ch, 30).await.failed(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_are_disabled_without_a_token() {
    let lb = Lb::start(&["--registry", "memory"]).await;
    let g = Greeter::start(&format!("lb://{}", lb.addr), &[]).await;
    assert!(g.wait_registered(Duration::from_secs(10)).await);
    let (status, e) = call(&lb, "POST", &backend_path(g.addr, "drain"), Some(TOKEN), "");
    assert_eq!(
        (status, e["error"].as_str()),
        (403, Some("mutations_disabled"))
    );
    assert!(e["detail"].as_str().unwrap().contains("--admin-token-file"));
}

/// The admin token is read from a file or the environment, never from the
/// command line (where every local user could read it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_comes_from_a_file_or_the_environment_never_a_flag() {
    let flag = std::process::Command::new(lb_tests::bin("lb-server"))
        .args(["--admin-token", TOKEN])
        .output()
        .unwrap();
    assert!(!flag.status.success(), "--admin-token must not be a flag");
    let help = std::process::Command::new(lb_tests::bin("lb-server"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--admin-token-file") && !help.contains("--admin-token <"),
        "{help}"
    );

    let lb = Lb::start_with_env(&["--registry", "memory"], &[("LB_ADMIN_TOKEN", TOKEN)]).await;
    let g = Greeter::start(&format!("lb://{}", lb.addr), &[]).await;
    assert!(g.wait_registered(Duration::from_secs(10)).await);
    let path = backend_path(g.addr, "drain");
    assert_eq!(call(&lb, "POST", &path, None, "").0, 401);
    assert_eq!(
        call(&lb, "POST", &path, Some("wrong-token-0123456789"), "").0,
        401
    );
    let (status, body) = call(&lb, "POST", &path, Some(TOKEN), "");
    assert_eq!(status, 200, "{body}");
    // Too short a token is refused at start.
    let short = std::process::Command::new(lb_tests::bin("lb-server"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env("LB_ADMIN_TOKEN", "short")
        .output()
        .unwrap();
    assert!(!short.status.success());
    assert!(String::from_utf8_lossy(&short.stderr).contains("at least 16 characters"));
}

/// The part of the rendered DOM that is one backend's table row.
fn row(dom: &str, addr: SocketAddr) -> &str {
    let start = dom
        .find(&format!("data-backend=\"{addr}\""))
        .unwrap_or_else(|| panic!("{addr} not on the page"));
    let end = dom[start..]
        .find("</tr>")
        .map(|e| start + e)
        .unwrap_or(dom.len());
    &dom[start..end]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_backends_and_reflects_a_drain_in_chromium() {
    let (lb, _dir) = lb_with_token().await;
    let gs = greeters(3, &format!("lb://{}", lb.addr), &[]).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 3, Duration::from_secs(10)).await);
    let url = format!("http://{}/", lb.admin);

    let dom = render(&url, None).await;
    assert!(
        dom.contains("data-service=\"greeter\""),
        "service missing from the page: {dom}"
    );
    for g in &gs {
        let r = row(&dom, g.addr);
        assert!(r.contains("serving"), "{r}");
        assert!(!r.contains("drained"), "{r}");
    }

    let target = gs[1].addr;
    let (status, _) = call(&lb, "POST", &backend_path(target, "drain"), Some(TOKEN), "");
    assert_eq!(status, 200);
    let dom = render(&url, None).await;
    assert!(
        row(&dom, target).contains("drained"),
        "drain not shown: {}",
        row(&dom, target)
    );
    assert!(!row(&dom, gs[0].addr).contains("drained"));

    // A backend that flapped (SERVING → NOT_SERVING → SERVING) shows its two
    // transitions of the last 10 minutes; the others show none.
    let flapper = gs[2].addr;
    let flaps = |addr: SocketAddr| -> u64 {
        let (_, body) = lb.get("/api/v1/services/greeter");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["address"] == addr.to_string())
            .and_then(|b| b["health_transitions_10m"].as_u64())
            .unwrap_or_else(|| panic!("no health_transitions_10m for {addr}: {body}"))
    };
    assert_eq!(flaps(flapper), 0, "a steady backend counted transitions");
    for serving in [false, true] {
        assert_eq!(gs[2].toggle_health().await, serving);
        assert!(
            wait_until(Duration::from_secs(5), || ch
                .ready_backends()
                .contains(&flapper)
                == serving)
            .await
        );
    }
    assert_eq!(flaps(flapper), 2);
    assert_eq!(flaps(gs[0].addr), 0);
    let dom = render(&url, None).await;
    assert!(
        row(&dom, flapper).contains("2 in 10 min"),
        "flaps not shown: {}",
        row(&dom, flapper)
    );
    assert!(
        !row(&dom, gs[0].addr).contains("in 10 min"),
        "{}",
        row(&dom, gs[0].addr)
    );

    let shot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-logs/dashboard.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    render(&url, Some(&shot)).await;
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "screenshot missing or empty ({size} bytes)");
    eprintln!("dashboard screenshot: {}", shot.display());
}
