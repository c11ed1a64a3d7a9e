//! History, as an operator reads it after the fact: calls flowing, a
//! backend drained and another killed, then the history JSON and the
//! dashboard's service, clients and cluster pages in headless Chromium
//! (DOM checked, screenshot saved under target/test-logs/).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use lb_tests::browser::render;
use lb_tests::{channel, greeters, http_request, wait_backends, wait_until, Caller, Lb};

const TOKEN: &str = "history-test-token-0123456789";

fn series(h: &serde_json::Value, addr: SocketAddr) -> &serde_json::Value {
    h["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == addr.to_string())
        .unwrap_or_else(|| panic!("no series for {addr}: {h}"))
}

fn last(v: &serde_json::Value) -> &serde_json::Value {
    v.as_array()
        .and_then(|a| a.last())
        .expect("a non-empty series")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_and_a_kill_show_in_the_history_and_on_the_dashboard() {
    let (lb, _token) = Lb::with_admin_token(
        TOKEN,
        &[
            // Two client-stats reports per sample: steady call rates.
            "--client-stats-interval",
            "250ms",
            "--history-interval",
            "500ms",
            "--history-window",
            "60s",
        ],
    )
    .await;
    let mut gs = greeters(3, &format!("lb://{}", lb.addr), &[]).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 3, Duration::from_secs(10)).await);
    let caller = Caller::start(&ch, 2, Duration::from_millis(10));
    tokio::time::sleep(Duration::from_secs(3)).await;

    let (drained, killed) = (gs[1].addr, gs[2].addr);
    let auth = format!("Bearer {TOKEN}");
    let path = format!("/api/v1/services/greeter/backends/{drained}/drain");
    let (status, body) = http_request(
        lb.admin,
        "POST",
        &path,
        &[("Authorization", auth.as_str())],
        b"",
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gs[2].proc.kill();
    let history = || lb.json("/api/v1/services/greeter/history");
    assert!(
        wait_until(Duration::from_secs(5), || last(
            &series(&history(), killed)["health"]
        ) == "down")
        .await,
        "the killed backend never shows down: {}",
        history()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = caller.stop().await;
    assert!(calls.ok() > 100, "calls flowed: {}", calls.ok());

    // The JSON: aligned series, a call rate, both changes in series and events.
    let h = history();
    let n = h["samples"].as_u64().unwrap() as usize;
    assert!(n >= 10, "{n} samples");
    assert_eq!(h["times"].as_array().unwrap().len(), n);
    let times: Vec<u64> = h["times"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
    for b in h["backends"].as_array().unwrap() {
        for key in ["share", "weight", "utilization", "health"] {
            assert_eq!(
                b[key].as_array().unwrap().len(),
                n,
                "{key} of {}",
                b["address"]
            );
        }
    }
    let rates: Vec<f64> = h["calls_per_second"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_f64())
        .collect();
    assert!(rates.iter().any(|r| *r > 10.0), "no call rate: {rates:?}");
    let d = series(&h, drained);
    assert_eq!(last(&d["health"]), "drained");
    assert_eq!(last(&d["share"]).as_f64(), Some(0.0));
    assert!(
        d["share"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.as_f64().is_some_and(|s| (s - 1.0 / 3.0).abs() < 0.01)),
        "a third of the list before the drain: {}",
        d["share"]
    );
    let events = h["events"].as_array().unwrap();
    let kinds = |kind: &str, addr: SocketAddr| {
        events
            .iter()
            .filter(|e| e["kind"] == kind && e["backend"] == addr.to_string())
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(kinds("drained", drained).len(), 1, "{events:?}");
    let down = kinds("health", killed);
    assert!(
        down.iter()
            .any(|e| e["from"] == "serving" && e["to"] == "unreachable"),
        "{down:?}"
    );
    assert_eq!(kinds("registered", gs[0].addr).len(), 1);
    let versions: Vec<u64> = events
        .iter()
        .filter(|e| e["kind"] == "list")
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert!(
        versions.len() >= 3 && versions.windows(2).all(|w| w[0] < w[1]),
        "{versions:?}"
    );
    assert_eq!(h["untracked"]["events_lost"], 0);

    // The service page draws the same: the calls chart, each backend's
    // health strip and share sparkline, the drain and the kill in the timeline.
    let url = format!("http://{}/#/service/greeter", lb.admin);
    let dom = render(&url, None).await;
    assert!(dom.contains("data-page=\"service\""), "{dom}");
    let calls_path = dom
        .split("data-series=\"calls\" d=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no calls chart: {dom}"));
    assert!(
        calls_path.matches('L').count() >= 5,
        "calls line: {calls_path}"
    );
    let row_of = |addr: SocketAddr| {
        let start = dom
            .find(&format!("<tr data-backend=\"{addr}\""))
            .unwrap_or_else(|| panic!("no row for {addr}: {dom}"));
        let end = dom[start..].find("</tr>").unwrap() + start;
        dom[start..end].to_string()
    };
    assert!(
        row_of(killed).contains("data-state=\"down\""),
        "{}",
        row_of(killed)
    );
    assert!(
        row_of(drained).contains("data-state=\"drained\""),
        "{}",
        row_of(drained)
    );
    assert!(
        !row_of(gs[0].addr).contains("data-state=\"down\""),
        "{}",
        row_of(gs[0].addr)
    );
    assert!(row_of(gs[0].addr).contains("data-series=\"share\""));
    let event_row = |kind: &str, addr: SocketAddr| {
        let tag = format!("<tr class=\"event\" data-kind=\"{kind}\" data-backend=\"{addr}\">");
        let start = dom
            .find(&tag)
            .unwrap_or_else(|| panic!("no {kind} event for {addr}: {dom}"));
        let end = dom[start..].find("</tr>").unwrap() + start;
        dom[start..end].to_string()
    };
    assert!(event_row("drained", drained).contains("drained by an operator"));
    assert!(
        dom.contains("serving → unreachable"),
        "{}",
        event_row("health", killed)
    );
    assert!(
        dom.matches("class=\"ev ev-health\"").count() >= 1,
        "timeline ticks"
    );

    // The overview shows each backend's last hour beside its row.
    let overview = render(&format!("http://{}/", lb.admin), None).await;
    assert!(
        overview.contains("class=\"spark health-strip\""),
        "{overview}"
    );

    // The clients and cluster pages.
    let watcher = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&watcher, 1, Duration::from_secs(5)).await);
    let clients = render(&format!("http://{}/#/clients", lb.admin), None).await;
    assert!(clients.contains("data-page=\"clients\""), "{clients}");
    assert!(
        clients.matches("<tr data-client=").count() >= 1,
        "{clients}"
    );
    let cluster = render(&format!("http://{}/#/cluster", lb.admin), None).await;
    assert!(cluster.contains("Not clustered"), "{cluster}");

    let shot =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-logs/dashboard-history.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    render(&url, Some(&shot)).await;
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "screenshot missing or empty ({size} bytes)");
    eprintln!("history screenshot: {}", shot.display());
}

#[tokio::test]
async fn history_is_bounded_by_its_caps_and_says_what_it_left_out() {
    let lb = Lb::start(&[
        "--registry",
        "memory",
        "--history-interval",
        "200ms",
        "--history-window",
        "1s",
        "--history-max-services",
        "1",
        "--history-max-backends",
        "2",
        "--history-events",
        "3",
    ])
    .await;
    let _gs = greeters(3, &format!("lb://{}", lb.addr), &[]).await;
    let _other = greeters(1, &format!("lb://{}", lb.addr), &["--service", "other"]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let services = lb.json("/api/v1/services");
    let names: Vec<&str> = services["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2);
    let (with, without): (Vec<&str>, Vec<&str>) = names
        .iter()
        .partition(|n| lb.get(&format!("/api/v1/services/{n}/history")).0 == 200);
    assert_eq!(
        (with.len(), without.len()),
        (1, 1),
        "one service within the cap"
    );
    let (status, body) = lb.get(&format!("/api/v1/services/{}/history", without[0]));
    assert_eq!(status, 404);
    assert!(
        body.contains("no_history") && body.contains("--history-max-services"),
        "{body}"
    );
    let h = lb.json(&format!("/api/v1/services/{}/history", with[0]));
    assert_eq!(h["samples"], 5, "1 s at 200 ms");
    assert!(h["backends"].as_array().unwrap().len() <= 2);
    assert!(h["events"].as_array().unwrap().len() <= 3);
    assert_eq!(h["untracked"]["services"], 1);
    if with[0] == "greeter" {
        assert_eq!(h["untracked"]["backends"], 1, "{}", h["untracked"]);
    }
    assert_eq!(lb.get("/api/v1/services/nope/history").0, 404);
}
