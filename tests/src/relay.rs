//! A TCP relay that connects onward from a chosen loopback source address,
//! so that a stock client (which cannot pick its source address) reaches
//! the LB as a peer of another 127.0.0.x address: how the tests put stock
//! grpclb clients in a zone of `--client-zone`.

use std::net::{IpAddr, SocketAddr};

use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;

/// Relays every connection to `127.0.0.1:<port>` on to a target, from a
/// given source address; stops when dropped.
pub struct Relay {
    /// Where clients connect.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Relay {
    /// A relay to `to` whose onward connections come from `from`.
    pub async fn start(to: SocketAddr, from: IpAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let socket = TcpSocket::new_v4().expect("socket");
                    socket.bind(SocketAddr::new(from, 0)).expect("bind source");
                    let Ok(mut outbound) = socket.connect(to).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        Relay { addr, task }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
