//! `lb-client`: the thin client side of a lookaside (grpclb) load balancer.
//!
//! For callers, [`LbChannel`] is a `tower::Service` that any
//! tonic-generated client accepts. It keeps one `grpc.lb.v1` stream open to
//! an LB, walks each received server list in order, and sends every call
//! straight to a backend: the LB is never in the data path.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use lb_client::LbChannel;
//! use lb_proto::helloworld::{greeter_client::GreeterClient, HelloRequest};
//!
//! let channel = LbChannel::builder("greeter").lb("127.0.0.1:7000").build()?;
//! let mut greeter = GreeterClient::new(channel);
//! let reply = greeter.say_hello(HelloRequest { name: "you".into() }).await?;
//! println!("{}", reply.into_inner().message);
//! # Ok(()) }
//! ```
//!
//! For backends, `Registration` announces an instance in the registry the
//! LB reads (etcd or the LB's embedded registry) and keeps it alive, and
//! `orca::LoadRecorder` publishes their load to the LB.
//!
//! The public face is this page: the channel and its builder, retry
//! policies ([`retry`]), TLS settings, and for backends [`Registration`]
//! ([`register`]) and [`orca`]. Inside, one job per file:
//!
//! | file | job |
//! | --- | --- |
//! | `channel` | the `tower::Service` and its builder |
//! | `balancer_stream` | the LB stream: lists, failover, stats, fallback |
//! | `state` | list in force + connections → pick list |
//! | `picker` | lock-free walk of the pick list |
//! | `deadline` | a call's deadline, kept for the whole call (pick, headers, body) |
//! | `retry` | gRPC retry policies and throttling (gRFC A6), the request replayed |
//! | `outcomes` | what each backend did with the calls: counted per call |
//! | `load_report` | those outcomes to the LB over LRS |
//! | `backends` | one HTTP/2 connection per backend, reconnected with backoff |
//! | `stats` | client-stats counters (grpclb) |
//! | `register` | backend registration helpers (feature `register`) |
//! | `orca` | backend-side ORCA load reporting (feature `orca`) |
//! | `backoff` | jittered exponential backoff, reset after a session that lasted |
//! | `etcd` | etcd access: one member at a time, keep-alive within etcd's policy (feature `etcd`) |
//! | `tls` | TLS settings of outgoing connections |
//! | `task` | tasks that end with their owner |
//! | `thin` | socket options for thin streams (lists, keep-alives) on lossy links |
//!
//! Features: `register` (registration in the embedded registry), `etcd`
//! (etcd access and registration there), `orca` (backend load reporting),
//! all on by default; `zookeeper` and `consul` registration are off. A
//! client that only calls needs none: `default-features = false`.

mod backends;
mod backoff;
mod balancer_stream;
mod channel;
mod deadline;
#[cfg(feature = "etcd")]
mod etcd;
mod load_report;
#[cfg(feature = "orca")]
pub mod orca;
mod outcomes;
mod picker;
#[cfg(feature = "register")]
pub mod register;
pub mod retry;
mod state;
mod stats;
mod thin;
mod tls;

pub use backends::BackendIo;
pub use channel::{
    LbChannel, LbChannelBuilder, DEFAULT_CONCURRENCY_LIMIT, LB_TOKEN, LB_TOKEN_HEADER,
};
#[cfg(feature = "register")]
pub use register::{Registration, RegistrationOptions};
pub use retry::{RetryPolicy, RetryThrottling};
pub use state::CountersSnapshot as Counters;
pub use tls::TlsConfig;

/// What `lb-server`, the tests and the benchmarks share with this crate's
/// insides. Not part of the API: no promise of stability.
#[doc(hidden)]
pub mod internals {
    pub use crate::backoff::Backoff;
    #[cfg(feature = "etcd")]
    pub use crate::etcd::{list_prefix, EtcdAccess};
    pub use crate::picker::{Pick, PickList, Picker};
    pub use crate::thin::{tune as tune_thin_stream, RTO_MAX as THIN_STREAM_RTO_MAX};
}

/// A boxed error, as tower services use.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
}
