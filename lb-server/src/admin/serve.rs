//! Serving the admin router over HTTP/1.1 and HTTP/2, defensively, in
//! plaintext or over TLS.
//!
//! Connections come through [`crate::net::listener::guarded`] (connection caps,
//! first-bytes deadline); with TLS the whole handshake must then finish
//! within the same deadline. Each connection gets hyper's header read
//! timeout, again that deadline (a slowloris sending one header byte at a
//! time is cut off), and the caller's address for the handlers' logs. On
//! shutdown the listener closes and open connections finish their requests.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use futures::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::net::listener::{guarded, ListenerSettings};

/// Serves `router` on `listener` (over TLS with `tls`) until `shutdown`,
/// then lets open connections finish (at most 5 s).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: ListenerSettings,
    tls: Option<TlsAcceptor>,
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
    let mut incoming = Box::pin(guarded(listener, settings.clone()));
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
        let connection = Connection {
            builder: builder.clone(),
            router: router.clone(),
            watcher: graceful.watcher(),
            peer,
        };
        match &tls {
            None => {
                tokio::spawn(connection.serve(io));
            }
            Some(acceptor) => {
                let accept = acceptor.accept(io);
                let settings = settings.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(settings.handshake_timeout, accept).await {
                        Ok(Ok(stream)) => connection.serve(stream).await,
                        Ok(Err(e)) => {
                            settings.refused("tls_handshake", Some(peer), &e.to_string());
                        }
                        Err(_) => {
                            let detail = format!(
                                "TLS handshake not done within {:?}",
                                settings.handshake_timeout
                            );
                            settings.refused("handshake_timeout", Some(peer), &detail);
                        }
                    }
                });
            }
        }
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

/// One accepted connection, ready to be served once its bytes are plain
/// HTTP (after TLS, if any).
struct Connection {
    builder: Builder<TokioExecutor>,
    router: Router,
    watcher: Watcher,
    peer: SocketAddr,
}

impl Connection {
    async fn serve<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = self.peer;
        let service = self.router.map_request(
            move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            },
        );
        let connection = self
            .builder
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
            .into_owned();
        if let Err(e) = self.watcher.watch(connection).await {
            tracing::debug!(%peer, error = %e, "admin connection ended with an error");
        }
    }
}
