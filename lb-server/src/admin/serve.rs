//! Serving the admin router over HTTP/1.1 and HTTP/2, defensively.
//!
//! Connections come through [`crate::listener::guarded`] (connection caps,
//! first-bytes deadline); each then gets hyper's header read timeout, the
//! same handshake deadline (a slowloris sending one header byte at a time is
//! cut off), and the caller's address for the handlers' logs. On shutdown the
//! listener closes and open connections finish their requests.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use futures::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::listener::{guarded, ListenerSettings};

/// Serves `router` on `listener` until `shutdown`, then lets open
/// connections finish (at most 5 s).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: ListenerSettings,
    shutdown: CancellationToken,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.handshake_timeout)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64)
        .max_header_list_size(16 * 1024)
        .keep_alive_interval(Duration::from_secs(30));
    let graceful = GracefulShutdown::new();
    let mut incoming = Box::pin(guarded(listener, settings));
    loop {
        let io = tokio::select! {
            _ = shutdown.cancelled() => break,
            io = incoming.next() => match io {
                Some(Ok(io)) => io,
                Some(Err(_)) => continue,
                None => break,
            },
        };
        let peer: SocketAddr = io.peer();
        let service = router.clone().map_request(
            move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            },
        );
        let connection = builder
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
            .into_owned();
        let watched = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = watched.await {
                tracing::debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
    // Close the listening socket before waiting for open connections.
    drop(incoming);
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("admin connections still open after 5 s; closing");
    }
}
