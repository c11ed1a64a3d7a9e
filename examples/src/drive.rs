//! Makes calls through a channel and counts which backend answered each.

use std::collections::BTreeMap;
use std::time::Duration;

use lb_client::LbChannel;
use lb_proto::helloworld::{greeter_client::GreeterClient, HelloRequest};

use crate::greeter::backend_of;

/// Where calls went.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Calls answered, per backend address.
    pub per_backend: BTreeMap<String, u64>,
    /// Failed calls, per status code and message.
    pub failures: BTreeMap<String, u64>,
}

impl Tally {
    /// Calls answered in all.
    pub fn ok(&self) -> u64 {
        self.per_backend.values().sum()
    }

    /// Calls failed in all.
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    /// Adds another tally's counts to this one.
    pub fn merge(&mut self, other: Tally) {
        for (k, v) in other.per_backend {
            *self.per_backend.entry(k).or_default() += v;
        }
        for (k, v) in other.failures {
            *self.failures.entry(k).or_default() += v;
        }
    }

    /// A one-line-per-backend table with shares.
    pub fn table(&self) -> String {
        let total = self.ok().max(1) as f64;
        let mut out = String::new();
        for (backend, n) in &self.per_backend {
            let bar = "#".repeat((40.0 * *n as f64 / total).round() as usize);
            out.push_str(&format!(
                "  {backend:<22} {n:>6} calls {:>5.1}%  {bar}\n",
                100.0 * *n as f64 / total
            ));
        }
        for (why, n) in &self.failures {
            out.push_str(&format!("  FAILED {n:>6}: {why}\n"));
        }
        out
    }
}

/// Makes `calls` calls, `concurrency` at a time, each with `timeout`.
pub async fn drive(
    channel: &LbChannel,
    calls: u64,
    concurrency: usize,
    timeout: Duration,
) -> Tally {
    use futures::StreamExt;
    let results = futures::stream::iter(0..calls)
        .map(|i| {
            let mut client = GreeterClient::new(channel.clone());
            async move {
                let mut request = tonic::Request::new(HelloRequest {
                    name: format!("call-{i}"),
                });
                request.set_timeout(timeout);
                client.say_hello(request).await
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    let mut tally = Tally::default();
    for r in results {
        match r {
            Ok(reply) => {
                *tally
                    .per_backend
                    .entry(backend_of(&reply.into_inner().message).to_string())
                    .or_default() += 1
            }
            Err(status) => {
                *tally
                    .failures
                    .entry(format!("{:?}: {}", status.code(), status.message()))
                    .or_default() += 1
            }
        }
    }
    tally
}
