//! A stream's first request, within `--initial-request-timeout`.
//!
//! Until its first request a stream says nothing about itself, yet it holds
//! a slot of the shared stream quota (BalanceLoad, ADS and LRS together): a
//! peer opening streams and staying silent would fill the quota for free.
//! Every frontend therefore waits for the first request through
//! [`first_request`], with the same deadline.

use std::time::Duration;

use tonic::{Status, Streaming};

/// How waiting for a stream's first request ended.
#[derive(Debug)]
pub enum FirstRequest<T> {
    /// It arrived.
    Received(T),
    /// Nothing arrived within the deadline.
    TimedOut,
    /// The client closed its side without sending anything.
    Ended,
    /// Reading failed (a message too large, the client went away).
    Failed(Status),
}

/// The status a stream is closed with when no `what` arrived within
/// `timeout`.
pub fn timeout_status(timeout: Duration, what: &str) -> Status {
    Status::deadline_exceeded(format!("no {what} within {timeout:?}"))
}

/// Reads the first message of `inbound`, waiting at most `timeout`.
pub async fn first_request<T>(inbound: &mut Streaming<T>, timeout: Duration) -> FirstRequest<T> {
    match tokio::time::timeout(timeout, inbound.message()).await {
        Err(_) => FirstRequest::TimedOut,
        Ok(Err(status)) => FirstRequest::Failed(status),
        Ok(Ok(None)) => FirstRequest::Ended,
        Ok(Ok(Some(message))) => FirstRequest::Received(message),
    }
}
