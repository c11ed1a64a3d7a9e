//! The HTTP server under the stand-ins for APIs that cannot run here
//! (Consul's agent, the Kubernetes API server): serves an axum app on a
//! loopback port, over TLS when given an acceptor, and can be stopped (the
//! port closed, open connections dropped: an outage, not a drain) and
//! started again on the same port.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use tokio_util::sync::CancellationToken;

/// A stand-in's HTTP server.
pub struct StandIn {
    /// Where it listens.
    pub addr: SocketAddr,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: Option<CancellationToken>,
}

impl StandIn {
    /// Serves `app` on a free loopback port (HTTPS with `tls`).
    pub async fn start(app: Router, tls: Option<tokio_rustls::TlsAcceptor>) -> StandIn {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut server = StandIn {
            addr: listener.local_addr().unwrap(),
            app,
            tls,
            stop: None,
        };
        server.serve(listener);
        server
    }

    /// Whether it serves TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let stop = CancellationToken::new();
        let (token, app, tls) = (stop.clone(), self.app.clone(), self.tls.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = token.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                let (app, token, tls) = (app.clone(), token.clone(), tls.clone());
                tokio::spawn(async move {
                    // Stopping drops the connection: an outage, not a drain.
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = async {
                            match tls {
                                None => serve_http(tcp, app).await,
                                Some(tls) => {
                                    if let Ok(stream) = tls.accept(tcp).await {
                                        serve_http(stream, app).await;
                                    }
                                }
                            }
                        } => {}
                    }
                });
            }
        });
        self.stop = Some(stop);
    }

    /// Stops answering: the port is closed and open connections dropped.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            s.cancel();
        }
    }

    /// Starts again on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        self.serve(listener);
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves `app` on one connection until it closes.
async fn serve_http<I>(io: I, app: Router)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(app);
    let builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    let _ = builder
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
}
