//! Requests to the admin HTTP port: any method, path, Authorization header
//! and body, through the real router over a catalog with one backend. No
//! request may panic a handler or get a 5xx; every 4xx is a JSON error.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::extract::ConnectInfo;
use http_body_util::BodyExt;
use lb_server::internals::{router, AdminState, Catalog, Instance, Metrics};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const TOKEN: &str = "fuzz-admin-token-0123456789";

fn setup() -> &'static (tokio::runtime::Runtime, axum::Router) {
    static SETUP: OnceLock<(tokio::runtime::Runtime, axum::Router)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let metrics = Arc::new(Metrics::new());
        let catalog = Arc::new(Catalog::new(Default::default(), metrics.clone(), 1, false));
        catalog
            .upsert(
                "memory",
                Instance {
                    service: "greeter".into(),
                    key: "greeter/127.0.0.1:5000".into(),
                    addr: "127.0.0.1:5000".parse().unwrap(),
                    weight: 1,
                    metadata: None,
                    registered_at: std::time::SystemTime::now(),
                },
            )
            .expect("upsert");
        catalog.mark_synced("memory");
        let router = router(AdminState {
            catalog,
            sessions: Default::default(),
            subsets: Arc::new(lb_server::internals::Subsets::new(0)),
            zones: Arc::new(lb_server::internals::Zones::disabled(metrics.clone())),
            history: Arc::new(lb_server::internals::History::new(
                lb_server::internals::HistorySettings {
                    interval: std::time::Duration::from_secs(10),
                    window: std::time::Duration::from_secs(60),
                    events: 16,
                    max_services: 4,
                    max_backends: 16,
                    rate_window: std::time::Duration::from_secs(20),
                },
            )),
            cluster: None,
            metrics,
            registry: "memory".into(),
            token: Some(Arc::from(TOKEN)),
        });
        (runtime, router)
    })
}

fuzz_target!(|data: &[u8]| {
    let (runtime, router) = setup();
    // Byte 0: method; then the path up to '\n'; then an Authorization value
    // up to '\n' ("=" stands for the right token); the rest is the body.
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let method = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"][m as usize % 7];
    let mut parts = rest.splitn(3, |b| *b == b'\n');
    let path = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let auth = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default().to_vec();
    let mut request = axum::http::Request::builder()
        .method(method)
        .uri(format!("/{path}"));
    if auth == b"=" {
        request = request.header("authorization", format!("Bearer {TOKEN}"));
    } else if !auth.is_empty() {
        request = request.header("authorization", auth);
    }
    let Ok(mut request) = request.body(Body::from(body)) else {
        return;
    };
    let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
    request.extensions_mut().insert(ConnectInfo(peer));
    runtime.block_on(async {
        let response = router.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        assert!(!status.is_server_error(), "{method} /{path}: {status}");
        if status.is_client_error() && method != "HEAD" {
            let bytes = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("{status} body is not JSON ({e}): {bytes:?}"));
            assert!(v["error"].is_string(), "{v}");
        }
    });
});
