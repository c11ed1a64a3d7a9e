//! A slow link for tests: a TCP proxy on a test host that delays every byte
//! by a base delay plus random jitter, each way, keeping each stream's
//! order (a later chunk never overtakes an earlier one). The kernels here
//! have no `netem`; loss comes from the router ([`crate::netns::Net::lossy`]),
//! delay from this, shaped like etcd's functional-test proxy or toxiproxy's
//! latency toxic.
//!
//! Every connection accepted is counted: with a client that keeps one
//! stream to its LB, connections beyond the first are its reconnects.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::netns::{Host, HostRuntime};

/// How a [`Shaper`] slows its link.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Delay added to every chunk, each way.
    pub delay: Duration,
    /// Up to this much more or less, uniformly at random per chunk.
    pub jitter: Duration,
}

/// A delaying proxy from a port on a test host to a target.
pub struct Shaper {
    /// Where clients connect.
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    // Dropping the runtime stops the proxy and closes its connections.
    _rt: HostRuntime,
}

impl Shaper {
    /// Listens on `port` of `host` and forwards each connection to `target`
    /// with `shape` applied both ways.
    pub fn start(host: &Host, port: u16, target: SocketAddr, shape: Shape) -> Shaper {
        let rt = host.ns.runtime();
        let addr = host.addr(port);
        let listener = host
            .ns
            .run(|| std::net::TcpListener::bind(addr))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .unwrap_or_else(|e| panic!("shaper cannot listen on {addr}: {e}"));
        let listener = {
            let _in = rt.enter();
            TcpListener::from_std(listener).expect("listener")
        };
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        rt.spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::join!(pipe(ri, wo, shape), pipe(ro, wi, shape));
                });
            }
        });
        Shaper {
            addr,
            accepted,
            _rt: rt,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Copies `from` to `to`, each chunk delivered `shape` after it was read
/// and never before the chunk read before it. EOF is passed on in order.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shape: Shape,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut last = Instant::now();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let due = (Instant::now() + jittered(shape)).max(last);
            last = due;
            if tx.send((due, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// `shape.delay` ± up to `shape.jitter`, uniformly.
fn jittered(shape: Shape) -> Duration {
    let jitter = shape.jitter.as_secs_f64();
    let offset = (rand::random::<f64>() * 2.0 - 1.0) * jitter;
    Duration::from_secs_f64((shape.delay.as_secs_f64() + offset).max(0.0))
}
