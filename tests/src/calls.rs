//! Calling through an `LbChannel` in the tests: background callers that
//! count where each call went, and waits on what a channel lists.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lb_client::LbChannel;
use lb_examples::greeter::backend_of;
use lb_proto::helloworld::{greeter_client::GreeterClient, HelloRequest};

use crate::*;

/// Result of background calls.
#[derive(Debug, Default, Clone)]
pub struct Calls {
    /// Successful calls per backend.
    pub per_backend: BTreeMap<String, u64>,
    /// First success per backend.
    pub first_seen: BTreeMap<String, Instant>,
    /// Last success per backend.
    pub last_seen: BTreeMap<String, Instant>,
    /// Failures: (when, code, message).
    pub failures: Vec<(Instant, tonic::Code, String)>,
    /// Times of every successful call, per backend.
    pub times: BTreeMap<String, Vec<Instant>>,
}

impl Calls {
    /// Successful calls.
    pub fn ok(&self) -> u64 {
        self.per_backend.values().sum()
    }

    /// The first successful call to `backend` after `t`.
    pub fn first_after(&self, backend: &str, t: Instant) -> Option<Instant> {
        self.times.get(backend)?.iter().copied().find(|x| *x > t)
    }

    /// Successful calls to `backend` after `t`.
    pub fn count_after(&self, backend: &str, t: Instant) -> usize {
        self.times
            .get(backend)
            .map(|v| v.iter().filter(|x| **x > t).count())
            .unwrap_or(0)
    }
}

/// Calls the greeter continuously from `concurrency` tasks until stopped.
pub struct Caller {
    stop: Arc<AtomicBool>,
    calls: Arc<Mutex<Calls>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Caller {
    /// Starts calling through `channel`; each task pauses `pause` between calls.
    /// Calls run until [`Caller::stop`], and never longer than 5 minutes.
    pub fn start(channel: &LbChannel, concurrency: usize, pause: Duration) -> Caller {
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(Mutex::new(Calls::default()));
        let limit = Instant::now() + Duration::from_secs(300);
        let tasks = (0..concurrency)
            .map(|_| {
                let (stop, calls, mut client) = (
                    stop.clone(),
                    calls.clone(),
                    GreeterClient::new(channel.clone()),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) && Instant::now() < limit {
                        let mut req = tonic::Request::new(HelloRequest { name: "bg".into() });
                        req.set_timeout(Duration::from_secs(5));
                        let result = client.say_hello(req).await;
                        let now = Instant::now();
                        {
                            let mut c = calls.lock().unwrap();
                            match result {
                                Ok(r) => {
                                    let b = backend_of(&r.into_inner().message).to_string();
                                    *c.per_backend.entry(b.clone()).or_default() += 1;
                                    c.first_seen.entry(b.clone()).or_insert(now);
                                    c.last_seen.insert(b.clone(), now);
                                    c.times.entry(b).or_default().push(now);
                                }
                                Err(s) => c.failures.push((now, s.code(), s.message().to_string())),
                            }
                        }
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        Caller { stop, calls, tasks }
    }

    /// Like [`Caller::start`], its tasks spawned on `rt`: on a test host's
    /// runtime ([`crate::netns::Ns::runtime`]) they are calls from that host.
    pub fn start_on(
        rt: &tokio::runtime::Runtime,
        channel: &LbChannel,
        concurrency: usize,
        pause: Duration,
    ) -> Caller {
        let _in = rt.enter();
        Caller::start(channel, concurrency, pause)
    }

    /// What happened so far.
    pub fn snapshot(&self) -> Calls {
        self.calls.lock().unwrap().clone()
    }

    /// Stops and returns what happened.
    pub async fn stop(self) -> Calls {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let calls = self.calls.lock().unwrap().clone();
        calls
    }
}

/// A channel to `service` through the LB(s) at `lbs`, with short backoffs
/// suited to tests.
pub fn channel(service: &str, lbs: &[SocketAddr]) -> LbChannel {
    LbChannel::builder(service)
        .lbs(lbs.iter().map(|a| a.to_string()))
        .lb_backoff(Duration::from_millis(100), Duration::from_secs(1))
        .build()
        .expect("build channel")
}

/// Waits until `lb` is ready and a `greeter` client of it lists exactly
/// `want` (panics with the list otherwise), then starts 2 callers on it.
pub async fn listed_and_calling(lb: &Lb, want: &[SocketAddr]) -> (LbChannel, Caller) {
    lb.wait_ready(Duration::from_secs(10)).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(
        wait_listed(&ch, want, Duration::from_secs(10)).await,
        "initial listing: {:?}",
        listed(&ch)
    );
    let caller = Caller::start(&ch, 2, Duration::from_millis(5));
    (ch, caller)
}

/// Waits until `channel` has exactly `n` distinct ready backends.
pub async fn wait_backends(channel: &LbChannel, n: usize, limit: Duration) -> bool {
    wait_until(limit, || {
        let mut b = channel.ready_backends();
        b.sort();
        b.dedup();
        b.len() == n
    })
    .await
}

/// The distinct backends of the list `channel` has in force, sorted
/// (connected or not).
pub fn listed(channel: &LbChannel) -> Vec<SocketAddr> {
    let mut l = channel.listed_backends();
    l.sort();
    l.dedup();
    l
}

/// Waits until the list in force holds exactly the backends `want`.
pub async fn wait_listed(channel: &LbChannel, want: &[SocketAddr], limit: Duration) -> bool {
    let mut want = want.to_vec();
    want.sort();
    wait_until(limit, || listed(channel) == want).await
}

/// Makes `n` calls one after another; returns per-backend counts and failures.
pub async fn call_n(channel: &LbChannel, n: u64) -> lb_examples::drive::Tally {
    lb_examples::drive::drive(channel, n, 1, Duration::from_secs(5)).await
}

/// Lists received, with their arrival times.
type ListLog = Arc<Mutex<Vec<(Instant, Vec<SocketAddr>)>>>;

/// Records every server list an LB sends on one raw BalanceLoad stream.
pub struct ListWatcher {
    lists: ListLog,
    task: tokio::task::JoinHandle<()>,
}

impl ListWatcher {
    /// Opens a stream for `name` to the LB at `lb` and records lists.
    pub async fn start(lb: SocketAddr, name: &str) -> ListWatcher {
        Self::start_as(lb, name, None).await
    }

    /// Like [`ListWatcher::start`], naming the client (`lb-client-id`).
    pub async fn start_as(lb: SocketAddr, name: &str, client_id: Option<&str>) -> ListWatcher {
        use lb_proto::grpc::lb::v1::{
            load_balance_request::LoadBalanceRequestType,
            load_balance_response::LoadBalanceResponseType,
            load_balancer_client::LoadBalancerClient, InitialLoadBalanceRequest,
            LoadBalanceRequest,
        };
        let mut client = LoadBalancerClient::connect(format!("http://{lb}"))
            .await
            .expect("connect LB");
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(LoadBalanceRequest {
            load_balance_request_type: Some(LoadBalanceRequestType::InitialRequest(
                InitialLoadBalanceRequest { name: name.into() },
            )),
        })
        .await
        .unwrap();
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Some(id) = client_id {
            request
                .metadata_mut()
                .insert("lb-client-id", id.parse().expect("ascii client id"));
        }
        let mut stream = client
            .balance_load(request)
            .await
            .expect("BalanceLoad")
            .into_inner();
        let lists: ListLog = Arc::default();
        let sink = lists.clone();
        let task = tokio::spawn(async move {
            let _keep_open = tx;
            while let Ok(Some(m)) = stream.message().await {
                if let Some(LoadBalanceResponseType::ServerList(l)) = m.load_balance_response_type {
                    let addrs = l
                        .servers
                        .iter()
                        .filter(|s| !s.drop)
                        .filter_map(|s| s.socket_addr())
                        .collect();
                    sink.lock().unwrap().push((Instant::now(), addrs));
                }
            }
        });
        ListWatcher { lists, task }
    }

    /// Every list received so far, with its arrival time.
    pub fn all(&self) -> Vec<(Instant, Vec<SocketAddr>)> {
        self.lists.lock().unwrap().clone()
    }

    /// The latest list, if any.
    pub fn latest(&self) -> Option<Vec<SocketAddr>> {
        self.lists.lock().unwrap().last().map(|(_, l)| l.clone())
    }

    /// When the first list after `t` without `addr` arrived.
    pub fn removed_after(&self, addr: SocketAddr, t: Instant) -> Option<Instant> {
        self.lists
            .lock()
            .unwrap()
            .iter()
            .find(|(at, l)| *at >= t && !l.contains(&addr))
            .map(|(at, _)| *at)
    }
}

impl Drop for ListWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}
