//! Pick cost in `lb-client`: one pick from a live channel's pick list, with
//! the `lb-token` attached to the call's headers, beside an atomic increment
//! (the floor: a pick is one `fetch_add` on the list's cursor plus an index).
//!
//! The channel is real: an in-process LB (embedded registry), three greeters
//! registered with it, and an `LbChannel` whose connections are ready. Before
//! measuring, 100,000 picks (after a warm-up in which each token's first
//! clone makes it shareable) are checked to allocate nothing on the calling
//! thread.
//!
//! `cargo bench -p lb-examples --bench pick`

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use lb_client::internals::Pick;
use lb_client::{LbChannel, Registration, RegistrationOptions, LB_TOKEN_HEADER};
use lb_examples::greeter::{GreeterOptions, RunningGreeter};
use lb_server::{Config, LbServer};

/// Counts allocations made by the current thread.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; the counter is a const-initialised
// thread local, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Keeps the LB and greeters alive while benchmarking.
struct Setup {
    runtime: tokio::runtime::Runtime,
    channel: LbChannel,
    _lb: LbServer,
    _greeters: Vec<RunningGreeter>,
}

fn setup() -> Setup {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (lb, greeters, channel) = runtime.block_on(async {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let lb = LbServer::start(Config::with_addrs(any, any))
            .await
            .expect("LB");
        let mut greeters = Vec::new();
        for _ in 0..3 {
            let listener = tokio::net::TcpListener::bind(any).await.unwrap();
            let lb_addr = lb.lb_addr.to_string();
            let g = RunningGreeter::start(listener, GreeterOptions::default(), move |addr| {
                Registration::embedded(
                    vec![lb_addr],
                    "greeter",
                    &addr.to_string(),
                    RegistrationOptions::default(),
                )
                .ok()
            })
            .await
            .expect("greeter");
            greeters.push(g);
        }
        let channel = LbChannel::builder("greeter")
            .lb(lb.lb_addr.to_string())
            .build()
            .expect("channel");
        for _ in 0..500 {
            let mut ready = channel.ready_backends();
            ready.sort();
            ready.dedup();
            if ready.len() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(channel.ready_backends().len(), 3, "backends not ready");
        (lb, greeters, channel)
    });
    Setup {
        runtime,
        channel,
        _lb: lb,
        _greeters: greeters,
    }
}

/// One pick with its token attached to `headers`, as a call does.
#[inline]
fn pick_and_attach(channel: &LbChannel, headers: &mut http::HeaderMap) {
    let list = channel.picker().load();
    if let Pick::Backend(b) = list.pick() {
        if let Some(token) = &b.token {
            headers.insert(LB_TOKEN_HEADER, token.clone());
        }
        black_box(&b.sender);
    }
}

fn picks(c: &mut Criterion) {
    let setup = setup();
    let channel = &setup.channel.clone();
    let mut headers = http::HeaderMap::new();
    // Warm up: the first clone of each token makes it shareable (one
    // allocation per token, once).
    for _ in 0..1_000 {
        pick_and_attach(channel, &mut headers);
    }
    assert!(
        headers.contains_key(LB_TOKEN_HEADER),
        "list entries carry no token"
    );

    let before = allocations();
    for _ in 0..100_000 {
        pick_and_attach(channel, &mut headers);
    }
    let allocated = allocations() - before;
    assert_eq!(allocated, 0, "100,000 picks allocated {allocated} times");
    eprintln!("100,000 picks + token attach: 0 allocations on the calling thread");

    let counter = AtomicUsize::new(0);
    c.bench_function("atomic increment (floor)", |b| {
        b.iter(|| black_box(&counter).fetch_add(1, Ordering::Relaxed))
    });
    c.bench_function("pick", |b| {
        b.iter(|| {
            let list = channel.picker().load();
            matches!(black_box(list.pick()), Pick::Backend(_))
        })
    });
    c.bench_function("pick + lb-token attach", |b| {
        b.iter(|| pick_and_attach(channel, &mut headers))
    });
    let Setup {
        runtime,
        channel,
        _lb: lb,
        _greeters: greeters,
    } = setup;
    runtime.block_on(async move {
        drop(channel);
        for g in greeters {
            g.shutdown(Duration::ZERO).await;
        }
        lb.shutdown(Duration::from_secs(1)).await;
    });
}

criterion_group!(benches, picks);
criterion_main!(benches);
