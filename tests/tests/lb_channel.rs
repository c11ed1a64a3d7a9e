//! `LbChannel` as a tonic user meets it, against stock grpc-go backends:
//! backpressure a caller can see (`poll_ready`), the channel's load for
//! tower's balancers and limiters, and gRPC retry policies with throttling
//! (gRFC A6).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_client::DEFAULT_CONCURRENCY_LIMIT;
use lb_client::{LbChannel, Registration, RegistrationOptions, RetryPolicy, RetryThrottling};
use lb_proto::helloworld::{greeter_client::GreeterClient, HelloRequest};
use lb_tests::stock::{stock_fleet, stock_fleet_of, Stock, StockBackend};
use lb_tests::{wait_until, Caller};
use tonic::Code;
use tower::load::Load;
use tower::ServiceExt;

/// Callers started at once.
const CALLERS: usize = 10_000;
/// Concurrent streams each backend allows per connection.
const BACKEND_STREAMS: &str = "100";
/// How long each backend holds an answer.
const BACKEND_DELAY: &str = "100ms";

/// This process's resident memory, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// What one burst of callers did to a channel.
struct Burst {
    /// Most calls the channel held in flight at once (sampled every 2 ms).
    peak_in_flight: usize,
    /// Whether a caller asking for readiness at the peak had to wait.
    ready_waited: bool,
    ok: usize,
    took: Duration,
    rss_growth_kib: i64,
}

/// Starts [`CALLERS`] calls at once through `channel` (each a tonic client
/// that waits in `ready()` first, as generated clients do) and watches the
/// channel's load until all are answered.
async fn burst(channel: &LbChannel, limit: Option<usize>) -> Burst {
    let rss_before = rss_kib() as i64;
    let ok = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (channel, done, peak) = (channel.clone(), done.clone(), peak.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(channel.load(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let started = Instant::now();
    let calls: Vec<_> = (0..CALLERS)
        .map(|i| {
            let (channel, ok) = (channel.clone(), ok.clone());
            tokio::spawn(async move {
                let mut client = GreeterClient::new(channel);
                let reply = client
                    .say_hello(HelloRequest {
                        name: format!("caller {i}"),
                    })
                    .await;
                if reply.is_ok() {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Once the calls have piled up (to the limit, if any), one more caller
    // asks for readiness.
    let piled = limit.unwrap_or(DEFAULT_CONCURRENCY_LIMIT);
    wait_until(Duration::from_secs(10), || channel.in_flight() >= piled).await;
    let ready_waited = tokio::time::timeout(Duration::from_millis(50), channel.clone().ready())
        .await
        .is_err();
    let rss_peak = rss_kib() as i64;
    for c in calls {
        c.await.expect("caller");
    }
    let took = started.elapsed();
    done.store(true, Ordering::Relaxed);
    sampler.await.expect("sampler");
    Burst {
        peak_in_flight: peak.load(Ordering::Relaxed),
        ready_waited,
        ok: ok.load(Ordering::Relaxed),
        took,
        rss_growth_kib: rss_peak - rss_before,
    }
}

/// 10,000 callers at once against two stock grpc-go backends that take 100
/// concurrent streams each and answer in 100 ms: with the default limit the
/// channel holds at most [`DEFAULT_CONCURRENCY_LIMIT`] calls, a further
/// caller waits in `poll_ready`, and every call is answered. The same
/// burst on a channel without a limit queues every call inside it (which is
/// what the limit is for, and what shows this test can fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_callers_wait_in_poll_ready_not_inside_the_channel() {
    let (lb, backends, _registrations) = stock_fleet(
        2,
        &["-max-streams", BACKEND_STREAMS, "-delay", BACKEND_DELAY],
    )
    .await;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let connect = |limit: Option<usize>| {
        LbChannel::builder("greeter")
            .lb(lb.addr.to_string())
            .concurrency_limit(limit)
            .build()
            .expect("channel")
    };
    for (name, limit) in [
        ("default limit", Some(DEFAULT_CONCURRENCY_LIMIT)),
        ("no limit", None),
    ] {
        let channel = connect(limit);
        assert!(
            wait_until(Duration::from_secs(10), || {
                let ready = channel.ready_backends();
                addrs.iter().all(|a| ready.contains(a))
            })
            .await,
            "the channel never connected to {addrs:?}"
        );
        let b = burst(&channel, limit).await;
        eprintln!(
            "backpressure, {name}: {CALLERS} callers, peak in flight {}, a caller at the peak \
             waited in poll_ready: {}, {} ok in {:.1?}, RSS growth {} KiB",
            b.peak_in_flight, b.ready_waited, b.ok, b.took, b.rss_growth_kib
        );
        assert_eq!(b.ok, CALLERS, "{name}: not every call was answered");
        assert_eq!(channel.in_flight(), 0, "{name}: calls left in flight");
        match limit {
            Some(limit) => {
                assert!(
                    b.peak_in_flight <= limit,
                    "{name}: {} calls in flight over the limit of {limit}",
                    b.peak_in_flight
                );
                assert!(
                    b.peak_in_flight >= limit / 2,
                    "{name}: the burst never neared the limit ({} in flight)",
                    b.peak_in_flight
                );
                assert!(
                    b.ready_waited,
                    "{name}: poll_ready was ready with {limit} calls in flight"
                );
            }
            None => assert!(
                b.peak_in_flight > 4 * DEFAULT_CONCURRENCY_LIMIT,
                "{name}: without a limit the burst should queue inside the channel; peak {}",
                b.peak_in_flight
            ),
        }
    }
}

/// A rolling restart done the hard way: three stock grpc-go backends
/// answering in 200 ms are killed (SIGKILL) one after another, each
/// replaced by a new instance, while two channels keep 15 calls each in
/// flight. The calls a killed backend had in flight fail UNAVAILABLE; the
/// channel with the common recipe (`maxAttempts: 2` on UNAVAILABLE) sends
/// them again to another backend and its callers see no failure, while
/// the channel without a policy passes them on (which shows the test can
/// fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_policy_carries_calls_through_a_rolling_restart() {
    let args = ["-delay", "200ms"];
    let (lb, mut backends, mut registrations) = stock_fleet(3, &args).await;
    let registry = format!("lb://{}", lb.addr);
    let channel = |policy: Option<RetryPolicy>| {
        let mut b = LbChannel::builder("greeter").lb(lb.addr.to_string());
        if let Some(p) = policy {
            b = b.retry_policy("helloworld.Greeter", p);
        }
        b.build().expect("channel")
    };
    let plain = channel(None);
    let retrying = channel(Some(RetryPolicy::new(2, [Code::Unavailable])));
    for c in [&plain, &retrying] {
        assert!(
            wait_until(Duration::from_secs(10), || c.ready_backends().len() == 3).await,
            "the channel never connected to the three backends"
        );
    }
    let callers = [
        Caller::start(&plain, 15, Duration::ZERO),
        Caller::start(&retrying, 15, Duration::ZERO),
    ];
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..3 {
        backends[i].proc.kill();
        let replacement = StockBackend::start_with(Stock::GrpcGo, &args).await;
        registrations.push(
            Registration::start(
                &registry,
                "greeter",
                &replacement.addr.to_string(),
                RegistrationOptions::default(),
            )
            .expect("register"),
        );
        backends.push(replacement);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let [plain_callers, retrying_callers] = callers;
    let (plain, retried) = (plain_callers.stop().await, retrying_callers.stop().await);
    let (plain_ok, plain_failed) = (plain.ok(), plain.failures);
    let (retry_ok, retry_failed) = (retried.ok(), retried.failures);
    let retries = retrying.counters().retries;
    eprintln!(
        "rolling restart: without a policy {plain_ok} ok, {} failed {:?}; with maxAttempts 2 on \
         UNAVAILABLE {retry_ok} ok, {} failed, {retries} retries",
        plain_failed.len(),
        plain_failed.first(),
        retry_failed.len()
    );
    assert!(
        !plain_failed.is_empty(),
        "no call was in flight on a killed backend: the restart proved nothing"
    );
    assert!(
        retry_failed.is_empty(),
        "calls failed despite the retry policy: {retry_failed:?}"
    );
    assert!(retries > 0, "the policy never retried");
    assert!(retry_ok > 100, "too few calls: {retry_ok}");
}

/// Retry throttling (A6 `retryThrottling`): against backends that fail
/// every call with UNAVAILABLE (their health checks pass), a channel
/// allowed 3 attempts per call retries every call twice, while the same
/// policy with throttling (10 tokens, 0.1 per success) stops retrying once
/// half the tokens are gone: retries cannot multiply an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_stops_retries_when_most_calls_fail() {
    let (lb, _backends, _registrations) = stock_fleet(2, &["-fail-code", "14"]).await;
    let policy = RetryPolicy::new(3, [Code::Unavailable]).backoff(
        Duration::from_millis(1),
        Duration::from_millis(5),
        2.0,
    );
    let channel = |throttled: bool| {
        let mut b = LbChannel::builder("greeter")
            .lb(lb.addr.to_string())
            .retry_policy("helloworld.Greeter/SayHello", policy.clone());
        if throttled {
            b = b.retry_throttling(RetryThrottling {
                max_tokens: 10,
                token_ratio: 0.1,
            });
        }
        b.build().expect("channel")
    };
    const CALLS: usize = 100;
    let mut retries = Vec::new();
    for throttled in [false, true] {
        let c = channel(throttled);
        assert!(
            wait_until(Duration::from_secs(10), || c.ready_backends().len() == 2).await,
            "the channel never connected to the backends"
        );
        let mut client = GreeterClient::new(c.clone());
        for i in 0..CALLS {
            let status = client
                .say_hello(HelloRequest {
                    name: format!("call {i}"),
                })
                .await
                .expect_err("every call fails");
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        }
        retries.push(c.counters().retries);
    }
    eprintln!(
        "throttling: {CALLS} calls failing UNAVAILABLE, 3 attempts allowed: {} retries without \
         throttling, {} with 10 tokens",
        retries[0], retries[1]
    );
    assert_eq!(retries[0], 2 * CALLS as u64, "every call retried twice");
    assert!(
        retries[1] <= 5,
        "throttling let {} retries through",
        retries[1]
    );
}

/// grpclb fallback as C-core has it: the fallback backends serve not only
/// when no LB ever answered, but also once the LB is lost and every backend
/// of its last list has failed. The LB's loss alone changes nothing (the
/// last list serves on); a backend of that list dying then leaves the
/// channel to its fallback backend, a stock grpc-go server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_serves_once_the_lb_and_every_listed_backend_are_gone() {
    let (mut lb, mut backends, _registrations) = stock_fleet(1, &[]).await;
    let listed = backends[0].addr;
    let fallback = StockBackend::start(Stock::GrpcGo).await;
    let channel = LbChannel::builder("greeter")
        .lb(lb.addr.to_string())
        .fallback_backends([fallback.addr])
        .build()
        .expect("channel");
    assert!(
        wait_until(Duration::from_secs(10), || channel.ready_backends()
            == vec![listed])
        .await,
        "the channel never used the listed backend: {:?}",
        channel.ready_backends()
    );
    let client = GreeterClient::new(channel.clone());
    let answered_by = || {
        let mut client = client.clone();
        async move {
            let reply = client
                .say_hello(HelloRequest { name: "x".into() })
                .await
                .expect("call");
            reply.into_inner().message
        }
    };
    assert!(answered_by().await.ends_with(&listed.to_string()));

    lb.proc.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        answered_by().await.ends_with(&listed.to_string()),
        "the LB's loss alone moved the channel off its list"
    );
    assert_eq!(channel.listed_backends(), vec![listed]);

    backends[0].proc.kill();
    let fell_back = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || channel.ready_backends()
            == vec![fallback.addr])
        .await,
        "no fallback with the LB and every listed backend gone: ready {:?}, listed {:?}",
        channel.ready_backends(),
        channel.listed_backends()
    );
    eprintln!(
        "fallback: serving from the fallback backend {:?} after the listed backend died",
        fell_back.elapsed()
    );
    assert!(answered_by().await.ends_with(&fallback.addr.to_string()));
}

/// A `tower::retry` policy for the test below: every `Err` is retried
/// after 100 ms, at most 50 times; answers (`Ok`) are never retried.
#[derive(Clone)]
struct RetryErrors {
    left: usize,
    errors_seen: Arc<AtomicUsize>,
}

impl
    tower::retry::Policy<
        http::Request<tonic::body::Body>,
        http::Response<tonic::body::Body>,
        lb_client::BoxError,
    > for RetryErrors
{
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _: &mut http::Request<tonic::body::Body>,
        result: &mut Result<http::Response<tonic::body::Body>, lb_client::BoxError>,
    ) -> Option<Self::Future> {
        if result.is_ok() || self.left == 0 {
            return None;
        }
        self.left -= 1;
        self.errors_seen.fetch_add(1, Ordering::Relaxed);
        Some(tokio::time::sleep(Duration::from_millis(100)))
    }

    fn clone_request(
        &mut self,
        req: &http::Request<tonic::body::Body>,
    ) -> Option<http::Request<tonic::body::Body>> {
        Some(hello_request(req.uri().clone()))
    }
}

/// A unary `SayHello` request, framed by hand (so that it can be cloned).
fn hello_request(uri: http::Uri) -> http::Request<tonic::body::Body> {
    use prost::Message;
    let message = HelloRequest {
        name: "retried".into(),
    }
    .encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let mut request = http::Request::new(tonic::body::Body::new(http_body_util::Full::new(
        bytes::Bytes::from(framed),
    )));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = uri;
    request
        .headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    request
        .headers_mut()
        .insert("te", "trailers".parse().unwrap());
    request
}

/// A call no backend answered is an `Err` of the service, so tower's layers
/// see it: a `tower::retry::Retry` over the channel retries while its only
/// backend (a stock grpc-go server) is down, and the call succeeds once it
/// is up. Before calls no backend answered came back as `Ok` responses
/// carrying UNAVAILABLE, which no tower layer could tell from a backend's
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_retry_retries_a_call_no_backend_answered() {
    use http_body_util::BodyExt;
    let first = StockBackend::start(Stock::GrpcGo).await;
    let addr = first.addr;
    drop(first);
    let channel = LbChannel::builder("greeter")
        .fallback_backends([addr])
        .build()
        .expect("channel");
    let errors_seen = Arc::new(AtomicUsize::new(0));
    let policy = RetryErrors {
        left: 50,
        errors_seen: errors_seen.clone(),
    };
    let retrying = tower::retry::Retry::new(policy, channel.clone());
    let uri: http::Uri = "http://greeter/helloworld.Greeter/SayHello"
        .parse()
        .unwrap();
    let call = tokio::spawn(retrying.oneshot(hello_request(uri)));
    // The backend comes up on the same port while the layer retries.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let port = addr.port().to_string();
    let _back = StockBackend::start_with(Stock::GrpcGo, &["-port", &port]).await;
    let response = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the call ended")
        .expect("join")
        .expect("the retried call was answered");
    let trailers = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .trailers()
        .cloned()
        .unwrap_or_default();
    eprintln!(
        "tower::retry: {} errors retried before the backend answered",
        errors_seen.load(Ordering::Relaxed)
    );
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
    assert!(
        errors_seen.load(Ordering::Relaxed) >= 1,
        "tower::retry never saw an error"
    );
}

/// Per-backend outcomes reach the LB: three stock grpc-go backends (one
/// answers, one fails every call with UNAVAILABLE, one holds every answer
/// 2 s) take 90 calls from one `LbChannel`: a third of them the caller
/// gives up after 400 ms (the future dropped), a third carry a 400 ms
/// deadline, a third wait for their answer. `/api/v1/services/greeter` then shows, per backend, what the
/// channel reported over LRS: the failing backend's errors, and the slow
/// backend's calls as cancelled by the caller or ended by the deadline,
/// none of them as its errors. The service's call totals (from BalanceLoad
/// client stats) count each call once, not again from LRS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_backend_outcomes_reach_the_lb_and_the_callers_own_ends_are_not_errors() {
    let (lb, backends, _registrations) =
        stock_fleet_of(&[&[], &["-fail-code", "14"], &["-delay", "2s"]]).await;
    let (good, failing, slow) = (backends[0].addr, backends[1].addr, backends[2].addr);
    let channel = LbChannel::builder("greeter")
        .lb(lb.addr.to_string())
        .build()
        .expect("channel");
    assert!(
        wait_until(Duration::from_secs(10), || channel.ready_backends().len()
            == 3)
        .await,
        "the channel never connected to the three backends"
    );
    const CALLS: usize = 90;
    let client = GreeterClient::new(channel.clone());
    let calls = (0..CALLS).map(|i| {
        let mut client = client.clone();
        async move {
            let mut request = tonic::Request::new(HelloRequest {
                name: format!("call {i}"),
            });
            // Round robin gives call i to backend i mod 3: each backend
            // gets calls of every kind.
            match (i / 3) % 3 {
                // The caller's own deadline.
                0 => {
                    request.set_timeout(Duration::from_millis(400));
                    let _ = client.say_hello(request).await;
                }
                // The caller gives up: the call's future is dropped.
                1 => {
                    let _ =
                        tokio::time::timeout(Duration::from_millis(400), client.say_hello(request))
                            .await;
                }
                _ => {
                    let _ = client.say_hello(request).await;
                }
            }
        }
    });
    futures::future::join_all(calls).await;
    let outcomes = |addr: std::net::SocketAddr| {
        lb.backends("greeter")
            .into_iter()
            .find(|b| b["address"] == addr.to_string())
            .map(|b| b["outcomes"].clone())
            .unwrap_or_default()
    };
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    // Every call ends up reported (the slow backend's too, at most 2 s on).
    let reported = wait_until(Duration::from_secs(15), || {
        [good, failing, slow]
            .iter()
            .map(|a| n(&outcomes(*a), "calls"))
            .sum::<u64>()
            == CALLS as u64
            && n(&outcomes(slow), "in_progress") == 0
    })
    .await;
    let (g, f, s) = (outcomes(good), outcomes(failing), outcomes(slow));
    eprintln!("outcomes: good {g}\nfailing {f}\nslow {s}");
    assert!(reported, "not every call was reported");
    assert!(channel.counters().outcome_reports > 0);
    for o in [&g, &f, &s] {
        assert_eq!(n(o, "reporters"), 1, "one channel reported: {o}");
        assert!(n(o, "calls") > 0, "every backend took calls: {o}");
    }
    assert_eq!(n(&g, "errors"), 0, "{g}");
    assert_eq!(n(&g, "successes"), n(&g, "calls"), "{g}");
    assert_eq!(n(&f, "errors"), n(&f, "calls"), "{f}");
    assert_eq!(f["error_rate"].as_f64(), Some(1.0), "{f}");
    assert_eq!(
        n(&s, "errors"),
        0,
        "the caller's own ends counted as errors: {s}"
    );
    // A third of its calls each: given up, out of time, answered (in 2 s).
    let third = n(&s, "calls") / 3;
    assert_eq!(n(&s, "cancelled_by_caller"), third, "{s}");
    assert_eq!(n(&s, "deadline_exceeded"), third, "{s}");
    assert_eq!(n(&s, "successes"), third, "{s}");
    let latency = |o: &serde_json::Value| o["latency_ms_mean"].as_f64().unwrap_or(-1.0);
    assert!(
        (0.0..100.0).contains(&latency(&g)),
        "the answering backend's latency: {g}"
    );
    // Its answered calls took 2 s, its deadline-ended ones 0.4 s: their mean
    // is 1.2 s, not the answered calls' 2 s alone.
    assert!(
        (1000.0..1500.0).contains(&latency(&s)),
        "deadline-ended calls keep their latency: {s}"
    );
    // Each call counted once in the service's totals (client stats come
    // every 10 s from this LB, outcome reports every second).
    let started = || lb.service_json("greeter")["calls"]["started"].as_i64();
    assert!(
        wait_until(Duration::from_secs(15), || started() == Some(CALLS as i64)).await,
        "the service's call totals counted {:?} calls, not {CALLS}",
        started()
    );
    // And stay so once every report of the calls is in.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(started(), Some(CALLS as i64), "counted twice");
}

/// A custom connector (tonic's `connect_with_connector`): the channel
/// reaches its listed backend, a stock grpc-go server, only through a Unix
/// socket named after the backend's port, where a relay in this test
/// forwards to the server. Every call goes through the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_connector_reaches_backends_over_unix_sockets() {
    let (lb, backends, _registrations) = stock_fleet(1, &[]).await;
    let backend = backends[0].addr;
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join(format!("{}.sock", backend.port()));
    let listener = tokio::net::UnixListener::bind(&socket).expect("unix socket");
    let relayed = Arc::new(AtomicUsize::new(0));
    let relay = {
        let relayed = relayed.clone();
        tokio::spawn(async move {
            while let Ok((mut unix, _)) = listener.accept().await {
                relayed.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    if let Ok(mut tcp) = tokio::net::TcpStream::connect(backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut unix, &mut tcp).await;
                    }
                });
            }
        })
    };
    let dir_path = dir.path().to_path_buf();
    let unix = tower::service_fn(move |uri: http::Uri| {
        let path = dir_path.join(format!("{}.sock", uri.port_u16().unwrap_or(0)));
        tokio::net::UnixStream::connect(path)
    });
    let channel = LbChannel::builder("greeter")
        .lb(lb.addr.to_string())
        .connector(unix)
        .build()
        .expect("channel");
    assert!(
        wait_until(Duration::from_secs(10), || channel.ready_backends()
            == vec![backend])
        .await,
        "the channel never connected through the connector"
    );
    let mut client = GreeterClient::new(channel.clone());
    for i in 0..20 {
        let reply = client
            .say_hello(HelloRequest {
                name: format!("unix {i}"),
            })
            .await
            .expect("call through the Unix socket");
        assert!(reply.into_inner().message.ends_with(&backend.to_string()));
    }
    assert_eq!(
        relayed.load(Ordering::Relaxed) as u64,
        channel.counters().backend_connections,
        "every backend connection went through the connector"
    );
    assert!(relayed.load(Ordering::Relaxed) >= 1);
    relay.abort();
}
